"""The application layer and the single homes it stands on: cases (reader, split), regions,
runtime (devices, precision), model choices with capabilities, identity baseline, slicing spec."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from MedTranslateLib import app, cases, evaluation, io, phantom, regions, runtime
from MedTranslateLib.bundle import (
    load_bundle,
    meta_capabilities,
    read_bundle_meta,
    represent_warnings,
    save_bundle,
)
from MedTranslateLib.engine import VolumeTranslator
from MedTranslateLib.methods import build_method
from MedTranslateLib.model_store import ModelInfo


def tiny_bundle(path, *, source_preset="ct_abdomen", target_preset="ct_angio", slice_spec=None, rois=None,
                training=None, method="pix2pix", **architecture):
    torch.manual_seed(0)
    cfg = {"generator": {"ngf": 4, "num_downs": 5}, **architecture} if method == "pix2pix" else architecture
    meta = {"source": {"modality": "ct", "preset": source_preset},
            "target": {"modality": "cta_arterial", "preset": target_preset},
            "slice": slice_spec or {"size": 32, "axis": 0}, "training": training or {}}
    if rois is not None:
        meta["rois"] = rois
    return save_bundle(build_method(method, cfg), meta, path)


@pytest.fixture(scope="module")
def case_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    cfg = phantom.PhantomConfig(shape=(16, 40, 40), spacing=(6.0, 6.0, 8.0), tumor_count=(1, 1))
    phantom.write_phantom_dataset(root, cases=7, seed=2, config=cfg)
    # two cases lack the target: unpaired training uses them, evaluation cannot
    for name in ("case_001", "case_004"):
        for p in (root / name).glob("cta_arterial*"):
            p.unlink()
    return root


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def test_case_files_and_read_case(case_root):
    files = cases.case_files(case_root / "case_000", "ct", "cta_arterial")
    assert files.source.name == "ct.nii.gz" and files.reference.name == "cta_arterial.nii.gz"
    assert set(files.masks) == {"liver", "tumor", regions.BODY}
    case = cases.read_case(files)
    assert case.masks["liver"].dtype == bool and case.masks["liver"].shape == case.source.shape
    assert case.reference.same_geometry(case.source)
    # other ROI names: only masks of those names are read
    assert set(cases.case_files(case_root / "case_000", "ct", None, ("tumor",)).masks) == {"tumor", regions.BODY}
    assert cases.case_files(case_root / "case_001", "ct", "cta_arterial").reference is None
    with pytest.raises(ValueError, match="no 'pet' volume"):
        cases.case_files(case_root / "case_000", "pet", "ct")


def test_evaluation_uses_the_split_training_made(case_root):
    """Unpaired training splits every case folder; evaluation takes the same split and keeps the
    cases that have a reference -- never a re-split of only the paired cases."""
    from MedTranslateLib.training import DataConfig, case_splits

    data = DataConfig(root=str(case_root), split=(3, 1, 3), split_seed=5)
    trained = case_splits(data, paired=False)
    assert sum(len(v) for v in trained.values()) == 7
    meta = read_bundle_meta(tiny_bundle(case_root.parent / "b_unpaired", training={
        "data": {"split": [3, 1, 3], "split_seed": 5, "paired": False}}))
    test = evaluation.bundle_split(meta, case_root, "test")
    assert test and test == [c for c in trained["test"] if (c / "cta_arterial.nii.gz").exists()]
    assert not {c.name for c in test} & {c.name for c in trained["train"]}  # never a training case


# ---------------------------------------------------------------------------------------------
# regions and ROI names
# ---------------------------------------------------------------------------------------------
def test_regions_order_and_bundle_roi_names(tmp_path):
    assert regions.metric_regions() == ("whole", "body", "liver", "tumor")
    assert regions.metric_regions(["lesion", "body"]) == ("whole", "body", "lesion")
    assert regions.ordered_regions(["tumor", "x", "whole", "liver"]) == ["whole", "liver", "tumor", "x"]
    assert regions.roi_names_from_training({"config": {"data": {"masks": ["lesion"]}}}) == ("lesion",)
    assert regions.roi_names_from_training({}) == regions.DEFAULT_ROIS


def test_metrics_regions_come_from_the_bundle_roi_names(tmp_path):
    vol = io.Volume(np.where(np.hypot(*np.mgrid[:8, :32, :32][1:] - 16) < 12, 40.0, -1000.0).astype(np.float32),
                    (2.0, 2.0, 3.0))
    lesion = np.zeros(vol.shape, bool)
    lesion[2:6, 12:18, 12:18] = True
    tr = VolumeTranslator(load_bundle(tiny_bundle(tmp_path / "b", rois=["lesion"])), device="cpu")
    assert tr.roi_names == ("lesion",)
    res = tr.translate(vol, masks={"lesion": lesion}, reference=vol)
    assert list(res.metrics) == ["whole", "body", "lesion"]


# ---------------------------------------------------------------------------------------------
# identity baseline and windows
# ---------------------------------------------------------------------------------------------
def test_identity_baseline_is_the_same_for_every_ct_window(tmp_path):
    """CT -> CT: the identity row is the source in HU, whatever the model's windows."""
    z, y, x = np.mgrid[:8, :32, :32]
    body = np.hypot(y - 16, x - 16) < 13
    src = np.where(body, 50.0 + 900.0 * (np.hypot(y - 16, x - 16) < 3), -1000.0).astype(np.float32)
    vol = io.Volume(src, (2.0, 2.0, 3.0))
    ref = io.Volume(np.where(body, src + 30.0, -1000.0).astype(np.float32), (2.0, 2.0, 3.0))
    rows = []
    for window in ("ct_abdomen", "ct_wide"):
        tr = VolumeTranslator(load_bundle(tiny_bundle(tmp_path / window, source_preset=window, target_preset=window)),
                              device="cpu", baseline_metrics=True)
        rows.append(tr.translate(vol, reference=ref).baseline_metrics)
    assert rows[0] == rows[1]
    assert rows[0]["body"]["mae"] == pytest.approx(30.0, abs=1e-3)  # unclipped: bone and air kept


def test_window_warnings_name_what_cannot_be_represented(tmp_path):
    narrow = read_bundle_meta(tiny_bundle(tmp_path / "narrow", target_preset="ct_abdomen"))
    assert represent_warnings(narrow) and "air (-1000 HU)" in represent_warnings(narrow)[0] \
        and "bone (1000 HU)" in represent_warnings(narrow)[0]
    assert represent_warnings(read_bundle_meta(tiny_bundle(tmp_path / "wide", target_preset="ct_wide"))) == []
    info = ModelInfo("narrow", tmp_path / "narrow", "user", meta=narrow)
    choice = app.model_choice(info)
    assert choice.warnings == represent_warnings(narrow) and choice.units == "HU"


def test_every_shipped_demo_model_represents_air_and_bone():
    shipped = app.bundled_models()
    assert len(shipped) >= 3
    for path in shipped:
        assert represent_warnings(read_bundle_meta(path)) == [], path.name


# ---------------------------------------------------------------------------------------------
# capabilities and model choices
# ---------------------------------------------------------------------------------------------
def test_capabilities_are_declared_by_the_method(tmp_path):
    plain = meta_capabilities(read_bundle_meta(tiny_bundle(tmp_path / "p")))
    assert not plain.stochastic and plain.uncertainty is None
    mc = meta_capabilities(read_bundle_meta(tiny_bundle(tmp_path / "mc", test_time_dropout=True)))
    assert mc.stochastic and mc.uncertainty == "std" and mc.uncertainty_needs_samples
    from MedTranslateLib.methods import get_method_class

    bbdm = get_method_class("bbdm").capabilities_for(get_method_class("bbdm").Config())
    resshift = get_method_class("resshift").capabilities_for(get_method_class("resshift").Config())
    assert bbdm.steps and not resshift.steps and bbdm.shared_noise and resshift.stochastic
    dgpg = get_method_class("dgpg").capabilities_for(get_method_class("dgpg").Config())
    assert dgpg.uncertainty == "variance" and not dgpg.uncertainty_needs_samples


def test_bundles_store_what_their_method_declares(tmp_path):
    """The copy of the capabilities in medtranslate.yaml (read without torch by the Slicer panel)
    is the method class's; a bundle without it (older format) is asked of the class."""
    saved = read_bundle_meta(tiny_bundle(tmp_path / "mc", test_time_dropout=True))
    assert saved.capabilities == meta_capabilities(saved).to_dict() and saved.capabilities["stochastic"]
    for path in app.bundled_models():
        meta = read_bundle_meta(path)
        assert meta.capabilities == meta_capabilities(meta).to_dict(), path.name
    old = dataclasses.replace(saved, capabilities=None)
    info = ModelInfo("old", tmp_path / "mc", "user", old)
    assert app.model_choice(info).capabilities == saved.capabilities


def test_a_model_that_scores_every_sample_offers_the_per_volume_choice(tmp_path):
    """``sample_confidence`` travels in the capabilities a bundle stores and a ``ModelChoice``
    carries (``scores_samples``: the Slicer panel enables its sample choice); of the bundled demo
    models only rlbcd's scores its samples. One list of modes: ``runtime`` (the engine re-exports it)."""
    from test_engine import make_rlbcd_bundle

    from MedTranslateLib import engine

    meta = read_bundle_meta(make_rlbcd_bundle(tmp_path / "rl"))
    assert meta.capabilities["sample_confidence"] is True and meta.capabilities == meta_capabilities(meta).to_dict()
    choice = app.model_choice(ModelInfo("rl", tmp_path / "rl", "user", meta))
    assert choice.scores_samples and choice.steps
    old = app.model_choice(ModelInfo("rl", tmp_path / "rl", "user", dataclasses.replace(meta, capabilities=None)))
    assert old.scores_samples  # asked of the method class
    bundled = {c.name: c for c in app.model_choices() if c.origin == "bundled"}
    # of the bundled demo models, exactly the rlbcd one scores its samples
    assert {n for n, c in bundled.items() if c.scores_samples} == {"rlbcd_ct_cta_demo"}
    assert all(c.capabilities["sample_confidence"] is (c.method == "rlbcd") for c in bundled.values())
    assert engine.SELECT_MODES is runtime.SELECT_MODES and app.TranslationOptions("m").select == runtime.SELECT_MODES[0]
    for mode in runtime.SELECT_MODES:
        assert app.TranslationOptions("m", select=mode).select == mode


def test_model_choices_carry_capabilities_rois_and_units():
    choices = {c.name: c for c in app.model_choices()}
    assert {"pix2pix_ct_cta_demo", "resshift_ct_cta_demo", "dgpg_t1_ct_demo", "c2fmit_ct_cta_demo",
            "rlbcd_ct_cta_demo", "dfbk_t1_ct_demo"} <= set(choices)
    # the panel's list for a CT source holds the CT models (the papers' included), not the T1 ones
    ct = {c.name for c in app.model_choices("ct")}
    assert {"c2fmit_ct_cta_demo", "rlbcd_ct_cta_demo"} <= ct and not {"dfbk_t1_ct_demo", "dgpg_t1_ct_demo"} & ct
    assert choices["c2fmit_ct_cta_demo"].steps and choices["c2fmit_ct_cta_demo"].capabilities["steps"]
    assert choices["resshift_ct_cta_demo"].steps and not choices["pix2pix_ct_cta_demo"].steps
    assert choices["dgpg_t1_ct_demo"].capabilities["uncertainty"] == "variance"
    assert choices["pix2pix_ct_cta_demo"].units == "HU" and choices["pix2pix_ct_cta_demo"].rois == ("liver", "tumor")
    assert set(c.name for c in app.model_choices("t1")) >= {"dgpg_t1_ct_demo"}
    assert "pix2pix_ct_cta_demo" not in {c.name for c in app.model_choices("t1")}


# ---------------------------------------------------------------------------------------------
# slicing spec
# ---------------------------------------------------------------------------------------------
def test_the_engine_slices_with_the_bundle_slice_spec(tmp_path):
    z, y, x = np.mgrid[:6, :40, :40]
    vol = io.Volume(np.where(np.hypot(y - 20, x - 20) < 10, 40.0, -1000.0).astype(np.float32), (2.0, 2.0, 3.0))
    boxes = []
    for margin in (0.05, 0.4):
        b = tiny_bundle(tmp_path / f"m{margin}", slice_spec={"size": 32, "axis": 0, "margin": margin})
        assert read_bundle_meta(b).slice.margin == margin
        boxes.append(VolumeTranslator(load_bundle(b), device="cpu").translate(vol).info["box"])
    (r0, r1, _, _), (s0, s1, _, _) = boxes
    assert s1 - s0 > r1 - r0  # a wider margin, a wider crop box


def test_old_bundles_keep_the_default_slice_spec(tmp_path):
    b = tiny_bundle(tmp_path / "old")
    meta_file = b / "medtranslate.yaml"
    text = meta_file.read_text()
    assert "margin: 0.05" in text
    meta_file.write_text(text.replace("  margin: 0.05\n", ""))  # as written before the spec was whole
    assert read_bundle_meta(b).slice.margin == 0.05


# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
def test_one_precision_parser_for_inference_and_training():
    cpu = torch.device("cpu")
    assert runtime.Precision.parse("auto").autocast_dtype(cpu) is None
    assert runtime.Precision.parse("bf16-mixed").autocast_dtype(cpu) is torch.bfloat16
    assert runtime.Precision.parse("16").lightning(False) == "16-mixed"
    assert runtime.Precision.parse("auto").lightning(False) == "32-true"
    assert runtime.Precision.parse("32").lightning(False, given="32") == "32"
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.Precision.parse("fp8")
    assert runtime.local_device("auto", {}) == "auto" and runtime.local_device("cpu", {"WORLD_SIZE": "2"}) == "cpu"
    assert runtime.distributed_env({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)


# ---------------------------------------------------------------------------------------------
# a translation through the application layer
# ---------------------------------------------------------------------------------------------
def test_run_translation_roi_slices_cache_and_cancel(case_root, tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    case = cases.read_case(cases.case_files(case_root / "case_000", "ct", "cta_arterial"))
    cache = app.ModelCache()
    opts = app.TranslationOptions(model=str(bundle), device="cpu", slices=app.ALL_ROIS, extent_margin=0)
    out = app.run_translation(app.TranslationRequest(case, opts), cache=cache)
    z = np.flatnonzero((case.masks["liver"] | case.masks["tumor"]).any(axis=(1, 2)))
    assert out.result.slice_range == (z[0], z[-1] + 1)
    assert cache.get(opts) is out.translator  # loaded once
    wider = dataclasses.replace(opts, extent_margin=2, shared_noise=True)
    assert cache.get(wider) is out.translator and out.translator.extent_margin == 2  # per-run settings
    assert out.translator.shared_noise
    assert cache.get(dataclasses.replace(opts, batch_size=2)) is not out.translator  # reloaded
    with pytest.raises(app.UserError, match="extent margin"):
        cache.get(dataclasses.replace(opts, extent_margin=-1))
    cache.get(opts)
    assert out.model_name == "b"
    no_rois = cases.Case("x", case.source, {regions.BODY: case.masks[regions.BODY]}, None)
    with pytest.raises(app.UserError, match="needs an ROI mask"):
        app.run_translation(app.TranslationRequest(no_rois, opts), cache=cache)
    from MedTranslateLib.engine import TranslationCancelled

    with pytest.raises(TranslationCancelled):
        app.run_translation(app.TranslationRequest(case, opts), cache=cache, cancel=lambda: True)
    assert app.readable_error(TranslationCancelled("x")).startswith("Cancelled")


def test_write_case_folder_is_all_or_nothing(case_root, tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    case = cases.read_case(cases.case_files(case_root / "case_000", "ct", "cta_arterial"))
    outcome = app.run_translation(app.TranslationRequest(case, app.TranslationOptions(model=str(bundle), device="cpu")))
    folder = tmp_path / "out" / "case_000"
    written = app.write_case_folder(outcome, folder)
    assert {p.name for p in written} == {"cta_arterial_synthetic.nii.gz", "difference.nii.gz",
                                         "reference_difference.nii.gz", "metrics.json"}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(app.UserError, match="holds other files"):
        app.write_case_folder(outcome, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    shutil.rmtree(folder)


def test_phantom_case_is_a_case_with_rois_body_and_reference():
    ph = phantom.generate_case(3, phantom.PhantomConfig(shape=(16, 32, 32), tumor_count=(1, 1)))
    case = app.phantom_case(ph, "ct", "cta_arterial")
    assert set(case.masks) == {"liver", "tumor", regions.BODY, *regions.LABEL_REGIONS}
    assert case.reference is ph.images["cta_arterial"]
    assert case.masks[regions.BODY].sum() > case.masks["liver"].sum() > case.masks["tumor"].sum() > 0
    labels = ph.masks["labels"].array
    for name, values in ph.info["regions"].items():  # the phantom's own label numbers
        assert np.array_equal(case.masks[name], np.isin(labels, values)) and case.masks[name].any()
    assert app.phantom_case(ph, "t1").reference is None
    with pytest.raises(KeyError, match="no 'pet' image"):
        app.phantom_case(ph, "pet")


@pytest.mark.parametrize("field, value", [("seed", 2**63), ("seed", -1), ("seed", 1.5), ("seed", True),
                                          ("num_samples", 0), ("num_samples", 2.0), ("steps", 0)])
def test_translation_options_refuse_what_the_engine_cannot_take(field, value):
    """Every front end (CLI, Slicer, web) gets one line, not a traceback from torch.manual_seed."""
    with pytest.raises(app.UserError) as info:
        app.TranslationOptions(model="m", **{field: value})
    assert "\n" not in str(info.value)
    assert app.TranslationOptions(model="m", seed=app.MAX_SEED).seed == 2**63 - 1


def test_metrics_json_holds_the_per_slice_confidence_and_its_summary(case_root, tmp_path):
    import json

    from test_engine import make_rlbcd_bundle

    case = cases.read_case(cases.case_files(case_root / "case_000", "ct", "cta_arterial"))
    opts = app.TranslationOptions(model=str(make_rlbcd_bundle(tmp_path / "rl")), device="cpu", num_samples=2,
                                  seed=3, slices=(4, 9), batch_size=2)
    outcome = app.run_translation(app.TranslationRequest(case, opts))
    conf = outcome.result.confidence
    written = app.write_case_folder(outcome, tmp_path / "out")
    doc = json.loads(next(p for p in written if p.name == app.METRICS_FILE).read_text())["confidence"]
    assert len(doc["per_slice"]) == case.source.shape[0] == conf.size
    assert all(doc["per_slice"][i] is None for i in (*range(4), *range(9, conf.size)))
    assert doc["per_slice"][4:9] == pytest.approx(conf[4:9].tolist())
    s = doc["summary"]
    assert s["slices"] == 5 and s["mean"] == pytest.approx(conf[4:9].mean()) and s["min"] == pytest.approx(conf[4:9].min())
    lowest = [r["slice"] for r in s["lowest"]]
    assert lowest == [4 + int(k) for k in np.argsort(conf[4:9], kind="stable")[:3]]
    # a method without confidence: null
    plain = app.run_translation(app.TranslationRequest(case, dataclasses.replace(opts, model=str(tiny_bundle(
        tmp_path / "p2p")), num_samples=1)))
    assert plain.result.confidence is None and app.metrics_document(plain)["confidence"] is None


def test_select_per_volume_reaches_the_engine_and_bad_values_are_refused(case_root, tmp_path):
    from test_engine import make_rlbcd_bundle

    case = cases.read_case(cases.case_files(case_root / "case_000", "ct", "cta_arterial"))
    opts = app.TranslationOptions(model=str(make_rlbcd_bundle(tmp_path / "rl")), device="cpu", num_samples=2,
                                  seed=3, slices=(4, 8), select="per_volume")
    info = app.run_translation(app.TranslationRequest(case, opts)).result.info
    assert info["select"] == "per_volume" and info["selected_sample"] in (0, 1)
    with pytest.raises(app.UserError, match="select must be"):
        dataclasses.replace(opts, select="best")
