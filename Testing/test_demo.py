"""``medtranslate demo``: the shipped demo bundle on a (small) phantom case: NIfTI outputs in
the source geometry, a PNG figure and metrics.json with the model next to the identity baseline."""

from __future__ import annotations

import json

from MedTranslateLib import cli, io, model_store
from MedTranslateLib.bundle import load_bundle

DEMO = model_store.bundled_models_dir() / "pix2pix_ct_cta_demo"


def test_shipped_demo_bundle_is_small_and_documented():
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size < 5 * 2**20
    b = load_bundle(DEMO)
    assert b.meta.method == "pix2pix" and b.meta.source.modality == "ct"
    assert b.meta.target.modality == "cta_arterial"
    assert "training/train.py" in b.meta.training["command"]
    held_out = b.meta.metrics["held_out"]
    assert held_out["model"]["liver"]["mae"] < held_out["identity"]["liver"]["mae"]


def test_demo_writes_outputs_figure_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--shape", "24", "64", "64", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    folder = out / "pix2pix_ct_cta_demo"
    source = io.read_volume(out / "phantom" / "ct.nii.gz")
    for name in ("synthetic", "difference", "reference_difference"):
        assert io.read_volume(folder / f"{name}.nii.gz").same_geometry(source, atol=1e-4)
    assert (folder / "figure.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "metrics.json").read_text())
    entry = report["models"]["pix2pix_ct_cta_demo"]
    assert set(entry["metrics"]) >= {"whole", "body", "liver"}
    assert set(entry["identity"]) == set(entry["metrics"])
    assert entry["consistency"]["ratio"] > 0
    for path in (str(folder / "figure.png"), str(out / "metrics.json")):
        assert path in stdout
