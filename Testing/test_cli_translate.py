"""``medtranslate translate``: single volumes, folders of cases, sharding, and every bad input
ending in one error line, a non-zero exit code and no output file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_engine import ct_volume, make_bundle

from MedTranslateLib import cli, io


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("cli") / "p2p")


@pytest.fixture
def case(tmp_path):
    """ct, liver, tumor, cta_arterial (reference) of one small oblique case."""
    folder = tmp_path / "in"
    vol = ct_volume(shape=(9, 40, 48))
    liver = np.zeros(vol.shape, np.float32)
    liver[2:7, 15:30, 10:30] = 1
    tumor = np.zeros(vol.shape, np.float32)
    tumor[3:5, 18:24, 15:21] = 1
    io.write_volume(vol, folder / "ct.nii.gz")
    io.write_volume(vol.with_array(liver), folder / "liver.nii.gz")
    io.write_volume(vol.with_array(tumor), folder / "tumor.nii.gz")
    io.write_volume(vol.with_array(vol.array + 40), folder / "cta_arterial.nii.gz")
    return folder


def run(args, capsys):
    code = cli.main(["translate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


def test_single_volume_with_all_outputs(bundle, case, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["--model", bundle, "--input", case / "ct.nii.gz", "--output", out / "syn.nrrd",
                             "--liver", case / "liver.nii.gz", "--tumor", case / "tumor.nii.gz",
                             "--reference", case / "cta_arterial.nii.gz", "--difference", out / "diff.nii.gz",
                             "--uncertainty", out / "unc.mha", "--num-samples", "2", "--metrics", out / "m.json",
                             "--device", "cpu", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert files_under(out) == ["diff.nii.gz", "m.json", "syn.nrrd", "unc.mha"]
    src = io.read_volume(case / "ct.nii.gz")
    for name in ("syn.nrrd", "diff.nii.gz", "unc.mha"):
        assert io.read_volume(out / name).same_geometry(src, atol=1e-4)
    doc = json.loads((out / "m.json").read_text())
    assert set(doc["metrics"]) == {"whole", "body", "liver", "tumor"}
    assert set(doc["identity"]) == set(doc["metrics"])
    assert doc["info"]["batch_size"] == 4 and doc["info"]["num_samples"] == 2
    assert "synthetic:" in stdout and "liver" in stdout


def test_masks_by_roi_name_and_roi_slices(bundle, case, tmp_path, capsys):
    """--mask NAME=FILE names a mask by the model's ROI name; --roi NAME translates the slices of
    that mask's extent +- --extent-margin; metrics cover exactly the ROIs given."""
    out = tmp_path / "out"
    code, _, err = run(["--model", bundle, "--input", case / "ct.nii.gz", "--output", out / "syn.nii.gz",
                        "--mask", f"tumor={case / 'tumor.nii.gz'}", "--roi", "tumor", "--extent-margin", "0",
                        "--reference", case / "cta_arterial.nii.gz", "--metrics", out / "m.json", "--device", "cpu"],
                       capsys)
    assert code == 0, err
    doc = json.loads((out / "m.json").read_text())
    assert list(doc["metrics"]) == ["whole", "body", "tumor"]
    z = np.flatnonzero(io.read_volume(case / "tumor.nii.gz").array.any(axis=(1, 2)))
    assert doc["slice_range"] == [int(z[0]), int(z[-1]) + 1]


def test_same_seed_same_file(bundle, case, tmp_path, capsys):
    args = ["--model", bundle, "--input", case / "ct.nii.gz", "--device", "cpu", "--seed", "7", "--output"]
    assert run([*args, tmp_path / "a.nii.gz"], capsys)[0] == 0
    assert run([*args, tmp_path / "b.nii.gz"], capsys)[0] == 0
    np.testing.assert_array_equal(io.read_volume(tmp_path / "a.nii.gz").array,
                                  io.read_volume(tmp_path / "b.nii.gz").array)


def test_slices_option(bundle, case, tmp_path, capsys):
    out = tmp_path / "s.nii.gz"
    code, _, err = run(["--model", bundle, "--input", case / "ct.nii.gz", "--output", out, "--device", "cpu",
                        "--slices", "2:5", "--difference", tmp_path / "d.nii.gz"], capsys)
    assert code == 0, err
    diff = io.read_volume(tmp_path / "d.nii.gz").array
    assert (diff[:2] == 0).all() and (diff[5:] == 0).all() and np.abs(diff[2:5]).max() > 0
    code, _, err = run(["--model", bundle, "--input", case / "ct.nii.gz", "--output", tmp_path / "r.nii.gz",
                        "--device", "cpu", "--roi", "tumor", "--tumor", case / "tumor.nii.gz"], capsys)
    assert code == 0, err


def make_cases(root, names, *, bad=None):
    for i, name in enumerate(names):
        folder = root / name
        vol = ct_volume(shape=(7 + i, 40, 48))
        io.write_volume(vol, folder / "ct.nii.gz")
        io.write_volume(vol.with_array(vol.array + 40), folder / "cta_arterial.nii.gz")
        liver = np.zeros(vol.shape, np.float32)
        liver[2:5, 15:30, 10:30] = 1
        io.write_volume(vol.with_array(liver), folder / "liver.nii.gz")
    if bad:
        arr = np.zeros((7, 40, 48), np.float32)
        arr[3, 3, 3] = np.nan
        (root / bad).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / bad / "ct.mha"))  # (io checks NIfTI NaN itself too)


def test_folder_of_cases_runs_as_a_batch_and_a_failed_case_leaves_nothing(bundle, tmp_path, capsys):
    root, out = tmp_path / "cases", tmp_path / "out"
    make_cases(root, ["a", "c"], bad="b")
    code, stdout, err = run(["--model", bundle, "--input", root, "--output", out, "--device", "cpu"], capsys)
    assert code == 2
    assert files_under(out) == ["a", "a/cta_arterial_synthetic.nii.gz", "a/difference.nii.gz", "a/metrics.json",
                                "a/reference_difference.nii.gz", "c", "c/cta_arterial_synthetic.nii.gz",
                                "c/difference.nii.gz", "c/metrics.json", "c/reference_difference.nii.gz"]
    assert err.count("error:") == 2 and "b:" in err and "non-finite" in err
    assert "a: " in stdout and "c: " in stdout
    doc = json.loads((out / "a" / "metrics.json").read_text())
    assert doc["case"] == "a" and "liver" in doc["metrics"] and "liver" in doc["identity"]
    a = io.read_volume(out / "c" / "cta_arterial_synthetic.nii.gz")
    assert a.same_geometry(io.read_volume(root / "c" / "ct.nii.gz"))


def test_folder_of_volume_files(bundle, tmp_path, capsys):
    root, out = tmp_path / "vols", tmp_path / "out"
    vol = ct_volume()
    for name in ("p1", "p2"):
        io.write_volume(vol, root / f"{name}.nrrd")
    code, _, err = run(["--model", bundle, "--input", root, "--output", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert (out / "p1" / "cta_arterial_synthetic.nii.gz").exists() and (out / "p2" / "difference.nii.gz").exists()


def test_torchrun_environment_shards_the_cases(bundle, tmp_path, capsys, monkeypatch):
    root, out = tmp_path / "cases", tmp_path / "out"
    make_cases(root, ["a", "b", "c"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, stdout, err = run(["--model", bundle, "--input", root, "--output", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["b"]
    assert "1 of 3 case(s) on rank 1/2" in stdout


def _write_2d(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 48), np.float32)), str(path))


def _write_nan(path):
    arr = ct_volume().array.copy()
    arr[2, 3, 4] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def _write_far_mask(path):
    vol = ct_volume(shape=(9, 40, 48))
    io.write_volume(io.Volume(np.ones(vol.shape), vol.spacing, (9000.0, 0.0, 0.0), vol.direction), path)


@pytest.mark.parametrize("problem, expect", [
    ("missing file", "file not found"),
    ("2-D image", "2-D"),
    ("NaN voxels", "non-finite"),
    ("mask elsewhere", "does not overlap"),
    ("unknown device", "unknown device"),
    ("unavailable device", "cuda:7"),
    ("not a bundle", "not a bundle"),
    ("broken bundle", "weights do not match"),
    ("output is input", "would overwrite or change the input"),
    ("bad output extension", "unsupported output extension"),
    ("uncertainty undefined", "defines no uncertainty"),
    ("metrics without reference", "needs --reference"),
    ("mask option for a folder", "applies to a single input"),
    ("mask without a name", "--mask must be NAME=FILE"),
    ("roi the model lacks", "the model's ROI masks are liver, tumor"),
])
def test_bad_input_one_line_nonzero_no_output(problem, expect, bundle, case, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    source, model, device = case / "ct.nii.gz", bundle, "cpu"
    output = out_dir / "syn.nii.gz"
    extra: list = []
    if problem == "missing file":
        source = case / "nope.nii.gz"
    elif problem == "2-D image":
        source = tmp_path / "flat.nii.gz"
        _write_2d(source)
    elif problem == "NaN voxels":
        source = tmp_path / "nan.mha"  # ITK's NIfTI I/O does not keep NaN
        _write_nan(source)
    elif problem == "mask elsewhere":
        _write_far_mask(tmp_path / "far.nii.gz")
        extra = ["--liver", tmp_path / "far.nii.gz"]
    elif problem == "unknown device":
        device = "gpu0"
    elif problem == "unavailable device":
        device = "cuda:7"
    elif problem == "not a bundle":
        model = case
    elif problem == "broken bundle":
        model = tmp_path / "broken"
        model.mkdir()
        (model / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
        text = (bundle / "medtranslate.yaml").read_text().replace("ngf: 4", "ngf: 8")
        (model / "medtranslate.yaml").write_text(text)
    elif problem == "output is input":
        output = source
    elif problem == "bad output extension":
        output = out_dir / "syn.png"
    elif problem == "uncertainty undefined":
        extra = ["--uncertainty", out_dir / "u.nii.gz"]
    elif problem == "metrics without reference":
        extra = ["--metrics", out_dir / "m.json"]
    elif problem == "mask option for a folder":
        source = case
        output = out_dir / "cases"
        extra = ["--liver", case / "liver.nii.gz"]
    elif problem == "mask without a name":
        extra = ["--mask", case / "liver.nii.gz"]
    elif problem == "roi the model lacks":
        extra = ["--roi", "spleen"]
    before = files_under(case)
    code, stdout, err = run(["--model", model, "--input", source, "--output", output, "--device", device,
                             *extra], capsys)
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medtranslate: error:"), err
    assert expect in lines[0]
    assert files_under(out_dir) == []
    assert files_under(case) == before


# --------------------------------------------------------------------------- issue 13: inputs are never touched


def _digest(path):
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_no_output_may_replace_or_change_an_input(bundle, case, tmp_path, capsys):
    scans = tmp_path / "scans"
    io.write_volume(ct_volume(shape=(9, 40, 48)), scans)  # a DICOM series folder
    one_slice = sorted(scans.iterdir())[4]
    header = tmp_path / "hdr" / "in.mhd"
    io.write_volume(ct_volume(shape=(9, 40, 48)), header)  # voxels in hdr/in.zraw
    shared = tmp_path / "hdr" / "syn.mhd"
    shared.write_text(header.read_text().replace("in.zraw", "syn.zraw"))  # an input whose data is syn.zraw
    (tmp_path / "hdr" / "in.zraw").rename(tmp_path / "hdr" / "syn.zraw")
    attempts = {
        "a slice of a series, written over its folder": ["--input", one_slice, "--output", scans],
        "the series itself as the output folder": ["--input", scans, "--output", scans],
        "an output inside the input series": ["--input", scans, "--output", scans / "syn.nii.gz"],
        "the data file of an .mhd input": ["--input", shared, "--output", tmp_path / "hdr" / "syn.mhd"],
        "another header over that data file": ["--input", shared, "--output", tmp_path / "hdr" / "in2.mhd",
                                               "--difference", tmp_path / "hdr" / "syn.mhd"],
        "the difference over a mask": ["--input", case / "ct.nii.gz", "--output", tmp_path / "o.nii.gz",
                                       "--liver", case / "liver.nii.gz", "--difference", case / "liver.nii.gz"],
        "the metrics over the reference": ["--input", case / "ct.nii.gz", "--output", tmp_path / "o.nii.gz",
                                               "--reference", case / "cta_arterial.nii.gz",
                                               "--metrics", case / "cta_arterial.nii.gz"],
        "an output inside the model": ["--input", case / "ct.nii.gz", "--output", bundle / "syn.nii.gz"],
    }
    watched = [scans, tmp_path / "hdr", case, bundle]
    before = {str(w): _digest(w) for w in watched}
    for what, args in attempts.items():
        code, stdout, err = run(["--model", bundle, *args, "--device", "cpu"], capsys)
        assert code == 2, what
        assert len(err.strip().splitlines()) == 1 and ("input" in err or "is an input" in err), (what, err)
    assert {str(w): _digest(w) for w in watched} == before
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_batch_never_writes_into_its_input_or_model(bundle, tmp_path, capsys):
    root = tmp_path / "cases"
    make_cases(root, ["a", "b"])
    before = _digest(root)
    for out in (root, root / "out", tmp_path):
        code, _, err = run(["--model", bundle, "--input", root, "--output", out, "--device", "cpu"], capsys)
        assert code == 2 and "must be outside --input" in err and len(err.strip().splitlines()) == 1
    assert _digest(root) == before


def test_a_failed_rerun_keeps_the_previous_outputs(bundle, case, tmp_path, capsys):
    out, diff = tmp_path / "syn.nii.gz", tmp_path / "diff.nii.gz"
    base = ["--model", bundle, "--input", case / "ct.nii.gz", "--output", out, "--device", "cpu"]
    assert run([*base, "--difference", diff], capsys)[0] == 0
    before = {p: p.read_bytes() for p in (out, diff)}
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    code, _, err = run([*base, "--seed", "5", "--difference", tmp_path / "blocker" / "diff.nii.gz"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (out, diff)} == before  # the first output was not replaced either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "diff.nii.gz", "in", "syn.nii.gz"]


def test_a_bad_case_in_a_batch_is_reported_and_the_others_are_written(bundle, tmp_path, capsys):
    import gzip

    root, out = tmp_path / "cases", tmp_path / "out"
    make_cases(root, ["a", "c"])
    for name, damage in (("b", "truncated gzip"), ("d", "header only")):
        (root / name).mkdir()
        data = gzip.decompress((root / "a" / "ct.nii.gz").read_bytes())
        if damage == "truncated gzip":
            packed = gzip.compress(data)
            (root / name / "ct.nii.gz").write_bytes(packed[: len(packed) // 2])
        else:
            (root / name / "ct.nii").write_bytes(data[:352])
    code, stdout, err = run(["--model", bundle, "--input", root, "--output", out, "--device", "cpu"], capsys)
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["a", "c"]
    lines = err.strip().splitlines()
    assert lines[0].startswith("medtranslate: error: b: ") and "gzip stream is truncated" in lines[0]
    assert lines[1].startswith("medtranslate: error: d: ") and "truncated" in lines[1]
    assert lines[2] == "medtranslate: error: 2 of 4 case(s) failed"


@pytest.mark.parametrize("args, expect", [
    (["--seed", str(2**63)], "--seed: 9223372036854775808 is outside 0..9223372036854775807"),
    (["--seed", "-1"], "--seed: -1 is outside"),
    (["--seed", "abc"], "--seed: 'abc' is not an integer"),
    (["--num-samples", "0"], "--num-samples: 0 is outside"),
    (["--steps", "0"], "--steps: 0 is outside"),
    (["--extent-margin", "-3"], "--roi-margin: -3 is outside"),
])
def test_bad_numbers_are_one_line(args, expect, bundle, case, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["translate", "--model", str(bundle), "--input", str(case / "ct.nii.gz"),
                  "--output", str(tmp_path / "o.nii.gz"), *args])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def test_threads_and_compression_level_options(bundle, case, tmp_path, capsys):
    import torch

    base = ["--model", bundle, "--input", case / "ct.nii.gz", "--device", "cpu", "--seed", "1"]
    before = torch.get_num_threads()
    try:
        assert run([*base, "--output", tmp_path / "fast.nrrd", "--compression-level", "1", "--threads", "1"],
                   capsys)[0] == 0
        assert torch.get_num_threads() == 1
        assert run([*base, "--output", tmp_path / "small.nrrd", "--compression-level", "9"], capsys)[0] == 0
    finally:
        torch.set_num_threads(before)
    fast, small = tmp_path / "fast.nrrd", tmp_path / "small.nrrd"
    assert fast.stat().st_size > small.stat().st_size
    np.testing.assert_array_equal(io.read_volume(fast).array, io.read_volume(small).array)
    for bad in (["--threads", "0"], ["--compression-level", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["translate", *map(str, base), "--output", str(tmp_path / "x.nii.gz"), *bad])
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_translate_and_demo_show_the_per_slice_confidence(case, tmp_path, capsys):
    from test_engine import make_rlbcd_bundle

    from MedTranslateLib import maps

    model = make_rlbcd_bundle(tmp_path / "rl")
    out = tmp_path / "out"
    code, stdout, err = run(["--model", model, "--input", case / "ct.nii.gz", "--output", out / "syn.nii.gz",
                             "--reference", case / "cta_arterial.nii.gz", "--metrics", out / "m.json",
                             "--num-samples", "2", "--slices", "2:7", "--device", "cpu", "--seed", "5"], capsys)
    assert code == 0, err
    doc = json.loads((out / "m.json").read_text())["confidence"]
    conf = np.array([np.nan if c is None else c for c in doc["per_slice"]])
    assert np.isfinite(conf).sum() == 5 and np.isnan(conf[:2]).all() and np.isnan(conf[7:]).all()
    [line] = [x for x in stdout.splitlines() if x.startswith("confidence:")]
    assert line == maps.confidence_line(maps.confidence_summary(conf))
    assert f"min {np.nanmin(conf):.2f} over 5 slices; lowest: slice {int(np.nanargmin(conf))} (" in line
    # a method without confidence prints no such line
    code, stdout, err = run(["--model", make_bundle(tmp_path / "p2p"), "--input", case / "ct.nii.gz",
                             "--output", out / "p2p.nii.gz", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "synthetic:" in stdout and "confidence" not in stdout
    # the demo: the confidence line, in metrics.json and a plot row under the figure's views
    demo = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(demo), "--shape", "16", "40", "40", "--device", "cpu",
                     "--model", str(model)]) == 0
    stdout = capsys.readouterr().out
    entry = json.loads((demo / "metrics.json").read_text())["models"]["rl"]
    summary = entry["confidence"]["summary"]
    assert summary["slices"] > 0 and "  " + maps.confidence_line(summary) in stdout.splitlines()
    from test_engine import _png_size

    # three view rows of 3 inches and the 2-inch confidence plot row, at 100 dpi
    assert _png_size(demo / "rl" / "figure.png")[1] == (3 * 3.0 + 2.0) * 100


def test_select_per_volume_flag(case, tmp_path, capsys):
    from test_engine import make_rlbcd_bundle

    model = make_rlbcd_bundle(tmp_path / "rl")
    out = tmp_path / "out"
    base = ["--input", case / "ct.nii.gz", "--reference", case / "cta_arterial.nii.gz", "--num-samples", "3",
            "--slices", "2:7", "--device", "cpu"]
    code, _, err = run(["--model", model, *base, "--output", out / "v.nii.gz", "--metrics", out / "v.json",
                        "--select", "per_volume"], capsys)
    assert code == 0, err
    info = json.loads((out / "v.json").read_text())["info"]
    assert info["select"] == "per_volume" and info["selected_sample"] in range(3)
    code, _, err = run(["--model", model, *base, "--output", out / "x.nii.gz", "--select", "best"], capsys)
    assert code == 2 and err.count("\n") == 1 and "select must be 'per_slice' or 'per_volume'" in err
    code, _, err = run(["--model", make_bundle(tmp_path / "p2p"), *base, "--output", out / "p.nii.gz",
                        "--select", "per_volume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "gives no confidence" in err
    assert sorted(p.name for p in out.iterdir()) == ["v.json", "v.nii.gz"]


def test_the_program_turns_numpy_huge_page_advice_off_and_a_call_from_python_does_not(monkeypatch, capsys):
    """``medtranslate`` (``main`` on the process's own command line) runs one command and exits:
    numpy's transparent-huge-page advice goes off (issue 14: a cold ``translate`` waited for
    memory compaction). ``main([...])`` from Python (tests, training/evaluate.py) leaves the
    caller's process as it is, and a user's own NUMPY_MADVISE_HUGEPAGE is kept."""
    import sys

    from numpy._core.multiarray import _set_madvise_hugepage  # returns the previous setting

    previous = _set_madvise_hugepage(True)
    try:
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
        assert cli.main(["models", "list"]) == 0
        assert _set_madvise_hugepage(True) is True  # untouched
        monkeypatch.setattr(sys, "argv", ["medtranslate", "models", "list"])
        assert cli.main() == 0
        assert _set_madvise_hugepage(True) is False  # the program turned it off
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        assert cli.main() == 0
        assert _set_madvise_hugepage(True) is True  # the user's choice
    finally:
        _set_madvise_hugepage(previous)
    capsys.readouterr()
