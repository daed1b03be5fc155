"""A background job that the Slicer module polls from its GUI thread (no Qt here).

``Job(work)`` runs ``work(progress, cancelled)`` in a daemon thread:

- ``progress(done, total, eta_seconds=None, message=None)`` records how far the work is (the
  engine's ``progress`` callback has this signature);
- ``cancelled()`` returns True once ``Job.cancel()`` was called (the engine's ``cancel``).

The GUI calls ``poll()`` from a ``QTimer`` and reads ``progress`` (a snapshot); when the state is
``DONE`` it takes ``result`` and creates nodes on its own thread. A job whose cancel was requested
ends ``CANCELLED`` even if the work returned a result: the caller discards it, so a cancelled run
never adds anything to the scene. Exceptions are kept (``error``, ``error_details``), never raised
in the worker thread.
"""

from __future__ import annotations

import enum
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "JobBase", "JobState", "Progress", "format_duration"]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def format_duration(seconds: float | None) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; None or negative -> ``"?"``."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN, negative
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass(frozen=True)
class Progress:
    """A snapshot: ``done`` of ``total`` units (slices), estimated seconds left, phase message."""

    done: int = 0
    total: int = 0
    eta: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    def text(self, unit: str = "slices") -> str:
        """``"12/40 slices, ETA 0:35"``; the message alone before the first count."""
        if self.total <= 0:
            return self.message or "Starting…"
        text = f"{self.done}/{self.total} {unit}"
        if self.done < self.total:
            text += f", ETA {format_duration(self.eta)}"
        return f"{self.message}: {text}" if self.message else text


class JobBase:
    """What the GUI polls, shared by ``Job`` (a thread) and ``runner.TranslationProcess`` (a
    process): state, progress snapshot, result, error, timing. Subclasses start the work and
    set ``_state``, ``_result``, ``_error``, ``_details`` and ``finished_at`` under ``_lock``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._state = JobState.PENDING
        self._progress = Progress()
        self._result: Any = None
        self._error: BaseException | None = None
        self._details = ""
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # -- reading --------------------------------------------------------------------------------
    def poll(self) -> JobState:
        with self._lock:
            return self._state

    @property
    def finished(self) -> bool:
        return self.poll().finished

    @property
    def progress(self) -> Progress:
        with self._lock:
            return self._progress

    @property
    def result(self) -> Any:
        """The work's return value; only once the state is DONE."""
        state = self.poll()
        if state is not JobState.DONE:
            raise RuntimeError(f"{self.name}: no result (state {state.value})")
        return self._result

    @property
    def error(self) -> BaseException | None:
        """The exception that ended a FAILED (or CANCELLED) job."""
        with self._lock:
            return self._error

    @property
    def error_details(self) -> str:
        """The formatted traceback of ``error`` (for the log), "" when there is none."""
        with self._lock:
            return self._details

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    # -- worker side -------------------------------------------------------------------------------
    def _report(self, done: int, total: int, eta: float | None = None, message: str | None = None) -> None:
        with self._lock:
            old = self._progress
            self._progress = Progress(int(done), int(total), None if eta is None else float(eta),
                                      old.message if message is None else str(message))

    def set_message(self, message: str) -> None:
        """Set the phase shown with the progress (e.g. "Loading model")."""
        with self._lock:
            p = self._progress
            self._progress = Progress(p.done, p.total, p.eta, message)



class Job(JobBase):
    """Run ``work(progress, cancelled)`` in a background thread; poll it from the GUI thread.

    ``cancelled_exceptions``: exception types that mean "stopped because of cancel" (e.g. the
    engine's ``TranslationCancelled``); any exception after ``cancel()`` counts as a cancel too.
    """

    def __init__(self, work: Callable[[Callable[..., None], Callable[[], bool]], Any], *,
                 name: str = "MedTranslate job", cancelled_exceptions: tuple[type[BaseException], ...] = ()):
        super().__init__(name)
        self._work = work
        self._cancelled_exceptions = tuple(cancelled_exceptions)
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------
    def start(self) -> Job:
        """Start the worker thread (once)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{self.name}: already started")
            self._state = JobState.RUNNING
            self.started_at = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop; it stops at its next check (the engine checks before each batch)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the job ends (or ``timeout`` seconds pass); returns ``poll()``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    def _run(self) -> None:
        result: Any = None
        error: BaseException | None = None
        details = ""
        try:
            result = self._work(self._report, self._cancel.is_set)
        except BaseException as exc:  # kept and reported to the GUI thread, never raised here
            error = exc
            details = "".join(traceback.format_exception(exc))
        with self._lock:
            self.finished_at = time.monotonic()
            if self._cancel.is_set() or isinstance(error, self._cancelled_exceptions):
                self._state = JobState.CANCELLED
                self._result = None  # a cancelled run hands back nothing
            elif error is not None:
                self._state = JobState.FAILED
            else:
                self._state = JobState.DONE
                self._result = result
            self._error = error
            self._details = details
