"""The translation process: one translation in a Python process of its own.

In Slicer, PythonQt holds the GIL while the Qt event loop idles, so a translation thread starves;
the peers (SlicerMONAIAuto3DSeg) run inference in a ``PythonSlicer`` process instead. So does
this module, and the process is the same code outside Slicer (``python -m MedTranslateLib.runner``):

1. ``write_request(request, folder)``: the case's volumes as ``.nrrd`` files plus
   ``request.json`` (the options and the file names);
2. ``python -m MedTranslateLib.runner FOLDER`` runs ``app.run_translation`` on it and prints one
   JSON line per progress report (``{"done", "total", "eta", "message"}``); it writes the result
   volumes and ``result.json`` into the folder and ends with ``{"state": "done"}``; an error a
   user can cause ends in ``{"error": "<one line>"}`` and exit status 2;
3. ``TranslationProcess`` (the same interface as ``worker.Job``: start, poll, progress, cancel,
   result, error) starts it, reads its lines on a thread of its own, kills it at once on
   ``cancel()``, turns a crash into one message, and reads the result back (``read_result``)
   without importing torch.

The process also frees the GPU memory of every run when it ends.

Two short commands serve the Slicer panel, so that its GUI thread never imports torch:
``--devices`` prints the device choices (``runtime.device_choices``) as one JSON line, and
``--import BUNDLE`` checks a bundle by loading it and copies it into the user's model folder
(``model_store.import_model``). ``DeviceQuery`` and ``ImportQuery`` run them and are polled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import io as mio
from .app import TranslationOptions, TranslationRequest, UserError, readable_error
from .cases import Case
from .worker import JobBase, JobState

__all__ = ["REQUEST_FILE", "RESULT_FILE", "write_request", "read_request", "write_result", "read_result",
           "ProcessResult", "TranslationProcess", "RunnerQuery", "DeviceQuery", "ImportQuery", "DEFAULT_DEVICE_CHOICES",
           "main"]

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
_VOLUMES = ("synthetic", "difference", "reference_difference", "uncertainty")
_LIBRARY_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# request and result files
# ---------------------------------------------------------------------------------------------
def _write(volume: mio.Volume, path: Path) -> str:
    mio.write_volume(volume, path, compress=False)
    return path.name


def write_request(request: TranslationRequest, folder: str | os.PathLike) -> Path:
    """The request as files in ``folder`` (created): volumes as uncompressed ``.nrrd``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    case = request.case
    doc: dict[str, Any] = {"name": case.name, "options": dataclasses.asdict(request.options),
                           "source": _write(case.source, folder / "source.nrrd"), "masks": {}, "reference": None}
    for i, (name, mask) in enumerate(case.masks.items()):
        doc["masks"][name] = _write(case.source.with_array(np.asarray(mask, np.float32)), folder / f"mask_{i}.nrrd")
    if case.reference is not None:
        doc["reference"] = _write(case.reference, folder / "reference.nrrd")
    (folder / REQUEST_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return folder


def read_request(folder: str | os.PathLike) -> TranslationRequest:
    folder = Path(folder)
    doc = json.loads((folder / REQUEST_FILE).read_text(encoding="utf-8"))
    source = mio.read_volume(folder / doc["source"])
    masks = {name: mio.read_volume(folder / f).array > 0.5 for name, f in doc["masks"].items()}
    reference = mio.read_volume(folder / doc["reference"]) if doc["reference"] else None
    options = dict(doc["options"])
    if isinstance(options.get("slices"), list):
        options["slices"] = tuple(options["slices"])
    return TranslationRequest(Case(doc["name"], source, masks, reference), TranslationOptions(**options))


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_result(outcome: Any, folder: str | os.PathLike) -> Path:
    """The outcome of ``app.run_translation`` as files in ``folder``."""
    folder = Path(folder)
    result, meta = outcome.result, outcome.meta
    doc = {"volumes": {k: _write(getattr(result, k), folder / f"out_{k}.nrrd") for k in _VOLUMES
                       if getattr(result, k) is not None},
           "uncertainty_kind": result.uncertainty_kind,
           "confidence": None if result.confidence is None else _plain(list(result.confidence)),
           "metrics": _plain(result.metrics), "baseline_metrics": _plain(result.baseline_metrics),
           "consistency": _plain(result.consistency), "slice_range": list(result.slice_range),
           "axis": result.axis, "info": _plain(result.info),
           "model": {"name": outcome.model_name, "method": meta.method, "source": meta.source.modality,
                     "target": meta.target.modality}}
    (folder / RESULT_FILE).write_text(json.dumps(doc), encoding="utf-8")
    return folder


@dataclasses.dataclass
class ProcessResult:
    """The engine's ``Result`` as read back from the process (the same fields), plus ``model``:
    {name, method, source, target} of the model that made it."""

    synthetic: mio.Volume
    difference: mio.Volume
    reference_difference: mio.Volume | None = None
    uncertainty: mio.Volume | None = None
    uncertainty_kind: str | None = None
    confidence: np.ndarray | None = None
    metrics: dict | None = None
    baseline_metrics: dict | None = None
    consistency: dict = dataclasses.field(default_factory=dict)
    slice_range: tuple[int, int] = (0, 0)
    axis: int = 0
    info: dict = dataclasses.field(default_factory=dict)
    model: dict = dataclasses.field(default_factory=dict)


def read_result(folder: str | os.PathLike) -> ProcessResult:
    folder = Path(folder)
    doc = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    volumes = {k: mio.read_volume(folder / f) for k, f in doc["volumes"].items()}
    conf = doc["confidence"]
    return ProcessResult(**volumes, uncertainty_kind=doc["uncertainty_kind"],
                         confidence=None if conf is None else np.array([np.nan if c is None else c for c in conf],
                                                                       dtype=np.float32),
                         metrics=doc["metrics"], baseline_metrics=doc["baseline_metrics"],
                         consistency=doc["consistency"] or {}, slice_range=tuple(doc["slice_range"]),
                         axis=doc["axis"], info=doc["info"] or {}, model=doc["model"])


# ---------------------------------------------------------------------------------------------
# the process itself
# ---------------------------------------------------------------------------------------------
def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(_plain(fields)) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m MedTranslateLib.runner FOLDER``: run the request in FOLDER (see module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--devices"]:
        from .runtime import device_choices

        _say(devices=device_choices())
        return 0
    if len(args) not in (1, 2) or (len(args) == 2) != (args[0] == "--import"):
        print("usage: python -m MedTranslateLib.runner REQUEST_FOLDER | --devices | --import BUNDLE", file=sys.stderr)
        return 2
    from .app import run_translation

    try:
        if args[0] == "--import":
            from .model_store import import_model

            info = import_model(args[1])
            _say(model={"name": info.name, "path": str(info.path)})
            return 0
        request = read_request(args[0])
        outcome = run_translation(
            request, progress=lambda done, total, eta: _say(done=done, total=total, eta=eta, message="Translating"),
            message=lambda text: _say(message=text))
        write_result(outcome, args[0])
    except (ValueError, OSError, KeyError, RuntimeError, MemoryError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        _say(error=readable_error(exc))
        return 2
    _say(state="done")
    return 0


def _child_env() -> dict[str, str]:
    """This environment with the library on ``PYTHONPATH`` (the child imports this copy of it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_LIBRARY_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


#: What the panel offers before (or without) an answer of ``DeviceQuery``.
DEFAULT_DEVICE_CHOICES: tuple[tuple[str, str], ...] = (("Auto", "auto"), ("CPU", "cpu"))


class RunnerQuery:
    """One short runner command (``--devices``, ``--import PATH``) in a process of its own,
    polled: the asking side (the Slicer panel's GUI thread) imports no torch and never waits.

    ``poll()`` is None while the process runs, then the answer: the value under ``key`` of its
    JSON line. When the process fails, ``error`` is one line (the runner's own ``{"error"}``
    line, else ``failure`` and the last line of its stderr) and the answer is ``fallback``.
    """

    def __init__(self, args: Sequence[str], key: str, *, python: str | None = None, failure: str = "failed",
                 fallback: Any = None) -> None:
        self.args, self.key, self.failure, self.fallback = list(args), key, failure, fallback
        self.python = python or sys.executable
        self.error: str | None = None
        self.done = False
        self._answer: Any = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> RunnerQuery:
        try:
            self._proc = subprocess.Popen([self.python, "-m", "MedTranslateLib.runner", *self.args],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          text=True, encoding="utf-8", errors="replace", env=_child_env())
        except OSError as exc:
            self._fail(f"{self.failure}: cannot start {self.python} ({exc.strerror or exc})")
        return self

    def poll(self) -> Any:
        proc = self._proc
        if not self.done and proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            answer, said = None, None
            for line in out.splitlines():
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a library printing to stdout: not ours
                if isinstance(msg, dict):
                    answer = msg.get(self.key, answer)
                    said = msg.get("error", said)
            if proc.returncode == 0 and answer is not None:
                self._answer, self.done = self._convert(answer), True
            elif said is not None:
                self._fail(str(said))
            else:
                last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                self._fail(f"{self.failure}: {last}")
        return self._answer if self.done else None

    def wait(self, timeout: float | None = None) -> Any:
        if self._proc is not None and not self.done:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.poll()

    def _convert(self, answer: Any) -> Any:
        return answer

    def _fail(self, message: str) -> None:
        self.error, self._answer, self.done = message, self.fallback, True


class DeviceQuery(RunnerQuery):
    """The device choices ``[(label, device spec)]`` (``runtime.device_choices``), asked of a
    process; ``DEFAULT_DEVICE_CHOICES`` when it fails."""

    def __init__(self, python: str | None = None) -> None:
        super().__init__(["--devices"], "devices", python=python, failure="cannot list the GPUs",
                         fallback=list(DEFAULT_DEVICE_CHOICES))

    def _convert(self, answer: Any) -> list[tuple[str, str]]:
        return [(str(label), str(spec)) for label, spec in answer]


class ImportQuery(RunnerQuery):
    """``model_store.import_model(path)`` (the bundle is loaded to check it: torch) in a process;
    the answer is ``{"name", "path"}`` of the stored model, None with ``error`` when it fails."""

    def __init__(self, path: str | os.PathLike, python: str | None = None) -> None:
        super().__init__(["--import", str(path)], "model", python=python, failure=f"{path}: cannot add the model")


class TranslationProcess(JobBase):
    """One translation in its own process, polled from the GUI thread like ``worker.Job``.

    ``python``: the interpreter to run (``PythonSlicer`` in Slicer; default: this one).
    ``cancel()`` kills the process at once; ``result`` is a ``ProcessResult``.
    """

    def __init__(self, request: TranslationRequest, *, python: str | None = None,
                 name: str = "MedTranslate translation") -> None:
        super().__init__(name)
        self.request = request
        self.python = python or sys.executable
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._folder: Path | None = None

    # -- control --------------------------------------------------------------------------------
    def start(self) -> TranslationProcess:
        with self._lock:
            if self._proc is not None or self._state is not JobState.PENDING:
                raise RuntimeError(f"{self.name}: already started")
            self._state = JobState.RUNNING
            self.started_at = time.monotonic()
        self._folder = Path(tempfile.mkdtemp(prefix="medtranslate-run-"))
        try:
            write_request(self.request, self._folder)
            self._proc = subprocess.Popen([self.python, "-m", "MedTranslateLib.runner", str(self._folder)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          text=True, encoding="utf-8", errors="replace", env=_child_env())
        except BaseException as exc:  # kept for the GUI, like worker.Job
            self._finish(JobState.FAILED, error=exc)
            return self
        self._reader = threading.Thread(target=self._read, name=self.name, daemon=True)
        self._reader.start()
        return self

    def cancel(self) -> None:
        """End the process now (nothing is read back; the state becomes CANCELLED)."""
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        elif proc is None:
            self._finish(JobState.CANCELLED)

    def wait(self, timeout: float | None = None) -> JobState:
        if self._reader is not None:
            self._reader.join(timeout)
        return self.poll()

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        error_line = None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing to stdout: not ours
            if not isinstance(msg, dict):
                continue
            if "error" in msg:
                error_line = str(msg["error"])
            if "done" in msg:
                self._report(msg["done"], msg.get("total", 0), msg.get("eta"), msg.get("message"))
            elif "message" in msg:
                self.set_message(str(msg["message"]))
        rc = proc.wait()
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        if self._cancel.is_set():
            self._finish(JobState.CANCELLED)
        elif rc == 0:
            try:
                self._result = read_result(self._folder)
                self._finish(JobState.DONE)
            except (OSError, ValueError, KeyError) as exc:
                self._finish(JobState.FAILED, error=RuntimeError(f"cannot read the translation's result ({exc})"),
                             details=stderr)
        else:
            if error_line is not None:  # the process said what was wrong, in one line
                self._finish(JobState.FAILED, error=UserError(error_line), details=stderr)
            else:
                text = (f"the translation process stopped unexpectedly (exit status {rc}"
                        f"{', killed by signal ' + str(-rc) if rc < 0 else ''}); nothing was added")
                self._finish(JobState.FAILED, error=RuntimeError(text), details=stderr)

    def _finish(self, state: JobState, *, error: BaseException | None = None, details: str = "") -> None:
        with self._lock:
            self._state = state
            self._error = error
            self._details = details
            self.finished_at = time.monotonic()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
