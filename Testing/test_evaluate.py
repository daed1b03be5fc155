"""training/evaluate.py and MedTranslateLib.evaluation: metrics table, figures, one-line errors.

Uses an untrained tiny pix2pix bundle (evaluation does not care how good the model is) on three
freshly generated phantom cases of 16 x 48 x 48.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "training" / "evaluate.py"


def evaluate_main():
    spec = importlib.util.spec_from_file_location("_script_evaluate", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=3, seed=5, config=PhantomConfig(shape=(16, 48, 48), tumor_count=(1, 2)))
    return root


def make_bundle(path: Path, *, target: str = "cta_arterial") -> Path:
    import torch

    from MedTranslateLib.bundle import BundleMeta, ModalitySpec, SliceSpec, save_bundle
    from MedTranslateLib.methods import build_method

    torch.manual_seed(0)
    method = build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 4}}).eval()
    meta = BundleMeta(source=ModalitySpec("ct", "ct_abdomen"), target=ModalitySpec(target, "ct_angio"),
                      slice=SliceSpec(size=32, axis=0),
                      training={"data": {"split": [1, 1, 1], "split_seed": 0}})
    return save_bundle(method, meta, path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_table_and_figures_for_every_case(phantom_root, bundle, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "eval"
    assert evaluate_main()(["--bundle", str(bundle), "--data", str(phantom_root), "--out", str(out),
                            "--split", "all", "--device", "cpu", "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| model | body |" in printed and "metrics.csv" in printed

    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == ["case", "method", "region", "mae", "psnr", "ssim", "rmse"]
    cases = sorted(p.name for p in phantom_root.iterdir())
    # every case: model and identity, each over whole / body / liver / tumor
    assert len(rows) == len(cases) * 2 * 4
    assert {(r["case"], r["method"], r["region"]) for r in rows} == {
        (c, m, g) for c in cases for m in ("model", "identity") for g in ("whole", "body", "liver", "tumor")}
    for r in rows:
        values = {k: float(r[k]) for k in ("mae", "psnr", "ssim", "rmse")}
        assert all(math.isfinite(v) for v in values.values()), r
        assert 0 < values["mae"] <= values["rmse"] and -1 <= values["ssim"] <= 1

    md = (out / "metrics.md").read_text()
    assert "MAE and RMSE in HU" in md and "## Per case" in md
    for method in ("model", "identity"):
        for region in ("whole", "body", "liver", "tumor"):
            line = next(li for li in md.splitlines() if li.startswith(f"| {method} | {region} | {len(cases)} |"))
            assert line.count("±") == 4

    figures = sorted((out / "figures").glob("*.png"))
    assert [p.stem for p in figures] == cases
    image = matplotlib.image.imread(figures[0])
    assert image.ndim == 3 and image.shape[1] > 3 * image.shape[0]  # four panels side by side


def test_identity_rows_are_the_source_in_the_target_window(phantom_root, bundle, tmp_path):
    """CT -> CT identity baseline: the source HU clipped to the target window (ct_angio:
    -300..700 HU), measured with SynthRAD's CT range (an independent computation of one row)."""
    from MedTranslateLib import io, metrics
    from MedTranslateLib.evaluation import evaluate_bundle

    result = evaluate_bundle(bundle, phantom_root, tmp_path / "eval", split="all", device="cpu", figures=False)
    case = sorted(phantom_root.iterdir())[1]
    ct = io.read_volume(case / "ct.nii.gz").array
    cta = io.read_volume(case / "cta_arterial.nii.gz").array
    liver = io.read_volume(case / "liver.nii.gz").array > 0.5
    identity = np.clip(ct, -300.0, 700.0)
    expected = metrics.image_metrics(cta, identity, liver, value_range=(-1024, 3000))
    row = next(r for r in result.rows if (r["case"], r["method"], r["region"]) == (case.name, "identity", "liver"))
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-6)
    # the summary is the mean over cases
    body = [r["mae"] for r in result.rows if r["method"] == "model" and r["region"] == "body"]
    summary = next(s for s in result.summary if (s["method"], s["region"]) == ("model", "body"))
    assert summary["n"] == 3 and summary["mae_mean"] == pytest.approx(np.mean(body))
    assert summary["mae_sd"] == pytest.approx(np.std(body, ddof=1))


def test_default_split_is_the_bundles_test_split(phantom_root, bundle, tmp_path):
    from MedTranslateLib.data import find_cases, split_cases

    out = tmp_path / "eval"
    assert evaluate_main()(["--bundle", str(bundle), "--data", str(phantom_root), "--out", str(out),
                            "--device", "cpu", "--no-figures"]) == 0
    expected = [p.name for p in split_cases(find_cases(phantom_root), ratios=(1, 1, 1), seed=0)["test"]]
    assert sorted({r["case"] for r in read_rows(out / "metrics.csv")}) == expected
    assert not (out / "figures").exists()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate.py: error: "), err
    return err


def test_mismatched_bundle_is_one_line_exit_2(phantom_root, tmp_path, capsys):
    pet = make_bundle(tmp_path / "pet_bundle", target="pet")
    rc = evaluate_main()(["--bundle", str(pet), "--data", str(phantom_root), "--out", str(tmp_path / "e")])
    assert rc == 2
    err = one_line_error(capsys)
    assert "'pet'" in err and str(pet) in err
    assert not (tmp_path / "e" / "metrics.csv").exists()


def test_other_errors_are_one_line_exit_2(phantom_root, bundle, tmp_path, capsys):
    main = evaluate_main()
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    assert main(["--bundle", str(not_a_bundle), "--data", str(phantom_root), "--out", str(tmp_path / "e")]) == 2
    assert str(not_a_bundle) in one_line_error(capsys)

    assert main(["--bundle", str(bundle), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "case root folder not found" in one_line_error(capsys)

    single = tmp_path / "single"
    single.mkdir()
    (single / "case_000").symlink_to(sorted(phantom_root.iterdir())[0])
    assert main(["--bundle", str(bundle), "--data", str(single), "--out", str(tmp_path / "e")]) == 2
    assert "test split" in one_line_error(capsys)


def test_medtranslate_evaluate_is_the_same_command(tmp_path, capsys):
    from MedTranslateLib.cli import main

    rc = main(["evaluate", "--bundle", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("medtranslate: error: "), err
    assert "nope" in err and not (tmp_path / "o").exists()
