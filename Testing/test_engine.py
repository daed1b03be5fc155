"""engine.VolumeTranslator: geometry, determinism, batching, out-of-memory back-off, progress,
cancel, slice selection, masks, metrics; maps helpers; device / precision / sharding helpers."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import rotation_direction
from scipy import ndimage

from MedTranslateLib import engine, io, maps, onnx_backend
from MedTranslateLib.bundle import BundleError, load_bundle, save_bundle
from MedTranslateLib.methods import Translation, build_method

META = {"source": {"modality": "ct", "preset": "ct_abdomen"},
        "target": {"modality": "cta_arterial", "preset": "ct_angio"},
        "slice": {"size": 64, "axis": 0}}


def make_bundle(path, *, dropout: bool = True, axis: int = 0, source="ct_abdomen", target="ct_angio"):
    """Tiny random-init pix2pix (ngf 4, 64x64 slices); ``dropout``: test-time dropout on, so the
    output depends on the seed and num_samples > 1 gives an uncertainty map."""
    torch.manual_seed(0)
    method = build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 6},
                                      "test_time_dropout": dropout})
    with torch.no_grad():  # larger than pix2pix's N(0, 0.02) init: outputs (and dropout) matter
        for p in method.parameters():
            if p.ndim == 4:
                p.normal_(0.0, 0.15)
    meta = {**META, "slice": {"size": 64, "axis": axis},
            "source": {"modality": "ct", "preset": source}, "target": {"modality": "cta_arterial", "preset": target}}
    return save_bundle(method, meta, path)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "p2p")


@pytest.fixture(scope="module")
def det_bundle_path(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "p2p_det", dropout=False)


def ct_volume(shape=(8, 40, 48), spacing=(0.9, 1.4, 3.5), oblique=True) -> io.Volume:
    """A smooth off-centre 'body' ellipse (~0..200 HU) in air, oblique and anisotropic."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    body = ((y - 22) / 12) ** 2 + ((x - 20) / 15) ** 2 < 1
    arr = np.where(body, 60 + 80 * np.sin(x / 5) * np.cos(y / 7) + 5 * z, -1000).astype(np.float32)
    direction = rotation_direction(12, -25, 40) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return io.Volume(arr, spacing=spacing, origin=(-30.5, 12.25, 101.0), direction=direction, source="test-ct")


def identity_translate(source, **kwargs):
    return Translation(image=source.clone())


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def test_outputs_keep_the_source_geometry_oblique_anisotropic(bundle_path, tmp_path):
    vol = ct_volume()
    tr = engine.VolumeTranslator(load_bundle(bundle_path), device="cpu", batch_size=3)
    res = tr.translate(vol, seed=3, num_samples=2, reference=vol)
    for out in (res.synthetic, res.difference, res.uncertainty, res.reference_difference):
        assert out is not None and out.same_geometry(vol, atol=0)
        assert out.array.dtype == np.float32 and np.isfinite(out.array).all()
    lo, hi = -300.0, 700.0  # ct_angio window: the synthetic is in HU inside it
    assert res.synthetic.array.min() >= lo - 1e-3 and res.synthetic.array.max() <= hi + 1e-3
    io.write_volume(res.synthetic, tmp_path / "syn.nii.gz")
    back = io.read_volume(tmp_path / "syn.nii.gz")
    assert back.same_geometry(vol, atol=1e-4)
    np.testing.assert_allclose(back.array, res.synthetic.array)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_crop_resize_and_inverse_put_pixels_back_in_place(tmp_path, axis):
    """With an identity network and the same preset on both sides, the synthetic equals the
    (windowed) source inside the body for every slicing axis: no transposition, shift or squash."""
    path = make_bundle(tmp_path / f"b{axis}", dropout=False, axis=axis, source="ct_abdomen", target="ct_abdomen")
    vol = ct_volume(shape=(20, 40, 48))
    tr = engine.VolumeTranslator(load_bundle(path), device="cpu")
    tr.method.translate = identity_translate
    res = tr.translate(vol)
    inner = ndimage.binary_erosion(vol.array > -500, np.ones((3, 3, 3)), iterations=2)  # away from edges
    expected = np.clip(vol.array, -160, 240)
    err = np.abs(res.synthetic.array - expected)[inner]
    assert np.median(err) < 2.0 and err.mean() < 4.0  # resampling blur only (window is 400 HU wide)
    assert np.abs(res.difference.array[inner]).mean() < 4.0
    # a wrong orientation would be far off: flipping the expectation breaks the match
    assert np.abs(res.synthetic.array - expected[:, :, ::-1])[inner].mean() > 20


def test_body_box_keeps_aspect_ratio(det_bundle_path):
    """A wide, short body: the crop box is square in millimetres around it (not the whole slice)."""
    vol = ct_volume(shape=(4, 40, 48), spacing=(1.0, 2.0, 3.0), oblique=False)
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu")
    res = tr.translate(vol)
    r0, r1, c0, c1 = res.info["box"]
    assert (r1 - r0) * 2.0 == pytest.approx((c1 - c0) * 1.0, abs=2.0)  # rows are 2 mm, columns 1 mm
    assert c1 - c0 < 48 + 10


# ---------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_output_different_seed_different(bundle_path):
    vol = ct_volume()
    tr = engine.VolumeTranslator(load_bundle(bundle_path), device="cpu", batch_size=4)
    a = tr.translate(vol, seed=11).synthetic.array
    b = tr.translate(vol, seed=11).synthetic.array
    c = tr.translate(vol, seed=12).synthetic.array
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert tr.translate(vol).info["seed"] != tr.translate(vol).info["seed"]  # None: fresh, recorded


def _recording_method(tr, log):
    """Replace the method by one that logs (batch size, one draw per slice generator, shared_noise,
    steps) and returns zeros."""
    def translate(source, *, masks=None, steps=None, num_samples=1, generator=None, shared_noise=False):
        assert len(generator) == source.shape[0]  # one generator per slice
        log.append((source.shape[0], [float(torch.rand(1, generator=g)) for g in generator], shared_noise, steps))
        return Translation(image=torch.zeros_like(source[:, :1]))

    tr.method.translate = translate
    tr.capabilities = dataclasses.replace(tr.capabilities, shared_noise=True)  # the method says it accepts it


#: Same noise, another batch: what is left is the rounding of CPU kernels that compute a slice
#: differently at another batch size (oneDNN's convolutions for a batch of one, channels-last
#: GroupNorm): ~1e-3 HU at most, where different noise moves voxels by tens of HU.
ROUNDING_HU = 0.01


def _simulate_oom_above(tr, n: int) -> None:
    """Make ``tr``'s method raise out-of-memory for batches of more than ``n`` slices."""
    real = tr.method.translate

    def limited(source, **kwargs):
        if source.shape[0] > n:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(source, **kwargs)

    tr.method.translate = limited


def _draws_per_slice(det_bundle_path, vol, *, batch_size, oom_above=None, **kwargs) -> dict[int, float]:
    """{slice index: the first number its generator gives} over one translation."""
    log: list = []
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=batch_size)
    _recording_method(tr, log)
    if oom_above is not None:
        _simulate_oom_above(tr, oom_above)
    res = tr.translate(vol, seed=5, **kwargs)
    draws = [d for _, batch, _, _ in log for d in batch]
    assert len(draws) == res.slice_range[1] - res.slice_range[0]
    return dict(enumerate(draws, start=res.slice_range[0]))


def test_every_slice_draws_from_its_own_generator_whatever_the_batching(det_bundle_path):
    """A slice's generator is seeded from (seed, its index): the same numbers at any batch size,
    for any slice range and after an out-of-memory back-off."""
    vol = ct_volume(shape=(10, 40, 48))
    whole = _draws_per_slice(det_bundle_path, vol, batch_size=8)
    assert len(set(whole.values())) == 10  # independent streams
    for bs in (1, 3):
        assert _draws_per_slice(det_bundle_path, vol, batch_size=bs) == whole
    part = _draws_per_slice(det_bundle_path, vol, batch_size=3, slice_range=(4, 9))
    assert part == {k: whole[k] for k in range(4, 9)}
    assert _draws_per_slice(det_bundle_path, vol, batch_size=8, oom_above=2) == whole


def test_shared_noise_gives_every_slice_the_same_stream_and_tells_the_method(det_bundle_path):
    vol = ct_volume()
    log: list = []
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=3, shared_noise=True)
    _recording_method(tr, log)
    tr.translate(vol, seed=5, steps=7)
    assert [n for n, *_ in log] == [3, 3, 2]
    assert len({d for _, draws, _, _ in log for d in draws}) == 1 and all(s and st == 7 for _, _, s, st in log)
    log.clear()
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=3)
    _recording_method(tr, log)
    tr.translate(vol, seed=5)
    assert len({d for _, draws, _, _ in log for d in draws}) == 8 and not any(s for _, _, s, _ in log)


@pytest.mark.parametrize("num_samples", [1, 2])
def test_same_seed_same_volume_whatever_the_batch_size_slice_range_or_oom(bundle_path, num_samples):
    """Monte-Carlo dropout (pix2pix test_time_dropout): each slice's masks come from its own
    generator, so batch size 1, 3 or 8, a sub-range of slices or an out-of-memory back-off give
    the same synthetic volume (and uncertainty) for the same seed."""
    vol = ct_volume(shape=(10, 40, 48))
    bundle = load_bundle(bundle_path)

    def run(batch_size, oom_above=None, seed=9, **kwargs):
        tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=batch_size)
        if oom_above is not None:
            _simulate_oom_above(tr, oom_above)
        res = tr.translate(vol, seed=seed, num_samples=num_samples, **kwargs)
        return res.synthetic.array, (None if res.uncertainty is None else res.uncertainty.array), res.info

    assert (run(8)[1] is not None) == (num_samples > 1)
    assert_same_volume_whatever_the_batching(run, (3, 9), other_seed=10)


def test_shared_noise_is_one_noise_for_every_slice(bundle_path):
    """shared_noise with Monte-Carlo dropout: identical source slices give identical synthetic
    slices, whatever their position in their batch; without it they differ."""
    base = ct_volume(shape=(7, 40, 48))
    vol = base.with_array(np.repeat(base.array[:1], 7, axis=0))
    bundle = load_bundle(bundle_path)
    shared = engine.VolumeTranslator(bundle, device="cpu", batch_size=3, shared_noise=True).translate(vol, seed=4)
    syn = shared.synthetic.array
    np.testing.assert_allclose(syn, np.broadcast_to(syn[:1], syn.shape), rtol=0, atol=ROUNDING_HU)
    independent = engine.VolumeTranslator(bundle, device="cpu", batch_size=3).translate(vol, seed=4).synthetic.array
    assert np.abs(independent[1:] - independent[:1]).max(axis=(1, 2)).min() > 1.0  # HU


def test_uncertainty_from_samples(bundle_path):
    vol = ct_volume()
    tr = engine.VolumeTranslator(load_bundle(bundle_path), device="cpu")
    res = tr.translate(vol, seed=1, num_samples=3, slice_range=(2, 6))
    assert res.uncertainty_kind == "std"
    u = res.uncertainty.array
    assert (u >= 0).all() and u[2:6].max() > 0
    assert (u[:2] == 0).all() and (u[6:] == 0).all()
    assert tr.translate(vol, seed=1).uncertainty is None  # one sample: no map


# ---------------------------------------------------------------------------------------------
# batching, out of memory, progress, cancel
# ---------------------------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(det_bundle_path):
    vol = ct_volume()
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=8)
    expected = tr.translate(vol).synthetic.array
    real = tr.method.translate
    sizes = []

    def limited(source, **kwargs):
        sizes.append(source.shape[0])
        if source.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(source, **kwargs)

    tr.method.translate = limited
    res = tr.translate(vol)
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}
    assert res.info["batch_size"] == 2 and res.info["oom_retries"] == 2
    np.testing.assert_allclose(res.synthetic.array, expected, atol=1e-4)

    def always(source, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    tr.method.translate = always
    with pytest.raises(RuntimeError, match="even with one slice per batch"):
        tr.translate(vol)


def test_progress_reports_every_batch_with_eta(det_bundle_path):
    vol = ct_volume(shape=(10, 40, 48))
    calls = []
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=4)
    tr.translate(vol, progress=lambda done, total, eta: calls.append((done, total, eta)))
    assert [c[:2] for c in calls] == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert calls[0][2] is None and all(e >= 0 for _, _, e in calls[1:]) and calls[-1][2] == 0


@pytest.mark.parametrize("kind", ["callable", "event"])
def test_cancel_stops_within_one_batch_and_returns_nothing(det_bundle_path, kind):
    vol = ct_volume(shape=(12, 40, 48))
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=4)
    real = tr.method.translate
    batches = []
    event = threading.Event()

    def counting(source, **kwargs):
        batches.append(source.shape[0])
        return real(source, **kwargs)

    def progress(done, total, eta):
        if done >= 4:
            event.set()

    tr.method.translate = counting
    cancel = event if kind == "event" else event.is_set
    with pytest.raises(engine.TranslationCancelled):
        tr.translate(vol, progress=progress, cancel=cancel)
    assert batches == [4]  # cancelled after the first batch: the second never started


# ---------------------------------------------------------------------------------------------
# slice selection, masks, reference, metrics
# ---------------------------------------------------------------------------------------------
def test_slice_range_and_roi_restrict_the_work(det_bundle_path):
    vol = ct_volume(shape=(12, 40, 48))
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=16, extent_margin=1)
    seen = []
    real = tr.method.translate

    def counting(source, **kwargs):
        seen.append(source.shape[0])
        return real(source, **kwargs)

    tr.method.translate = counting
    res = tr.translate(vol, slice_range=(3, 7))
    assert seen == [4] and res.slice_range == (3, 7)
    syn, diff = res.synthetic.array, res.difference.array
    assert (syn[:3] == -300).all() and (syn[7:] == -300).all()  # window minimum outside
    assert (diff[:3] == 0).all() and (diff[7:] == 0).all() and np.abs(diff[3:7]).max() > 0

    tumor = np.zeros(vol.shape, np.float32)
    tumor[5:7, 20:24, 18:22] = 1
    seen.clear()
    res = tr.translate(vol, masks={"tumor": tumor}, slice_range="tumor")
    assert res.slice_range == (4, 8) and seen == [4]
    with pytest.raises(ValueError, match="names no given mask"):
        tr.translate(vol, slice_range="liver")
    with pytest.raises(ValueError, match="outside the volume"):
        tr.translate(vol, slice_range=(5, 40))


def test_masks_and_reference_on_another_grid_are_resampled(det_bundle_path):
    vol = ct_volume(shape=(10, 40, 48))
    liver = np.zeros(vol.shape, np.float32)
    liver[2:8, 15:30, 10:30] = 1
    liver_vol = vol.with_array(liver)
    # the same mask on a 2x finer grid in x: must come back (nearest) onto the source grid
    sitk_img = liver_vol.to_sitk()
    import SimpleITK as sitk

    ref = sitk.Image([96, 40, 10], sitk.sitkFloat32)
    ref.SetSpacing((vol.spacing[0] / 2, vol.spacing[1], vol.spacing[2]))
    ref.SetOrigin(vol.index_to_physical((-0.25, 0, 0)).tolist())
    ref.SetDirection(vol.direction)
    fine = io.Volume.from_sitk(sitk.Resample(sitk_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor))
    cta = vol.with_array(vol.array + 30)
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", baseline_metrics=True)
    res = tr.translate(vol, masks={"liver": fine}, reference=cta)
    assert set(res.metrics) == {"whole", "body", "liver"}
    assert set(res.baseline_metrics) == {"whole", "body", "liver"}
    for row in res.metrics.values():
        assert set(row) == {"mae", "psnr", "ssim", "rmse"} and row["mae"] > 0
    # the identity baseline is the source through both presets: inside the body it is exact
    # up to the 30 HU offset of this reference
    assert res.baseline_metrics["liver"]["mae"] == pytest.approx(30.0, abs=1.0)
    np.testing.assert_allclose(res.reference_difference.array, res.synthetic.array - cta.array, atol=1e-3)
    assert set(res.consistency) == {"synthetic", "reference", "ratio"}

    far = io.Volume(liver, vol.spacing, (5000.0, 5000.0, 5000.0), vol.direction, source="far-mask")
    with pytest.raises(ValueError, match="does not overlap"):
        tr.translate(vol, masks={"liver": far})
    with pytest.raises(ValueError, match="does not match"):
        tr.translate(vol, masks={"liver": np.zeros((3, 3, 3))})


def test_masks_reach_methods_that_use_them(det_bundle_path):
    vol = ct_volume()
    tumor = np.zeros(vol.shape, np.float32)
    tumor[3:5, 18:26, 15:25] = 1
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", batch_size=8)
    got = {}

    def translate(source, *, masks=None, **kwargs):
        got.update(masks)
        return Translation(image=source.clone())

    tr.method.translate = translate
    tr.capabilities = dataclasses.replace(tr.capabilities, uses_masks=True)  # a method that reads masks
    tr.translate(vol, masks={"tumor": tumor})
    assert set(got) == {"tumor", "body"}
    assert got["tumor"].shape == (8, 1, 64, 64) and set(got["tumor"].unique().tolist()) == {0.0, 1.0}
    assert got["tumor"][3:5].sum() > 0 and got["tumor"][:3].sum() == 0


def test_target_presets_needing_statistics(tmp_path):
    mr_mr = make_bundle(tmp_path / "mr", dropout=False, source="mr_percentile", target="mr_percentile")
    vol = io.Volume(np.random.default_rng(0).uniform(0, 800, (4, 32, 32)).astype(np.float32))
    res = engine.VolumeTranslator(load_bundle(mr_mr), device="cpu").translate(vol)
    assert res.info["target_preset"]["upper"] == res.info["source_preset"]["upper"]
    ct_mr = make_bundle(tmp_path / "ctmr", dropout=False, source="ct_abdomen", target="mr_zscore")
    with pytest.raises(BundleError, match="no intensity statistics"):
        engine.VolumeTranslator(load_bundle(ct_mr), device="cpu").translate(vol)


def test_bf16_autocast_on_cpu_is_close_to_fp32(det_bundle_path):
    vol = ct_volume()
    ref = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu").translate(vol).synthetic.array
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", precision="bf16")
    res = tr.translate(vol)
    assert res.info["precision"] == "bf16"
    assert np.abs(res.synthetic.array - ref).mean() < 10.0  # HU, in a 1000 HU window


def test_onnx_runtime_backend_matches_pytorch_and_says_so(det_bundle_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")  # in requirements-dev.txt: CI runs this
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path))  # the export cache
    vol = ct_volume()
    eager = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu").translate(vol, seed=1)
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", backend="auto")
    ort = tr.translate(vol, seed=1)
    assert eager.info["backend"] == "pytorch" and ort.info["backend"] == "onnxruntime"
    assert isinstance(tr.method.generator, onnx_backend.OrtNetwork)  # the network ORT runs
    half_window = ort.info["target_preset"]["width"] / 2  # 1e-4 in [-1, 1], in HU
    assert np.abs(ort.synthetic.array - eager.synthetic.array).max() <= 1e-4 * half_window
    assert list(tmp_path.glob("onnx-cache/*.onnx"))  # exported once, beside the model store
    with pytest.raises(ValueError, match="backend must be"):
        engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu", backend="onnx")


def test_loaded_bundle_and_bad_arguments(det_bundle_path):
    b = load_bundle(det_bundle_path)
    tr = engine.VolumeTranslator(b, device="cpu")
    assert tr.bundle is b and tr.size == 64 and tr.precision == "fp32"
    with pytest.raises(ValueError, match="batch_size"):
        engine.VolumeTranslator(b, device="cpu", batch_size=0)
    with pytest.raises(BundleError):
        engine.VolumeTranslator(load_bundle(det_bundle_path.parent / "nope"), device="cpu")
    with pytest.raises(ValueError, match="expected a Volume"):
        tr.translate(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="num_samples"):
        tr.translate(ct_volume(), num_samples=0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def test_resolve_device_and_precision():
    assert engine.resolve_device("cpu") == torch.device("cpu")
    assert engine.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:99", "tpu:0"):
        with pytest.raises(ValueError, match="device"):
            engine.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            engine.resolve_device("cuda")
    cpu = torch.device("cpu")
    assert engine.resolve_precision("auto", cpu) is None
    assert engine.resolve_precision("bf16", cpu) is torch.bfloat16
    assert engine.resolve_precision("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="precision"):
        engine.resolve_precision("fp8", cpu)


def test_shard_and_distributed_env():
    cases = list("abcdefg")
    shares = [engine.shard(cases, r, 3) for r in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert sorted(sum(shares, [])) == cases
    assert engine.distributed_env({}) == (0, 1, 0)
    assert engine.distributed_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError):
        engine.distributed_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError):
        engine.shard(cases, 1, 1)


def test_mask_slice_range():
    m = np.zeros((10, 4, 4))
    m[4:6, 1, 1] = 1
    assert engine.mask_slice_range(m, 0, 2) == (2, 8)
    assert engine.mask_slice_range(m, 0, 9) == (0, 10)
    assert engine.mask_slice_range(m, 1, 0) == (1, 2)
    assert engine.mask_slice_range(np.zeros((3, 3, 3)), 0, 1) is None


def test_inter_slice_consistency():
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None] * 3, (5, 4, 4))
    assert maps.inter_slice_consistency(ramp) == pytest.approx(3.0)
    assert maps.inter_slice_consistency(ramp, axis=1) == 0.0
    mask = np.zeros((5, 4, 4), bool)
    mask[1:3] = True
    assert maps.inter_slice_consistency(ramp * np.arange(4)[None, :, None], mask=mask) == pytest.approx(4.5)
    rep = maps.consistency_report(ramp * 2, ramp, slice_range=(1, 4))
    assert rep == {"synthetic": pytest.approx(6.0), "reference": pytest.approx(3.0), "ratio": pytest.approx(2.0)}
    assert np.isnan(maps.inter_slice_consistency(ramp, slice_range=(2, 3)))


def test_uncertainty_scaling_and_figure(tmp_path):
    u = np.full((2, 2), 0.1, np.float32)
    assert maps.uncertainty_to_physical(u, 500.0, "std")[0, 0] == pytest.approx(50.0)
    assert maps.uncertainty_to_physical(u, 500.0, "variance")[0, 0] == pytest.approx(25000.0)
    vol = np.random.default_rng(0).normal(size=(6, 10, 12)).astype(np.float32)
    views = maps.orthogonal_views(vol, maps.focus_index(None, vol > 2, shape=vol.shape), (1.0, 1.0, 2.5))
    assert [v[0] for v in views] == ["axial", "coronal", "sagittal"]
    assert views[0][1].shape == (10, 12) and views[1][1].shape == (6, 12) and views[2][2] == 2.5
    rows = [{"label": n, "source": im, "synthetic": im, "difference": im - 1, "aspect": a} for n, im, a in views]
    path = maps.comparison_figure(tmp_path / "f.png", rows, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_channels_last_falls_back_to_contiguous_for_methods_that_need_it(det_bundle_path):
    vol = ct_volume()
    tr = engine.VolumeTranslator(load_bundle(det_bundle_path), device="cpu")
    assert tr.channels_last
    weight = next(p for p in tr.method.parameters() if p.ndim == 4 and p.shape[1] > 1)
    real = tr.method.translate

    def fussy(source, **kwargs):  # stands in for a method using .view on its feature maps
        if not weight.is_contiguous():
            raise RuntimeError("view size is not compatible with input tensor's size and stride")
        return real(source, **kwargs)

    tr.method.translate = fussy
    with pytest.warns(UserWarning, match="channels-last input failed"):
        res = tr.translate(vol)
    assert not tr.channels_last and np.isfinite(res.synthetic.array).all()
    tr.method.translate = lambda source, **kw: (_ for _ in ()).throw(RuntimeError("broken method"))
    with pytest.raises(RuntimeError, match="broken method"):
        tr.translate(vol)


def test_only_the_asked_outputs_are_computed_and_the_synthetic_is_the_same(tmp_path):
    """Issue 14: a plain translate computes no difference, uncertainty or consistency."""
    from MedTranslateLib import maps
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.engine import OPTIONAL_OUTPUTS, VolumeTranslator

    translator = VolumeTranslator(load_bundle(make_bundle(tmp_path / "b")), device="cpu", batch_size=4)
    vol = ct_volume()
    ref = vol.with_array(vol.array + 30)
    full = translator.translate(vol, reference=ref, num_samples=2, seed=3)
    calls = []
    real = maps.consistency_report
    try:
        maps.consistency_report = lambda *a, **k: calls.append(1) or real(*a, **k)
        bare = translator.translate(vol, reference=ref, num_samples=2, seed=3, outputs=())
    finally:
        maps.consistency_report = real
    assert full.difference is not None and full.uncertainty is not None and full.consistency
    assert full.reference_difference is not None
    assert bare.difference is None and bare.uncertainty is None and bare.reference_difference is None
    assert bare.consistency == {} and calls == []
    np.testing.assert_array_equal(bare.synthetic.array, full.synthetic.array)
    assert bare.metrics == full.metrics  # the metrics come with a reference, whatever was asked
    some = translator.translate(vol, num_samples=2, seed=3, outputs={"uncertainty"})
    np.testing.assert_array_equal(some.uncertainty.array, full.uncertainty.array)
    assert some.difference is None
    with pytest.raises(ValueError, match="unknown outputs"):
        translator.translate(vol, outputs={"heatmap"})
    assert OPTIONAL_OUTPUTS == {"difference", "reference_difference", "uncertainty", "consistency"}


def test_body_mask_holes_never_change_the_crop_box():
    from MedTranslateLib.data import SliceGeometry, body_mask

    vol = ct_volume(shape=(6, 40, 48))
    arr = vol.array.copy()
    arr[:, 18:24, 14:22] = -1000.0  # a hole (air) inside the body
    vol = vol.with_array(arr)
    filled, unfilled = body_mask(vol), body_mask(vol, fill_holes=False)
    assert filled.sum() > unfilled.sum()
    boxes = [SliceGeometry.from_mask(m.any(axis=0), 64).box for m in (filled, unfilled)]
    assert boxes[0] == boxes[1]


def assert_same_volume_whatever_the_batching(run, part: tuple[int, int], other_seed: int) -> None:
    """``run(batch_size, oom_above=None, seed=..., **translate_kwargs) -> (synthetic, uncertainty,
    info)``: batch sizes 8, 1 and 3, a slice range and a simulated out-of-memory back-off give the
    same volume (to ``ROUNDING_HU``), and another seed a different one."""
    same = dict(rtol=0, atol=ROUNDING_HU)
    whole, unc, _ = run(8)
    for bs in (1, 3):
        syn, u, _ = run(bs)
        np.testing.assert_allclose(syn, whole, **same)
        if unc is not None:
            np.testing.assert_allclose(u, unc, **same)
    first, last = part
    sub, _, _ = run(3, slice_range=part)
    np.testing.assert_allclose(sub[first:last], whole[first:last], **same)
    syn, _, info = run(8, oom_above=2)
    assert info["oom_retries"] == 2
    np.testing.assert_allclose(syn, whole, **same)
    assert np.abs(run(8, seed=other_seed)[0] - whole).max() > 1.0  # the noise matters (HU)


# ---------------------------------------------------------------------------------------------
# per-slice confidence (rlbcd, issue 17)
# ---------------------------------------------------------------------------------------------
def make_rlbcd_bundle(path, *, select: str = "lcs"):
    """Tiny rlbcd (pixel space, 16x16 slices, two 8-channel U-Nets, H_E) with perturbed output
    convs so samples differ and each slice gets its own confidence exp(-MSE / MSE_ref)."""
    torch.manual_seed(0)
    unet = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
            "num_head_channels": 8, "norm_groups": 4}
    method = build_method("rlbcd", {"unet": unet, "steps": 3, "sam": {"levels": [0, 1]},
                                    "cma": {"levels": [0, 1], "num_head_channels": 4},
                                    "lcs": {"pretrain_steps": 2, "channels": 8}, "select": select})
    with torch.no_grad():
        for net in (method.unet, method.residual_unet):
            net.out[-1].weight.normal_(0.0, 0.3)
        method.lcs_mse_ref.fill_(0.05)
    meta = {"source": {"modality": "ct", "preset": "ct_angio"},
            "target": {"modality": "cta_arterial", "preset": "ct_angio"}, "slice": {"size": 16, "axis": 0}}
    return save_bundle(method, meta, path)


def test_engine_carries_rlbcd_per_slice_confidence(tmp_path):
    vol = ct_volume(shape=(6, 40, 48))
    tr = engine.VolumeTranslator(load_bundle(make_rlbcd_bundle(tmp_path / "rl")), device="cpu", batch_size=2)
    res = tr.translate(vol, seed=1, num_samples=3, slice_range=(1, 5))
    conf = res.confidence
    assert conf.shape == (6,) and np.isnan(conf[[0, 5]]).all()
    inside = conf[1:5]
    assert np.isfinite(inside).all() and ((inside > 0) & (inside <= 1)).all()
    assert np.unique(inside).size > 1  # one score per slice, not one for the batch


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")  # width, height


def test_confidence_summary_names_the_lowest_slices_and_the_figure_plots_it(tmp_path):
    conf = np.array([np.nan, 0.8, 0.3, 0.9, 0.3, 0.6, np.nan])
    s = maps.confidence_summary(conf, lowest=3)
    assert s["slices"] == 5 and s["mean"] == pytest.approx(np.nanmean(conf)) and s["min"] == 0.3
    assert [(r["slice"], r["confidence"]) for r in s["lowest"]] == [(2, 0.3), (4, 0.3), (5, 0.6)]
    assert maps.confidence_summary(np.full(4, np.nan)) is None and maps.confidence_summary(None) is None
    line = maps.confidence_line(s)
    assert line.startswith("confidence: mean 0.58, min 0.30 over 5 slices") and "slice 2 (0.30), 4 (0.30), 5 (0.60)" in line
    im = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
    rows = [{"label": "axial", "source": im, "synthetic": im}]
    plain = maps.comparison_figure(tmp_path / "a.png", rows, dpi=50)
    with_conf = maps.comparison_figure(tmp_path / "b.png", rows, confidence=conf, dpi=50)
    unchanged = maps.comparison_figure(tmp_path / "c.png", rows, confidence=np.full(7, np.nan), dpi=50)
    (w0, h0), (w1, h1) = _png_size(plain), _png_size(with_conf)
    assert w1 == w0 and h1 == h0 + 2 * 50  # one 2-inch plot row under the views
    assert _png_size(unchanged) == (w0, h0)


def test_per_volume_selection_takes_one_sample_index_for_the_whole_volume(tmp_path, bundle_path):
    vol = ct_volume(shape=(8, 40, 48))

    def run(select="per_slice", rule="lcs"):
        tr = engine.VolumeTranslator(load_bundle(make_rlbcd_bundle(tmp_path / rule, select=rule)), device="cpu",
                                     batch_size=3)
        return tr.translate(vol, seed=4, num_samples=3, slice_range=(1, 7), select=select)

    per_slice, per_volume, mean = run(), run("per_volume"), run(rule="mean")
    k = per_volume.info["selected_sample"]
    assert per_volume.info["select"] == "per_volume" and k in range(3) and "selected_sample" not in per_slice.info
    best, chosen = per_slice.confidence[1:7], per_volume.confidence[1:7]
    assert np.isnan(per_volume.confidence[[0, 7]]).all()
    # per slice the method takes its best sample; per volume sample k everywhere: never better,
    # equal where k is that slice's best, and here the per-slice choice does change along z
    same = np.isclose(chosen, best, rtol=0, atol=0)
    assert (chosen <= best).all() and same.any() and not same.all()
    syn_s, syn_v = (r.synthetic.array[1:7] for r in (per_slice, per_volume))
    assert all(np.array_equal(syn_s[i], syn_v[i]) == bool(same[i]) for i in range(6))
    # k has the highest volume-mean confidence: at least the mean over samples (select: mean)
    assert chosen.mean() >= mean.confidence[1:7].mean() - 1e-7
    # the uncertainty is the std over the same samples either way
    np.testing.assert_array_equal(per_slice.uncertainty.array, per_volume.uncertainty.array)
    assert np.array_equal(per_volume.synthetic.array[0], per_slice.synthetic.array[0])  # untranslated slice
    with pytest.raises(ValueError, match="select must be one of"):
        engine.VolumeTranslator(load_bundle(bundle_path), device="cpu").translate(vol, select="best")
    with pytest.raises(ValueError, match="gives no confidence") as refused:
        engine.VolumeTranslator(load_bundle(bundle_path), device="cpu").translate(vol, select="per_volume")
    assert "\n" not in str(refused.value)
    assert not load_bundle(bundle_path).method.capabilities.sample_confidence
    assert load_bundle(tmp_path / "lcs").method.capabilities.sample_confidence  # made by run() above
