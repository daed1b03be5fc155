"""``medtranslate demo``: the shipped demo bundle on a (small) phantom case: NIfTI outputs in
the source geometry, a PNG figure and metrics.json with the model next to the identity baseline."""

from __future__ import annotations

import dataclasses
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


def _choice(name):
    from MedTranslateLib import app

    path = model_store.find_model(name)
    return app.model_choice(model_store.ModelInfo(name, path, "bundled", meta=load_bundle(path).meta)), path


def test_demo_runs_diffusion_models_with_fewer_steps_and_says_so():
    args = cli.build_parser().parse_args(["demo"])
    choice, path = _choice("c2fmit_ct_cta_demo")
    meta = load_bundle(path).meta
    steps, samples, note = cli._demo_sampling(choice, meta, args)
    assert (steps, samples) == (cli.DEMO_STEPS, 1) and cli.DEMO_STEPS < meta.architecture["steps"]
    assert note == f" ({cli.DEMO_STEPS} sampling steps; the model's default is {meta.architecture['steps']})"
    # a model without selectable steps keeps its own; a scoring method gets several samples
    choice, path = _choice("pix2pix_ct_cta_demo")
    assert cli._demo_sampling(choice, load_bundle(path).meta, args) == (None, 1, "")
    scored = dataclasses.replace(choice, capabilities={**choice.capabilities, "stochastic": True, "confidence": True})
    assert cli._demo_sampling(scored, load_bundle(path).meta, args)[1:] == (
        cli.DEMO_SCORED_SAMPLES, f" (best of {cli.DEMO_SCORED_SAMPLES} samples)")
    args = cli.build_parser().parse_args(["demo", "--steps", "3", "--samples", "5"])
    assert cli._demo_sampling(scored, load_bundle(path).meta, args)[1] == 5


def test_shipped_paper_demo_bundles_beat_identity_where_the_paper_claims():
    """Each shipped paper-method demo bundle records its held-out test-split means, and they beat
    the identity baseline in the regions its issue names."""
    claims = {"c2fmit_ct_cta_demo": ("liver", "aorta"), "rlbcd_ct_cta_demo": ("liver", "aorta"),
              "dfbk_t1_ct_demo": ("body",)}
    for name, regions in claims.items():
        held_out = load_bundle(model_store.find_model(name)).meta.metrics["held_out"]
        assert len(held_out["cases"]) == 5
        for region in regions:
            assert held_out["model"][region]["mae"] < held_out["identity"][region]["mae"], (name, region)
