"""The web session's logic without a browser: uploads (files, DICOM zips, bad input), the model
list, the metrics rows and the NIfTI download."""

from __future__ import annotations

import io
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import session  # noqa: E402

from MedTranslateLib import app  # noqa: E402
from MedTranslateLib import io as mio  # noqa: E402
from MedTranslateLib.worker import JobState  # noqa: E402


def _volume(shape=(6, 10, 12)) -> mio.Volume:
    rng = np.random.default_rng(0)
    return mio.Volume(rng.normal(0, 100, shape).astype(np.float32), spacing=(1.0, 1.5, 2.5),
                      origin=(3.0, -2.0, 7.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_nifti_upload_keeps_voxels_and_geometry(tmp_path):
    vol = _volume()
    mio.write_volume(vol, tmp_path / "scan.nii.gz")
    loaded = session.read_upload("C:\\Users\\me\\scan.nii.gz", (tmp_path / "scan.nii.gz").read_bytes())
    assert loaded.case.name == "scan.nii.gz" and loaded.modality is None
    np.testing.assert_allclose(loaded.case.source.array, vol.array, atol=1e-4)
    assert loaded.case.source.same_geometry(vol)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_dicom_zip_upload_reads_the_series_and_its_modality(tmp_path):
    vol = _volume()
    mio.write_volume(vol, tmp_path / "series", modality="CT")
    files = {f"study/series/{p.name}": p.read_bytes() for p in sorted((tmp_path / "series").iterdir())}
    loaded = session.read_upload("study.zip", _zip(files))
    assert loaded.modality == "ct"
    assert loaded.case.source.shape == vol.shape
    np.testing.assert_allclose(loaded.case.source.array, vol.array, atol=0.5)  # DICOM stores rescaled integers
    assert {m["value"] for m in session.model_items(loaded.modality)} >= {"pix2pix_ct_cta_demo"}
    assert "dgpg_t1_ct_demo" not in {m["value"] for m in session.model_items(loaded.modality)}


@pytest.mark.parametrize("name, content, expected", [
    ("notes.txt", b"hello", "notes.txt: not a volume file"),
    ("evil.zip", _zip({"../outside.dcm": b"x"}), "evil.zip: the zip file has a member outside its folder"),
    ("empty.zip", _zip({}), "empty.zip: the zip file is empty"),
    ("broken.zip", b"PK not really", "broken.zip: not a readable zip file"),
    ("broken.nii.gz", b"\x1f\x8b garbage", "broken.nii.gz: "),
])
def test_bad_uploads_are_one_line_user_errors(tmp_path, name, content, expected):
    with pytest.raises(app.UserError) as err:
        session.read_upload(name, content)
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message and "medtranslate-web-" not in message


def _finish(job, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not job.finished:
        assert time.monotonic() < deadline, "the translation process did not finish"
        time.sleep(0.1)
        job.poll()
    return job.poll()


def test_a_run_in_its_own_process_gives_the_library_result(tmp_path):
    loaded = session.sample_case()
    options = app.TranslationOptions(model="pix2pix_ct_cta_demo", seed=0, slices=app.ALL_ROIS)
    job = session.start(loaded, options)
    assert _finish(job) is JobState.DONE, job.error_details
    result = job.result
    expected = app.run_translation(app.TranslationRequest(loaded.case, options)).result
    rows = {r["region"]: r for r in session.metrics_rows(result)}
    assert set(rows) == set(expected.metrics)
    liver = expected.metrics["liver"]
    assert abs(float(rows["liver"]["mae"]) - liver["mae"]) <= 0.0101
    assert abs(float(rows["liver"]["ssim"]) - liver["ssim"]) <= 0.000101
    assert session.confidence_rows(result) == []  # pix2pix gives no per-slice confidence
    path = session.result_nifti(result, tmp_path)
    assert path.name == "synthetic_cta_arterial_pix2pix_ct_cta_demo.nii.gz"
    back = mio.read_volume(path)
    np.testing.assert_allclose(back.array, expected.synthetic.array, atol=1e-2)
    assert back.same_geometry(loaded.case.source)


def test_cancel_ends_the_process_and_keeps_nothing():
    job = session.start(session.sample_case(), app.TranslationOptions(model="resshift_ct_cta_demo", num_samples=64))
    time.sleep(1.0)
    job.cancel()
    assert _finish(job, 10) is JobState.CANCELLED


def test_only_loopback_serving_goes_without_a_warning():
    from server import host_warning

    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "no authentication" in host_warning("0.0.0.0")


def test_confidence_rows_name_the_volume_slices():
    from types import SimpleNamespace

    result = SimpleNamespace(confidence=np.array([0.5, 0.25, 1.0]), slice_range=(10, 13))
    assert session.confidence_rows(result) == [{"slice": "10", "confidence": "0.500"},
                                               {"slice": "11", "confidence": "0.250"},
                                               {"slice": "12", "confidence": "1.000"}]


def test_device_items_keep_the_spec_as_the_value():
    from MedTranslateLib.runner import DEFAULT_DEVICE_CHOICES

    items = session.device_items([*DEFAULT_DEVICE_CHOICES, ("GPU 0: H200 (139 GB)", "cuda:0")])
    assert [i["value"] for i in items] == ["auto", "cpu", "cuda:0"]
    assert items[2]["title"] == "GPU 0: H200 (139 GB)"
