"""The engine on a CUDA GPU: fp32 against the CPU, bf16/fp16 autocast against fp32, same seed
same output, batch-size invariance, real out-of-memory back-off and the automatic batch size.

Marked ``gpu``: skipped (with the reason) where ``torch.cuda.is_available()`` is False, so the
CPU suite stays green; ``benchmarks/device_check.sh`` runs them on a GPU machine
(``pytest -m gpu Testing/test_gpu.py``). Every test runs the real ``VolumeTranslator`` on the
shipped demo bundles (``app.bundled_models()``) over small phantom volumes; each prints what it
measured (``-rA`` shows it) so that a failing bound can be reset from data.

Tolerances, in the target's physical units (HU for every shipped demo), over the body voxels:

- fp32 CUDA vs CPU (``FP32_HU``): fp32 on CUDA is what users get, i.e. cuDNN convolutions with
  TF32 (``torch.backends.cudnn.allow_tf32`` is on by default: a 10-bit mantissa, ~5e-4 relative
  per product) against CPU fp32. The wide CT window maps 1.0 of the network's [-1, 1] range to
  1024 HU, so ~1e-3 of drift is ~1 HU: mean <= 1 HU, 99th percentile <= 5 HU. Deterministic
  models only: a stochastic model draws its noise from a ``torch.Generator`` on the engine's
  device (Philox on CUDA, Mersenne twister on CPU), so CPU and CUDA draw different noise for the
  same seed; there the CUDA output must be no further from the CPU one than two CPU seeds are
  from each other (x 1.5 + 1 HU), with the same mean within 2 HU.
- bf16 / fp16 autocast vs fp32 on CUDA, same seed (same noise stream): bf16 keeps 8 mantissa
  bits (~4e-3 relative: ~4 HU per rounding at 1024 HU per unit), fp16 11 bits (~5e-4): bf16 mean
  <= 15 HU, p99 <= 60 HU; fp16 mean <= 3 HU, p99 <= 15 HU; both finite everywhere. Percentiles,
  not the maximum: a latent model's codebook lookup can flip a code where two are near-equal.
- batch size 1 vs 8 (``KERNEL_HU``): the engine's module docstring, "at most 0.004 HU on the
  bundled resshift demo", "on GPU cuDNN chooses kernels by shape": max |difference| <= 0.004 HU,
  every model, fp32 (a slice's noise does not depend on its batch).
- same seed twice, same batch size, same device: identical arrays.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from MedTranslateLib import app, phantom
from MedTranslateLib.bundle import load_bundle
from MedTranslateLib.engine import VolumeTranslator
from MedTranslateLib.regions import BODY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = {p.name: p for p in app.bundled_models()}
SEED = 11
FP32_HU = {"mean": 1.0, "p99": 5.0}
AUTOCAST_HU = {"bf16": {"mean": 15.0, "p99": 60.0}, "fp16": {"mean": 3.0, "p99": 15.0}}
KERNEL_HU = 0.004
STEPS = 4  # sampling steps of the models that take them (c2fmit): seconds, not minutes, on the CPU
STOCHASTIC_FACTOR, STOCHASTIC_SLACK_HU, STOCHASTIC_MEAN_HU = 1.5, 1.0, 2.0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_phantom():
    """16 slices of 64x64 (about 5 mm voxels): seconds per model on a GPU and on 16 CPU cores."""
    return phantom.generate_case(0, phantom.PhantomConfig(shape=(16, 64, 64), spacing=(5.0, 5.0, 6.0),
                                                          tumor_count=(1, 1)))


@pytest.fixture(scope="module")
def tall_phantom():
    """48 slices: room for a batch of 48 to be halved more than once."""
    return phantom.generate_case(1, phantom.PhantomConfig(shape=(48, 64, 64), spacing=(5.0, 5.0, 3.0),
                                                          tumor_count=(1, 1)))


def _case(ph, bundle):
    meta = bundle.meta
    return app.phantom_case(ph, meta.source.modality, None)


@contextlib.contextmanager
def _cpu_threads():
    """The CPU reference on every core (conftest pins torch to one thread for the CPU suite)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _translate(bundle_path, ph, *, device="cuda", precision="fp32", batch_size=8, seed=SEED, **kwargs):
    """(synthetic array, body mask, info) of one real engine run over the phantom's source."""
    bundle = load_bundle(bundle_path)
    case = _case(ph, bundle)
    tr = VolumeTranslator(bundle, device=device, precision=precision, batch_size=batch_size, **kwargs)
    steps = STEPS if tr.capabilities.steps else None
    with _cpu_threads() if device == "cpu" else contextlib.nullcontext():
        res = tr.translate(case.source, masks=case.masks, seed=seed, steps=steps, outputs=())
    return res.synthetic.array, case.masks[BODY], res.info


def _stats(a: np.ndarray, b: np.ndarray, body: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    inside = d[body]
    return {"mean": float(inside.mean()), "p99": float(np.percentile(inside, 99)), "max": float(d.max())}


def _report(what: str, **values) -> str:
    text = f"{what}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(text)
    return text


def _stochastic(path) -> bool:
    return bool(load_bundle(path).method.capabilities.stochastic)


# ---------------------------------------------------------------------------------------------
# fp32 against the CPU; autocast against fp32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_on_cuda_matches_the_cpu(name, small_phantom):
    path = MODELS[name]
    gpu, body, info = _translate(path, small_phantom, device="cuda")
    assert info["device"].startswith("cuda") and info["precision"] == "fp32" and info["oom_retries"] == 0
    cpu, _, cpu_info = _translate(path, small_phantom, device="cpu")
    assert cpu_info["device"] == "cpu" and np.isfinite(gpu).all()
    s = _stats(gpu, cpu, body)
    if not _stochastic(path):
        msg = _report(f"{name} fp32 cuda vs cpu (HU)", **s)
        assert s["mean"] <= FP32_HU["mean"] and s["p99"] <= FP32_HU["p99"], msg
        return
    # different noise streams per device: CUDA vs CPU is compared like two seeds on the CPU
    other, _, _ = _translate(path, small_phantom, device="cpu", seed=SEED + 1)
    seeds = _stats(cpu, other, body)
    mean_shift = abs(float(gpu[body].mean() - cpu[body].mean()))
    msg = _report(f"{name} (stochastic) fp32 cuda vs cpu (HU)", **s, cpu_seed_vs_seed_mean=seeds["mean"],
                  cpu_seed_vs_seed_p99=seeds["p99"], body_mean_shift=mean_shift)
    assert s["mean"] <= STOCHASTIC_FACTOR * seeds["mean"] + STOCHASTIC_SLACK_HU, msg
    assert s["p99"] <= STOCHASTIC_FACTOR * seeds["p99"] + STOCHASTIC_SLACK_HU, msg
    assert mean_shift <= STOCHASTIC_MEAN_HU, msg


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_autocast_stays_close_to_fp32_and_finite(name, precision, small_phantom):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    path = MODELS[name]
    fp32, body, _ = _translate(path, small_phantom, precision="fp32")
    low, _, info = _translate(path, small_phantom, precision=precision)
    assert info["precision"] == precision and info["device"].startswith("cuda")
    assert np.isfinite(low).all(), f"{name} {precision}: non-finite voxels"
    s = _stats(low, fp32, body)
    msg = _report(f"{name} {precision} vs fp32 on cuda (HU)", **s)
    bound = AUTOCAST_HU[precision]
    assert s["mean"] <= bound["mean"] and s["p99"] <= bound["p99"], msg


# ---------------------------------------------------------------------------------------------
# determinism and batch-size invariance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_output_and_batch_size_invariance_on_cuda(name, small_phantom):
    path = MODELS[name]
    a, body, _ = _translate(path, small_phantom, batch_size=8)
    b, _, _ = _translate(path, small_phantom, batch_size=8)
    one, _, info_one = _translate(path, small_phantom, batch_size=1)
    assert info_one["batch_size"] == 1
    s = _stats(one, a, body)
    msg = _report(f"{name} cuda fp32: same seed twice max={float(np.abs(a - b).max()):.3g}; batch 1 vs 8 (HU)", **s)
    assert np.array_equal(a, b), f"{name}: two CUDA runs with seed {SEED} differ; {msg}"
    assert s["max"] <= KERNEL_HU, msg
    if _stochastic(path):  # the seed matters: the check above is not vacuous
        other, _, _ = _translate(path, small_phantom, batch_size=8, seed=SEED + 1)
        assert not np.array_equal(a, other)


# ---------------------------------------------------------------------------------------------
# out-of-memory back-off and the automatic batch size
# ---------------------------------------------------------------------------------------------
def _oom_model() -> str:
    """The heaviest shipped demo per slice (c2fmit's latent bridge at 128²), else any."""
    return next((n for n in sorted(MODELS) if n.startswith("c2fmit")), sorted(MODELS)[0])


def _peak_bytes(path, ph, batch_size: int) -> int:
    """Peak CUDA memory of one translation beyond what the loaded model holds."""
    bundle = load_bundle(path)
    case = _case(ph, bundle)
    tr = VolumeTranslator(bundle, device="cuda", precision="fp32", batch_size=batch_size)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tr.translate(case.source, masks=case.masks, seed=SEED, steps=STEPS if tr.capabilities.steps else None,
                 outputs=())
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.skipif(not MODELS, reason="no shipped demo bundles")
def test_real_out_of_memory_halves_the_batch_and_gives_the_same_volume(tall_phantom):
    """A per-process memory cap (``torch.cuda.set_per_process_memory_fraction``, restored after)
    that fits the model, a batch's fixed overhead and about 16 slices' activations: a batch of 48 runs out of memory for
    real, the engine halves it until it fits, and the volume equals an uncapped run at the batch
    size it ended with (within the kernel tolerance: under the cap cuDNN may pick kernels with a
    smaller workspace)."""
    name = _oom_model()
    path = MODELS[name]
    slices = tall_phantom.images["ct"].shape[0]
    p2, p8 = _peak_bytes(path, tall_phantom, 2), _peak_bytes(path, tall_phantom, 8)
    per_slice = (p8 - p2) / 6
    fixed = max(p2 - 2 * per_slice, 0.0)
    if per_slice < 1 << 20:
        pytest.skip(f"{name}: {per_slice / 2**20:.2f} MiB per slice, too little to cap reliably")
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    bundle = load_bundle(path)
    case = _case(tall_phantom, bundle)
    tr = VolumeTranslator(bundle, device="cuda", precision="fp32", batch_size=slices)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_reserved(device) + fixed + 16 * per_slice + (8 << 20)
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    try:
        res = tr.translate(case.source, masks=case.masks, seed=SEED, steps=STEPS if tr.capabilities.steps else None,
                           outputs=())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    info = res.info
    _report(f"{name} capped at {limit / 2**20:.0f} MiB (per slice {per_slice / 2**20:.1f} MiB, "
            f"fixed {fixed / 2**20:.1f} MiB)", batch_size=info["batch_size"], oom_retries=info["oom_retries"])
    assert info["oom_retries"] >= 1 and info["batch_size"] < slices
    assert info["batch_size"] == max(1, slices >> info["oom_retries"])
    ref, body, ref_info = _translate(path, tall_phantom, batch_size=info["batch_size"])
    assert ref_info["oom_retries"] == 0
    s = _stats(res.synthetic.array, ref, body)
    msg = _report(f"{name} after OOM back-off vs uncapped at batch {info['batch_size']} (HU)", **s)
    assert s["max"] <= KERNEL_HU, msg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_batch_size_on_cuda_is_more_than_one_and_reported(name, tall_phantom):
    path = MODELS[name]
    syn, body, info = _translate(path, tall_phantom, batch_size="auto")
    slices = tall_phantom.images["ct"].shape[0]
    _report(f"{name} auto batch on cuda", batch_size=info["batch_size"], slices=slices,
            slices_per_second=info["slices_per_second"])
    assert info["device"].startswith("cuda") and info["oom_retries"] == 0
    assert 1 < info["batch_size"] <= min(64, slices)  # 64: VolumeTranslator's max_batch_size default
    ref, _, _ = _translate(path, tall_phantom, batch_size=8)
    s = _stats(syn, ref, body)
    msg = _report(f"{name} auto batch {info['batch_size']} vs batch 8 (HU)", **s)
    assert s["max"] <= KERNEL_HU, msg
