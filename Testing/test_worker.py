"""MedTranslateLib.worker: the background job the Slicer module polls from a QTimer (no Qt needed).

Synchronisation uses events, never sleeps or timing assertions.
"""

from __future__ import annotations

import threading

import pytest

from MedTranslateLib.worker import Job, JobState, Progress, format_duration

WAIT = 30  # seconds; only a bound for a hung test, never reached when the code works


def test_job_runs_reports_progress_and_returns_result():
    reached = threading.Event()
    go_on = threading.Event()

    def work(progress, cancelled):
        progress(0, 4)
        progress(2, 4, 3.0, "Translating")
        reached.set()
        assert go_on.wait(WAIT)
        progress(4, 4, 0.0)
        return "synthetic"

    job = Job(work, name="test")
    assert job.poll() is JobState.PENDING and not job.finished
    job.start()
    assert reached.wait(WAIT)
    assert job.poll() is JobState.RUNNING
    assert job.progress == Progress(2, 4, 3.0, "Translating")
    assert job.progress.text() == "Translating: 2/4 slices, ETA 0:03"
    with pytest.raises(RuntimeError, match="state running"):
        _ = job.result
    go_on.set()
    assert job.wait(WAIT) is JobState.DONE
    assert job.result == "synthetic" and job.error is None and job.error_details == ""
    assert job.progress.done == 4 and job.progress.message == "Translating"  # message kept
    assert job.elapsed >= 0
    with pytest.raises(RuntimeError, match="already started"):
        job.start()


def test_failure_is_kept_not_raised():
    def work(progress, cancelled):
        raise ValueError("case.nii: file not found")

    job = Job(work).start()
    assert job.wait(WAIT) is JobState.FAILED
    assert isinstance(job.error, ValueError) and str(job.error) == "case.nii: file not found"
    assert "Traceback" in job.error_details and "case.nii: file not found" in job.error_details
    with pytest.raises(RuntimeError, match="state failed"):
        _ = job.result


class Stop(Exception):
    pass


def test_cancel_is_seen_by_the_work_and_ends_cancelled():
    started = threading.Event()
    batches = []

    def work(progress, cancelled):
        started.set()
        for i in range(1000):
            if cancelled():
                raise Stop
            batches.append(i)
            if i == 2:
                assert cancel_sent.wait(WAIT)
        return "never"

    cancel_sent = threading.Event()
    job = Job(work, cancelled_exceptions=(Stop,)).start()
    assert started.wait(WAIT)
    job.cancel()
    assert job.cancel_requested
    cancel_sent.set()
    assert job.wait(WAIT) is JobState.CANCELLED
    assert batches == [0, 1, 2]  # stopped at the next check
    assert isinstance(job.error, Stop)
    with pytest.raises(RuntimeError, match="state cancelled"):
        _ = job.result


def test_result_of_a_cancelled_job_is_discarded():
    """The work ignored the cancel and finished: the caller must still add nothing."""
    release = threading.Event()

    def work(progress, cancelled):
        assert release.wait(WAIT)
        return "late result"

    job = Job(work).start()
    job.cancel()
    release.set()
    assert job.wait(WAIT) is JobState.CANCELLED
    assert job.error is None
    with pytest.raises(RuntimeError):
        _ = job.result


def test_cancel_before_start():
    job = Job(lambda progress, cancelled: "x" if not cancelled() else (_ for _ in ()).throw(Stop()),
              cancelled_exceptions=(Stop,))
    job.cancel()
    assert job.start().wait(WAIT) is JobState.CANCELLED


def test_set_message_and_progress_text():
    job = Job(lambda progress, cancelled: None)
    assert job.progress.text() == "Starting…"
    job.set_message("Loading model")
    assert job.progress.text() == "Loading model"
    assert Progress(3, 3, None, "").text() == "3/3 slices"
    assert Progress(1, 4, None).text("cases") == "1/4 cases, ETA ?"
    assert Progress(1, 4).fraction == 0.25 and Progress().fraction == 0.0


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (75.2, "1:15"), (3725, "1:02:05"), (None, "?"),
                                               (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_job_state_finished():
    assert [s.finished for s in JobState] == [False, False, True, True, True]
