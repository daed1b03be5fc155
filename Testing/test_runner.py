"""The translation process (``MedTranslateLib.runner``): end to end outside Slicer -- progress
lines, the same result as in-process, cancel kills it, a crash or a bad request is one message."""

from __future__ import annotations

import os
import stat
import sys
import time

import numpy as np
import pytest
import torch

from MedTranslateLib import app, io, phantom, runner
from MedTranslateLib.bundle import save_bundle
from MedTranslateLib.methods import build_method
from MedTranslateLib.worker import JobState


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    method = build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 6}, "test_time_dropout": True})
    meta = {"source": {"modality": "ct", "preset": "ct_wide"}, "target": {"modality": "cta_arterial", "preset": "ct_wide"},
            "slice": {"size": 64, "axis": 0}}
    return save_bundle(method, meta, tmp_path_factory.mktemp("b") / "tiny")


@pytest.fixture(scope="module")
def case():
    ph = phantom.generate_case(5, phantom.PhantomConfig(shape=(16, 40, 40), spacing=(6.0, 6.0, 8.0),
                                                        tumor_count=(1, 1)))
    return app.phantom_case(ph, "ct", "cta_arterial")


def request(bundle, case, **options):
    return app.TranslationRequest(case, app.TranslationOptions(model=str(bundle), device="cpu", seed=3,
                                                               batch_size=4, **options))


def test_request_files_round_trip(bundle, case, tmp_path):
    req = request(bundle, case, slices=(2, 9), num_samples=2)
    back = runner.read_request(runner.write_request(req, tmp_path))
    assert back.options == req.options and back.case.name == case.name
    assert set(back.case.masks) == set(case.masks)
    for name in case.masks:
        np.testing.assert_array_equal(back.case.masks[name], case.masks[name])
    np.testing.assert_array_equal(back.case.source.array, case.source.array)
    assert back.case.source.same_geometry(case.source, atol=1e-6)


def test_process_gives_the_in_process_result_with_progress(bundle, case):
    req = request(bundle, case, num_samples=2)
    job = runner.TranslationProcess(req).start()
    assert job.wait(180) is JobState.DONE, (job.error, job.error_details)
    res = job.result
    direct = app.run_translation(req).result
    np.testing.assert_array_equal(res.synthetic.array, direct.synthetic.array)
    np.testing.assert_array_equal(res.uncertainty.array, direct.uncertainty.array)
    assert res.synthetic.same_geometry(case.source, atol=1e-6)
    assert res.metrics.keys() == direct.metrics.keys() and res.uncertainty_kind == "std"
    assert res.model == {"name": "tiny", "method": "pix2pix", "source": "ct", "target": "cta_arterial"}
    assert job.progress.done == job.progress.total == case.source.shape[0]


def test_cancel_kills_the_process(bundle, case):
    job = runner.TranslationProcess(request(bundle, case)).start()
    deadline = time.monotonic() + 60
    while not job.progress.message and time.monotonic() < deadline:  # the process is up
        time.sleep(0.05)
    t0 = time.monotonic()
    job.cancel()
    state = job.wait(10)
    took = time.monotonic() - t0
    print(f"cancel -> process ended in {took:.3f} s")
    assert state is JobState.CANCELLED and job._proc.poll() is not None
    with pytest.raises(RuntimeError):
        _ = job.result


def test_a_bad_request_is_one_message(case, tmp_path):
    job = runner.TranslationProcess(request(tmp_path / "no_such_bundle", case)).start()
    assert job.wait(120) is JobState.FAILED
    text = app.readable_error(job.error)
    assert "no_such_bundle" in text and "\n" not in text and "Traceback" not in text


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for a crashing interpreter")
@pytest.mark.parametrize("how, expect", [("exit 3", "exit status 3"), ("kill -9 $$", "killed by signal 9")])
def test_a_crashed_process_is_one_message(bundle, case, tmp_path, how, expect):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{how}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    job = runner.TranslationProcess(request(bundle, case), python=str(fake)).start()
    assert job.wait(30) is JobState.FAILED
    text = app.readable_error(job.error)
    assert expect in text and "nothing was added" in text


def test_the_runner_command_line(bundle, case, tmp_path, capsys):
    folder = runner.write_request(request(bundle, case, slices=(4, 8)), tmp_path / "req")
    assert runner.main([str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == '{"state": "done"}' and any('"done": 4' in ln for ln in lines)
    res = runner.read_result(folder)
    assert res.slice_range == (4, 8) and isinstance(res.synthetic, io.Volume)
    assert runner.main([]) == 2


def test_reading_a_request_and_result_imports_no_torch(bundle, case, tmp_path):
    """The GUI side (write the request, read the result) works without torch."""
    import subprocess

    folder = runner.write_request(request(bundle, case), tmp_path / "req")
    runner.write_result(app.run_translation(request(bundle, case)), folder)
    code = ("import sys; from MedTranslateLib import runner; runner.read_request(sys.argv[1]); "
            "runner.read_result(sys.argv[1]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_add_model_is_checked_and_copied_in_a_process(bundle, tmp_path, monkeypatch):
    """``runner --import``: the Slicer panel's Add model, with torch only in the process."""
    from pathlib import Path

    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    query = runner.ImportQuery(bundle).start()
    answer = query.wait(120)
    assert query.error is None and answer["name"] == Path(bundle).name
    assert (Path(answer["path"]) / "model.safetensors").is_file()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "medtranslate.yaml").write_text("format_version: 1\nmethod: no_such_method\n")
    (broken / "model.safetensors").write_bytes(b"not weights")
    failed = runner.ImportQuery(broken).start()
    assert failed.wait(120) is None and failed.done
    assert "no_such_method" in failed.error and "\n" not in failed.error
    assert not (tmp_path / "home" / "models" / "broken").exists()  # nothing copied
    assert runner.main(["--import"]) == 2  # usage
