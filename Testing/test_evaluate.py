"""training/evaluate.py and MedTranslateLib.evaluation: metrics table, figures, one-line errors.

Uses an untrained tiny pix2pix bundle (evaluation does not care how good the model is) on three
freshly generated phantom cases of 16 x 48 x 48. Regions: whole, body, the model's ROIs, then the
label regions (aorta, kidney) of cases whose folder says which labels form them.
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
METRIC_NAMES = ("mae", "psnr", "ssim", "rmse")


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

    from MedTranslateLib.regions import LABEL_REGIONS, metric_regions

    regions = [*metric_regions(), *LABEL_REGIONS]  # the default ROIs, then the label regions
    out = tmp_path / "eval"
    assert evaluate_main()(["--bundle", str(bundle), "--data", str(phantom_root), "--out", str(out),
                            "--split", "all", "--device", "cpu", "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| model | body |" in printed and "metrics.csv" in printed

    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == ["case", "method", "region", "mae", "psnr", "ssim", "rmse"]
    cases = sorted(p.name for p in phantom_root.iterdir())
    # every case: model then identity, each over the regions in the order regions.py gives
    assert [(r["case"], r["method"], r["region"]) for r in rows] == [
        (c, m, g) for c in cases for m in ("model", "identity") for g in regions]
    for r in rows:
        values = {k: float(r[k]) for k in METRIC_NAMES}
        assert all(math.isfinite(v) for v in values.values()), r
        assert 0 < values["mae"] <= values["rmse"] and -1 <= values["ssim"] <= 1

    md = (out / "metrics.md").read_text()
    assert "MAE and RMSE in HU" in md and "## Per case" in md
    summary = md.split("## Per case")[0].splitlines()
    for method in ("model", "identity"):
        lines = [li for li in summary if li.startswith(f"| {method} | ")]
        assert [li.split(" | ")[1] for li in lines] == regions
        assert all(li.split(" | ")[2] == str(len(cases)) and li.count("±") == 4 for li in lines)

    figures = sorted((out / "figures").glob("*.png"))
    assert [p.stem for p in figures] == cases
    image = matplotlib.image.imread(figures[0])
    assert image.ndim == 3 and image.shape[1] > 3 * image.shape[0]  # four panels side by side


def test_identity_rows_are_the_source_in_the_target_window(phantom_root, bundle, tmp_path):
    """CT -> CT identity baseline: the source HU clipped to the target window (ct_angio:
    -300..700 HU), measured with SynthRAD's CT range (an independent computation of the liver
    row, and of the aorta and kidney rows over their labels in the phantom's label map)."""
    from MedTranslateLib import io, metrics
    from MedTranslateLib.evaluation import evaluate_bundle
    from MedTranslateLib.phantom import LABELS

    result = evaluate_bundle(bundle, phantom_root, tmp_path / "eval", split="all", device="cpu", figures=False)
    case = sorted(phantom_root.iterdir())[1]
    ct = io.read_volume(case / "ct.nii.gz").array
    cta = io.read_volume(case / "cta_arterial.nii.gz").array
    labels = io.read_volume(case / "labels.nii.gz").array
    masks = {"liver": io.read_volume(case / "liver.nii.gz").array > 0.5, "aorta": labels == LABELS["aorta"],
             "kidney": np.isin(labels, (LABELS["kidney_cortex"], LABELS["kidney_medulla"]))}
    identity = np.clip(ct, -300.0, 700.0)
    for region, mask in masks.items():
        assert mask.sum() > 20, region
        expected = metrics.image_metrics(cta, identity, mask, value_range=(-1024, 3000))
        row = next(r for r in result.rows if (r["case"], r["method"], r["region"]) == (case.name, "identity", region))
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (region, key)
    # the summary is the mean over cases
    body = [r["mae"] for r in result.rows if r["method"] == "model" and r["region"] == "body"]
    summary = next(s for s in result.summary if (s["method"], s["region"]) == ("model", "body"))
    assert summary["n"] == 3 and summary["mae_mean"] == pytest.approx(np.mean(body))
    assert summary["mae_sd"] == pytest.approx(np.std(body, ddof=1))


def test_region_order_is_the_one_regions_py_gives(phantom_root, bundle, tmp_path, monkeypatch):
    """Reorder the label regions in ``regions`` alone: the table follows (nothing else orders them)."""
    from MedTranslateLib import regions
    from MedTranslateLib.evaluation import evaluate_bundle

    monkeypatch.setattr(regions, "LABEL_REGIONS", tuple(reversed(regions.LABEL_REGIONS)))
    result = evaluate_bundle(bundle, phantom_root, tmp_path / "eval", split="all", device="cpu", figures=False,
                             max_cases=1)
    expected = [*regions.metric_regions(), *regions.LABEL_REGIONS]
    assert expected[-2:] == ["kidney", "aorta"]
    assert [r["region"] for r in result.rows if r["method"] == "model"] == expected
    assert [s["region"] for s in result.summary if s["method"] == "model"] == expected


def test_label_region_masks_are_the_phantom_labels(phantom_root):
    """The aorta and kidney masks of a phantom case: exactly the voxels of their labels."""
    from MedTranslateLib import io
    from MedTranslateLib.evaluation import load_case
    from MedTranslateLib.phantom import LABELS
    from MedTranslateLib.regions import LABEL_REGIONS

    folder = sorted(phantom_root.iterdir())[0]
    case = load_case(folder, "ct", "cta_arterial")
    labels = io.read_volume(folder / "labels.nii.gz").array
    aorta = labels == LABELS["aorta"]
    kidney = np.isin(labels, (LABELS["kidney_cortex"], LABELS["kidney_medulla"]))
    assert [m for m in case.masks if m in LABEL_REGIONS] == list(LABEL_REGIONS)
    assert np.array_equal(case.masks["aorta"], aorta) and np.array_equal(case.masks["kidney"], kidney)
    assert int(case.masks["aorta"].sum()) == int(aorta.sum()) > 0
    assert int(case.masks["kidney"].sum()) == int(kidney.sum()) > 0


def test_cases_without_a_label_map_or_region_table_have_no_label_region_rows(phantom_root, bundle, tmp_path):
    """A case with no ``labels`` (body from the intensities), and one whose label map has no
    region table (its numbers mean nothing to us): whole, body and ROI rows only."""
    from MedTranslateLib.cases import REGION_TABLE
    from MedTranslateLib.evaluation import evaluate_bundle
    from MedTranslateLib.regions import metric_regions

    phantom_case = sorted(phantom_root.iterdir())[0]
    root = tmp_path / "cases"
    for name, skip in (("no_labels", {"labels.nii.gz", REGION_TABLE}), ("no_table", {REGION_TABLE})):
        (root / name).mkdir(parents=True)
        for f in phantom_case.iterdir():
            if f.name not in skip:
                (root / name / f.name).symlink_to(f)
    result = evaluate_bundle(bundle, root, tmp_path / "eval", split="all", device="cpu", figures=False)
    for name in ("no_labels", "no_table"):
        assert [r["region"] for r in result.rows if (r["case"], r["method"]) == (name, "model")] == list(metric_regions())


def test_bad_region_table_is_one_line_exit_2(phantom_root, bundle, tmp_path, capsys):
    from MedTranslateLib.cases import REGION_TABLE

    phantom_case = sorted(phantom_root.iterdir())[0]
    root = tmp_path / "cases"
    (root / "c").mkdir(parents=True)
    for f in phantom_case.iterdir():
        if f.name != REGION_TABLE:
            (root / "c" / f.name).symlink_to(f)
    for table, message in (('{"spleen": [14]}', "unknown label regions spleen"),
                           ('{"aorta": [0]}', "label values > 0"), ("[8]", "expected an object")):
        (root / "c" / REGION_TABLE).write_text(table)
        rc = evaluate_main()(["--bundle", str(bundle), "--data", str(root), "--out", str(tmp_path / "e"),
                              "--split", "all", "--device", "cpu"])
        err = one_line_error(capsys)
        assert rc == 2 and message in err and REGION_TABLE in err, err


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
