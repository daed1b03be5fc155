"""Volume translation: a source ``Volume`` in, a synthetic ``Volume`` in the source's geometry out.

``VolumeTranslator(bundle).translate(volume, masks=..., reference=...)`` runs a model bundle over
a whole volume:

1. the source goes through the bundle's source preset to [-1, 1] (fitted to this volume, as in
   training); slices are taken along the bundle's axis;
2. one in-plane box for the whole volume (the body's bounding box over all slices, square in
   millimetres; ``data.SliceGeometry``) is cropped and resized to the model's slice size, so a
   512x512 CT is not squashed; the output is resized back into that box;
3. slices go through ``method.translate`` in batches under ``torch.inference_mode``, in
   channels-last memory format, with bf16/fp16 autocast on GPU; the batch size comes from free
   GPU memory (8 on CPU) and is halved on out-of-memory instead of failing;
4. the synthetic slices go back to physical units (HU for CT) through the target preset's
   inverse, in the source's spacing, origin and direction.

Outside the translated slices and outside the in-plane box the synthetic volume holds the
target window's lowest value (the preset's -1), and the difference maps hold 0.

Randomness: every slice gets its own ``torch.Generator``, seeded from (run seed, the slice's
index along the axis in the volume); ``method.translate`` gets the batch's generators as a list,
one per slice, and draws every random number of a slice from that slice's generator
(``nn.noise``): a diffusion sampler's prior and step noise, Monte-Carlo dropout masks, each of
``num_samples`` samples. A slice's noise depends only on the seed and its index, not on the
batch size (fixed, automatic, or halved on out-of-memory) nor on ``slice_range``, so the same
seed gives the same volume. What can still differ is the rounding of kernels that compute a
slice differently at another batch size (on CPU oneDNN takes other convolution kernels for a
batch of one slice and channels-last GroupNorm splits its sums by batch; on GPU cuDNN chooses
kernels by shape): at most 0.004 HU on the bundled resshift demo, none where the kernels agree,
where two seeds differ by up to 10 HU. ``shared_noise=True`` seeds every slice's generator with
the run seed alone, so every slice gets the same noise wherever it sits in its batch; a method
whose capabilities declare ``shared_noise`` is also passed ``shared_noise=True`` and draws that
one noise map once per batch instead of once per slice (neighbouring slices, same noise:
smoother across slices for diffusion models).

Best of N per volume (``translate(select="per_volume")``): a method that scores every sample
(``Translation.sample_confidence`` (N, B), rlbcd's LCS) picks its best sample slice by slice, and
neighbouring slices can then come from different samples (flicker along the axis).
``per_volume`` instead takes one sample index k* for the whole volume: the one whose confidence,
averaged over the translated slices, is highest (ties: the lowest index); every slice is sample
k* and its confidence is sample k*'s. The choice needs every slice's scores, so the N samples of
the translated slices are kept, at the model's slice size and in [-1, 1], until the loop ends:
N x slices x size² x 4 bytes (10 samples of 300 slices at 256²: 786 MB), not a whole volume per
sample. Running the volume twice (scores, then the chosen sample) would keep nothing but double
the sampling time, and no method scores a sample without drawing it. The uncertainty is the
per-pixel std over the samples either way.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import io as mio
from . import onnx_backend
from .bundle import Bundle, BundleError, meta_rois, side_preset
from .data import SliceGeometry, body_mask
from .intensity import IntensityPreset
from .maps import consistency_report, difference_map, uncertainty_to_physical
from .metrics import SSIM_WINDOW, SYNTHRAD_CT_RANGE, roi_metrics_many
from .regions import BODY, WHOLE, ordered_regions
from .runtime import SELECT_MODES, distributed_env, first_line, resolve_device, resolve_precision, shard

__all__ = [
    "VolumeTranslator",
    "Result",
    "TranslationCancelled",
    "resolve_device",
    "resolve_precision",
    "mask_slice_range",
    "identity_baseline",
    "distributed_env",
    "shard",
    "CPU_BATCH_SIZE",
    "SELECT_MODES",
]
# resolve_device, resolve_precision, distributed_env and shard live in ``runtime``; they stay
# importable from here. So does SELECT_MODES (``translate(select=...)``: the method's choice per
# slice, or one sample index per volume), in ``runtime`` so that the Slicer panel needs no torch.

#: Batch size "auto" on CPU: large enough to amortise per-call overhead, small in memory.
CPU_BATCH_SIZE = 8

_IN_PLANE = {0: (1, 2), 1: (0, 2), 2: (0, 1)}  # (row, col) axes of (z, y, x) per slicing axis

ProgressFn = Callable[[int, int, float | None], Any]


class TranslationCancelled(Exception):  # noqa: N818 - reads better at the call site
    """Raised by ``VolumeTranslator.translate`` when ``cancel`` fired; nothing is returned."""


@dataclass
class Result:
    """What ``VolumeTranslator.translate`` returns. Volumes share the source's geometry.

    synthetic: the synthetic target, physical units (HU for CT).
    difference: synthetic - the identity baseline (the source in the target's units: the source
        itself for CT -> CT, else mapped through both presets; ``identity_baseline``); 0 outside
        the translated slices.
    uncertainty: per-voxel uncertainty in target units (``uncertainty_kind`` says std or
        variance) when the method defines one; 0 outside the translated slices.
    confidence: (n,) per slice along the axis, NaN where not translated; None when undefined.
    reference_difference: synthetic - reference (when a reference was given).
    metrics: region -> {mae, psnr, ssim, rmse} of synthetic vs reference over the translated
        slices (regions: whole, body, then every given ROI mask, ``regions.metric_regions``);
        ``baseline_metrics`` the same for the identity baseline (when asked for).
    consistency: inter-slice consistency (mean |slice k+1 - slice k| in the body) of the
        synthetic and the reference, and their ratio.
    slice_range: [first, last) slices translated along ``axis``.
    info: device, precision, batch size, out-of-memory retries, seed, timings.

    The optional outputs (``OPTIONAL_OUTPUTS``) are None (consistency: empty) when
    ``translate(outputs=...)`` did not ask for them.
    """

    synthetic: mio.Volume
    difference: mio.Volume | None = None
    uncertainty: mio.Volume | None = None
    uncertainty_kind: str | None = None
    confidence: np.ndarray | None = None
    reference_difference: mio.Volume | None = None
    metrics: dict[str, dict[str, float]] | None = None
    baseline_metrics: dict[str, dict[str, float]] | None = None
    consistency: dict[str, float] = field(default_factory=dict)
    slice_range: tuple[int, int] = (0, 0)
    axis: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# slice selection
# ---------------------------------------------------------------------------------------------
def mask_slice_range(mask: np.ndarray, axis: int, margin: int) -> tuple[int, int] | None:
    """[first, last) slices along ``axis`` from ``margin`` before the first slice holding mask
    voxels to ``margin`` after the last one (clipped to the volume); None for an empty mask."""
    m = np.asarray(mask) > 0
    present = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
    if present.size == 0:
        return None
    return max(0, int(present[0]) - margin), min(m.shape[axis], int(present[-1]) + 1 + margin)


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


#: What ``translate(outputs=...)`` can leave out: each costs whole-volume passes (issue 14: a
#: plain translate spent most of its time on maps nobody asked for).
OPTIONAL_OUTPUTS = frozenset({"difference", "reference_difference", "uncertainty", "consistency"})


def _slice_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed from (run seed, the slice's index in the volume)."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), index]).generate_state(2, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
class VolumeTranslator:
    """Translate whole volumes with a loaded model bundle.

    bundle: a loaded ``Bundle`` (``bundle.load_bundle``; by model name: ``app.load_model``).
    device: "auto" | "cpu" | "cuda" | "cuda:N". precision: "auto" | "fp32" | "bf16" | "fp16".
    batch_size: "auto" or slices per batch (an upper bound: halved on out-of-memory).
    shared_noise: the same noise for every slice (every slice's generator seeded with the seed).
    extent_margin: slices kept on each side of a mask's extent when ``slice_range`` names a mask
        (not the training's ``SliceSpec.roi_margin``, which is around the largest-area slice).
    channels_last: "auto" (on; switched off with a warning if the method fails on channels-last
        input) or a bool. max_batch_size: cap of the automatic batch size.
    baseline_metrics: also compute the identity baseline's metrics when a reference is given.
    backend: "pytorch", or "auto": on CPU without autocast, the method's inference networks run
        through ONNX Runtime when it is installed and its export matches PyTorch on the first batch
        (``onnx_backend``; ``info["backend"]`` says which ran).

    Slices are taken as the bundle's ``slice`` spec says (the one training used: axis, size,
    in-plane box margin); ROI names and capabilities come from the bundle and its method.
    """

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto",
                 precision: str = "auto", batch_size: int | str = "auto", *, shared_noise: bool = False,
                 extent_margin: int = 4, channels_last: bool | str = "auto", max_batch_size: int = 64,
                 baseline_metrics: bool = False, backend: str = "pytorch") -> None:
        if not isinstance(bundle, Bundle):
            raise TypeError(f"VolumeTranslator needs a loaded Bundle (bundle.load_bundle or app.load_model), "
                            f"got {type(bundle).__name__}")
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                     or batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got {batch_size!r}")
        if isinstance(extent_margin, bool) or not isinstance(extent_margin, int) or extent_margin < 0:
            raise ValueError(f"extent_margin must be an integer >= 0, got {extent_margin!r}")
        self.bundle = bundle
        meta = bundle.meta
        self.spec = meta.slice
        self.axis = int(self.spec.axis)
        self.size = int(self.spec.size)
        try:
            self.source_preset = side_preset(meta, "source")
            self.target_preset = side_preset(meta, "target")
        except BundleError as exc:
            raise BundleError(f"{bundle.path}: {exc}") from None
        self.roi_names = meta_rois(meta)
        self.method = bundle.method.eval().to(self.device)
        self.capabilities = self.method.capabilities
        if self.method.in_channels != 1:
            raise BundleError(f"{bundle.path}: the model takes {self.method.in_channels} source channels; "
                              f"the engine feeds single-channel slices")
        self.batch_size = batch_size
        self.max_batch_size = int(max_batch_size)
        self.shared_noise = bool(shared_noise)
        self.extent_margin = extent_margin
        # channels-last: measured 1.2-1.5x faster for the pix2pix U-Net on CPU as well as on GPU
        self.channels_last = True if channels_last == "auto" else bool(channels_last)
        self._channels_last_auto = channels_last == "auto"
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.baseline_metrics = bool(baseline_metrics)
        if backend not in ("auto", "pytorch"):
            raise ValueError(f"backend must be 'auto' or 'pytorch', got {backend!r}")
        self.backend = "pytorch"  # what runs the networks, decided on the first batch
        self._backend_pending = backend == "auto"

    # -- public -----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    @property
    def model_name(self) -> str:
        """The bundle's folder name (without ``.zip``)."""
        name = self.bundle.path.name
        return name[:-4] if name.lower().endswith(".zip") else name

    def translate(self, volume: mio.Volume, *, masks: Mapping[str, Any] | None = None,
                  reference: mio.Volume | None = None, steps: int | None = None, num_samples: int = 1,
                  seed: int | None = None, slice_range: tuple[int, int] | str | None = None,
                  progress: ProgressFn | None = None, cancel: Any = None,
                  outputs: Collection[str] | None = None, select: str = "per_slice") -> Result:
        """Translate ``volume`` (see the module docstring).

        masks: name (the bundle's ROI names, e.g. "liver", "tumor"; "body") -> ``Volume`` (resampled nearest-neighbour onto
            the source grid when its geometry differs) or a (z, y, x) array; > 0.5 = inside.
        reference: the real target, for metrics and ``reference_difference`` (resampled
            linearly onto the source grid when its geometry differs).
        steps / num_samples: passed to the method (sampling steps, samples per slice).
        seed: random seed (None: a fresh one, recorded in ``info["seed"]``).
        slice_range: (first, last) slices along the bundle's axis, or the name of a mask in
            ``masks``: its extent +- ``roi_margin``. None: every slice.
        progress: ``progress(done_slices, total_slices, eta_seconds or None)``, at the start and
            after every batch. cancel: a callable returning True, or an object with ``is_set()``
            (threading.Event); checked before every batch; raises ``TranslationCancelled``.
        outputs: which of ``OPTIONAL_OUTPUTS`` to compute (None: all); the synthetic volume, the
            confidence and, with a reference, the metrics are always there.
        select: "per_slice" (what the method returns for each slice) or "per_volume" (one sample
            index for the whole volume, for methods that score every sample; see the module
            docstring; ``info["selected_sample"]`` says which).
        """
        t_start = time.perf_counter()
        want = OPTIONAL_OUTPUTS if outputs is None else frozenset(outputs)
        if not want <= OPTIONAL_OUTPUTS:
            raise ValueError(f"unknown outputs {sorted(want - OPTIONAL_OUTPUTS)}; choose from {sorted(OPTIONAL_OUTPUTS)}")
        vol = self._check_volume(volume)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        if select not in SELECT_MODES:
            raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
        if select == "per_volume" and not self.capabilities.sample_confidence:
            raise ValueError(f"select='per_volume' needs a method that scores its samples; the {self.method.name} "
                             f"model gives no confidence per sample")
        mask_arrays = self._prepare_masks(masks, vol)
        ref = self._prepare_reference(reference, vol)

        src_preset = self.source_preset.fit(vol.array)
        tgt_preset = self._target_preset(src_preset, vol)
        body = mask_arrays.get(BODY)
        if body is None:
            # holes never change the crop box: fill them only when the body is a region or a mask
            whole_body = ref is not None or "consistency" in want or self.capabilities.uses_masks
            body = body_mask(vol, src_preset, fill_holes=whole_body)
        axis = self.axis
        rows_ax, cols_ax = _IN_PLANE[axis]
        spacing_zyx = vol.spacing[::-1]
        geometry = SliceGeometry.from_mask(body.any(axis=axis), self.size, margin=self.spec.margin,
                                           spacing=(spacing_zyx[rows_ax], spacing_zyx[cols_ax]))
        n = vol.shape[axis]
        first, last = self._resolve_range(slice_range, mask_arrays, n)

        # streamed: each batch goes through the source preset, the network and the target preset's
        # inverse on its own; no whole-volume intermediate (issue 14: 4-5 full passes, 14x RSS)
        src_slices = np.moveaxis(vol.array, axis, 0)  # (n, R, C) view, physical units
        presets = (src_preset, tgt_preset)
        mask_slices = {}
        if self.capabilities.uses_masks:  # the model's own ROIs: evaluation regions stay out
            with_body = {**{k: m for k, m in mask_arrays.items() if k in self.roi_names}, BODY: body}
            mask_slices = {k: np.moveaxis(m, axis, 0) for k, m in with_body.items()}
        # outside the translated slices: the target window's lowest value (the preset's -1)
        synthetic = np.full(vol.shape, _inverse_of_minus_one(tgt_preset), dtype=np.float32)
        out = np.moveaxis(synthetic, axis, 0)  # (n, R, C) view
        keep_unc = "uncertainty" in want
        unc: np.ndarray | None = None
        conf: np.ndarray | None = None

        total = last - first
        batch = self._initial_batch_size(geometry, presets, src_slices, mask_slices, first, total, steps,
                                         num_samples, seed)
        done, retries = 0, 0
        kept: list[tuple[np.ndarray, torch.Tensor, np.ndarray]] | None = [] if select == "per_volume" else None
        if progress is not None:
            progress(0, total, None)
        t_loop = time.perf_counter()
        while done < total:
            if _is_cancelled(cancel):
                raise TranslationCancelled("translation cancelled")
            idx = np.arange(first + done, first + min(done + batch, total))
            try:
                image, u, c = self._run_batch(geometry, presets, src_slices, mask_slices, idx, steps, num_samples,
                                              seed, samples_out=kept)
            except torch.OutOfMemoryError:
                self._free_memory()
                if batch == 1:
                    raise RuntimeError(f"out of memory on {self.device} even with one slice per batch; "
                                       f"try --device cpu or a smaller model") from None
                batch = max(1, batch // 2)
                retries += 1
                continue
            except RuntimeError as exc:
                if not (self.channels_last and self._channels_last_auto and done == 0):
                    raise
                # a method that needs contiguous tensors (e.g. .view): drop channels-last for good
                warnings.warn(f"{self.method.name}: channels-last input failed ({first_line(exc)}); "
                              f"using contiguous tensors", stacklevel=2)
                self.channels_last = False
                self.method.to(memory_format=torch.contiguous_format)
                continue
            out[idx] = image
            if u is not None and keep_unc:
                if unc is None:
                    unc = np.zeros(src_slices.shape, dtype=np.float32)
                unc[idx] = u
            if c is not None:
                if conf is None:
                    conf = np.full(n, np.nan, dtype=np.float32)
                conf[idx] = c
            done += len(idx)
            if progress is not None:
                elapsed = time.perf_counter() - t_loop
                progress(done, total, elapsed / done * (total - done))
        loop_seconds = time.perf_counter() - t_loop
        selected = None
        if kept is not None:
            selected, conf = self._select_per_volume(kept, geometry, tgt_preset, out, n)

        result = self._assemble(vol, ref, mask_arrays, body, src_preset, tgt_preset, synthetic, unc, conf,
                                first, last, want)
        result.info = {
            "device": str(self.device), "precision": self.precision, "backend": self.backend,
            "batch_size": int(batch),
            "oom_retries": retries, "seed": int(seed), "shared_noise": self.shared_noise,
            "steps": steps, "num_samples": num_samples, "slices": int(total),
            "box": list(geometry.box), "size": self.size, "axis": axis,
            "seconds": time.perf_counter() - t_start, "loop_seconds": loop_seconds,
            "slices_per_second": (total / loop_seconds) if loop_seconds > 0 else float("nan"),
            "source_preset": src_preset.to_config(), "target_preset": tgt_preset.to_config(),
        }
        if kept is not None:
            result.info.update(select=select, selected_sample=selected)
        return result

    # -- inputs -----------------------------------------------------------------------------
    @staticmethod
    def _check_volume(volume: Any) -> mio.Volume:
        if not isinstance(volume, mio.Volume):
            raise ValueError(f"expected a Volume (io.read_volume), got {type(volume).__name__}")
        return volume

    @staticmethod
    def _prepare_masks(masks: Mapping[str, Any] | None, vol: mio.Volume) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, mask in (masks or {}).items():
            if mask is None:
                continue
            if isinstance(mask, mio.Volume):
                if not mask.same_geometry(vol, atol=1e-4):
                    mask = mio.resample_mask_like(mask, vol)
                arr = mask.array
            else:
                arr = np.asarray(mask)
                if arr.shape != vol.shape:
                    raise ValueError(f"mask {name!r}: shape {arr.shape} does not match the source {vol.shape} "
                                     f"(give a Volume to resample it)")
            out[str(name)] = arr > 0.5
        return out

    @staticmethod
    def _prepare_reference(reference: mio.Volume | None, vol: mio.Volume) -> mio.Volume | None:
        if reference is None:
            return None
        if not isinstance(reference, mio.Volume):
            raise ValueError(f"reference must be a Volume, got {type(reference).__name__}")
        if reference.same_geometry(vol, atol=1e-4):
            return reference
        return mio.resample_like(reference, vol, interpolation="linear", default=float(reference.array.min()))

    def _target_preset(self, src_preset: IntensityPreset, vol: mio.Volume) -> IntensityPreset:
        """The target preset, fitted: its own statistics from the bundle when it has them, the
        source's when both sides use the same data-dependent kind (e.g. MR -> MR)."""
        tgt = dataclasses.replace(self.target_preset)
        if tgt.fitted:
            return tgt
        if tgt.kind == src_preset.kind:
            stats = {f: getattr(src_preset, f) for f in tgt.STAT_FIELDS}
            return dataclasses.replace(tgt, **stats)
        raise BundleError(f"{self.bundle.path}: target preset {tgt.kind!r} has no intensity statistics "
                          f"({', '.join(tgt.STAT_FIELDS)}) to map the output back to physical units; "
                          f"add them to target.preset in medtranslate.yaml")

    def _resolve_range(self, slice_range: Any, masks: dict[str, np.ndarray], n: int) -> tuple[int, int]:
        if slice_range is None:
            return 0, n
        if isinstance(slice_range, str):
            if slice_range not in masks:
                raise ValueError(f"slice_range {slice_range!r} names no given mask (masks: "
                                 f"{', '.join(masks) or 'none'})")
            rng = mask_slice_range(masks[slice_range], self.axis, self.extent_margin)
            if rng is None:
                raise ValueError(f"mask {slice_range!r} is empty: no slices to translate")
            return rng
        try:
            first, last = (int(v) for v in slice_range)
        except (TypeError, ValueError):
            raise ValueError(f"slice_range must be (first, last) or a mask name, got {slice_range!r}") from None
        if not 0 <= first < last <= n:
            raise ValueError(f"slice_range {first}:{last} is outside the volume's {n} slices "
                             f"along axis {self.axis} (need 0 <= first < last <= {n})")
        return first, last

    # -- running ----------------------------------------------------------------------------
    def _generators(self, seed: int, idx: np.ndarray) -> list[torch.Generator]:
        """One generator per slice of ``idx``, seeded from (seed, slice index); with shared noise
        from the seed alone (see the module docstring)."""
        gens = []
        for i in idx:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed if self.shared_noise else _slice_seed(seed, int(i)))
            gens.append(g)
        return gens

    def _run_batch(self, geometry: SliceGeometry, presets: tuple[IntensityPreset, IntensityPreset],
                   src_slices: np.ndarray, mask_slices: dict[str, np.ndarray], idx: np.ndarray,
                   steps: int | None, num_samples: int, seed: int, samples_out: list | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Translate slices ``idx`` (physical units) with the (source, target) ``presets``: (B, R, C)
        image in the target's physical units, uncertainty (B, R, C) in normalised units or None,
        confidence (B,) or None. ``samples_out``: a list that gets ``(idx, samples (N, B, S, S) on
        the CPU in [-1, 1], sample confidence (N, B))`` appended (``select="per_volume"``)."""
        dev = self.device
        src_preset, tgt_preset = presets
        x = src_preset.forward(np.ascontiguousarray(src_slices[idx], dtype=np.float32))
        x = torch.from_numpy(x).to(dev, non_blocking=True)
        x = geometry.apply(x, fill=-1.0).unsqueeze(1)  # (B, 1, S, S)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        masks = None
        if mask_slices:
            masks = {}
            for name, m in mask_slices.items():
                mt = torch.from_numpy(np.ascontiguousarray(m[idx], dtype=np.float32)).to(dev, non_blocking=True)
                masks[name] = geometry.apply(mt, mode="nearest", fill=0.0).unsqueeze(1)
        extra = {"shared_noise": True} if self.shared_noise and self.capabilities.shared_noise else {}
        if self._backend_pending:  # once, on the first batch: CPU without autocast only
            self._backend_pending = False
            if self.autocast_dtype is None:
                self.backend = onnx_backend.maybe_accelerate(self.method, x, dev, bundle=self.bundle, masks=masks,
                                                             steps=steps)
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=self.autocast_dtype or torch.float32,
                                                    enabled=self.autocast_dtype is not None):
            tr = self.method.translate(x, masks=masks, steps=steps, num_samples=num_samples,
                                       generator=self._generators(seed, idx), **extra)
        b, s = len(idx), self.size
        if tuple(tr.image.shape) != (b, 1, s, s):
            raise RuntimeError(f"{self.method.name}: translate returned shape {tuple(tr.image.shape)}, "
                               f"expected {(b, 1, s, s)}")
        image = tgt_preset.inverse(geometry.invert(tr.image.float()[:, 0], fill=-1.0).cpu().numpy())
        unc = None
        if tr.uncertainty is not None:
            unc = geometry.invert(tr.uncertainty.float()[:, 0], fill=0.0).cpu().numpy()
        conf = None if tr.confidence is None else tr.confidence.float().reshape(b).cpu().numpy()
        if samples_out is not None:
            samples_out.append(self._batch_samples(tr, idx))
        return image, unc, conf

    def _batch_samples(self, tr: Any, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """(idx, samples (N, B, S, S) float32 on the CPU, sample confidence (N, B)) of one batch."""
        if tr.sample_confidence is None:
            raise RuntimeError(f"{self.method.name}: select='per_volume' needs Translation.sample_confidence "
                               f"(a score for every sample); the method gave none")
        samples = tr.image.unsqueeze(0) if tr.samples is None else tr.samples
        scores = tr.sample_confidence.float().cpu().numpy()
        n, b, s = samples.shape[0], len(idx), self.size
        if tuple(samples.shape) != (n, b, 1, s, s) or scores.shape != (n, b):
            raise RuntimeError(f"{self.method.name}: samples {tuple(samples.shape)} and sample confidence "
                               f"{scores.shape} do not match {n} sample(s) of {b} slice(s) of {s}x{s}")
        return idx, samples.float()[:, :, 0].cpu(), scores

    def _select_per_volume(self, kept: list[tuple[np.ndarray, torch.Tensor, np.ndarray]], geometry: SliceGeometry,
                           tgt_preset: IntensityPreset, out: np.ndarray, n: int) -> tuple[int, np.ndarray]:
        """One sample index k* for the volume: the highest confidence averaged over the kept slices
        (``np.argmax``: the lowest index on ties). Writes sample k* of every kept slice into ``out``
        (n, R, C) as ``_run_batch`` writes images; returns (k*, its per-slice confidence (n,), NaN
        where not translated)."""
        scores = np.concatenate([sc for _, _, sc in kept], axis=1)  # (N, translated slices)
        best = int(np.argmax(scores.astype(np.float64).mean(axis=1)))
        conf = np.full(n, np.nan, dtype=np.float32)
        for idx, samples, sc in kept:
            image = geometry.invert(samples[best].to(self.device), fill=-1.0).cpu().numpy()
            out[idx] = tgt_preset.inverse(image)
            conf[idx] = sc[best]
        return best, conf

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _initial_batch_size(self, geometry: SliceGeometry, presets: tuple[IntensityPreset, IntensityPreset],
                            src_slices: np.ndarray, mask_slices: dict[str, np.ndarray], first: int, total: int,
                            steps: int | None, num_samples: int, seed: int) -> int:
        """The fixed batch size, or "auto": ``CPU_BATCH_SIZE`` on CPU; on CUDA free memory divided
        by the peak memory per slice of a 2-slice probe batch (capped at ``max_batch_size``)."""
        if self.batch_size != "auto":
            return max(1, min(int(self.batch_size), total))
        if self.device.type != "cuda":
            return max(1, min(CPU_BATCH_SIZE, total))
        k = min(2, total)
        idx = np.arange(first, first + k)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self._run_batch(geometry, presets, src_slices, mask_slices, idx, steps, num_samples, seed)
        except torch.OutOfMemoryError:
            self._free_memory()
            return 1
        torch.cuda.synchronize(self.device)
        per_slice = max((torch.cuda.max_memory_allocated(self.device) - base) / k, 1.0)
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        fits = int(0.8 * (free + cached) / per_slice)
        return max(1, min(fits, self.max_batch_size, total))

    # -- results ----------------------------------------------------------------------------
    def _assemble(self, vol: mio.Volume, ref: mio.Volume | None, masks: dict[str, np.ndarray], body: np.ndarray,
                  src_preset: IntensityPreset, tgt_preset: IntensityPreset, synthetic: np.ndarray,
                  unc: np.ndarray | None, conf: np.ndarray | None, first: int, last: int,
                  want: frozenset[str] = OPTIONAL_OUTPUTS) -> Result:
        axis = self.axis
        n = vol.shape[axis]
        in_range = np.zeros(n, dtype=bool)
        in_range[first:last] = True
        shape = [1, 1, 1]
        shape[axis] = n
        slab = np.broadcast_to(in_range.reshape(shape), vol.shape)

        def volume(arr: np.ndarray, suffix: str) -> mio.Volume:
            return mio.Volume(arr, vol.spacing, vol.origin, vol.direction, source=f"{vol.source} ({suffix})")

        result = Result(synthetic=volume(synthetic, "synthetic"), slice_range=(first, last), axis=axis,
                        confidence=conf)
        baseline = None
        if "difference" in want or (ref is not None and self.baseline_metrics):
            baseline = identity_baseline(vol.array, src_preset, tgt_preset)
        if "difference" in want:
            result.difference = volume(np.where(slab, difference_map(synthetic, baseline), 0.0).astype(np.float32),
                                       "difference")
        if unc is not None and "uncertainty" in want:
            lo, hi = tgt_preset.physical_range
            kind = self.capabilities.uncertainty
            result.uncertainty = volume(uncertainty_to_physical(np.moveaxis(unc, 0, axis), (hi - lo) / 2.0, kind),
                                        "uncertainty")
            result.uncertainty_kind = kind
        ref_array = None if ref is None else ref.array
        if "consistency" in want:
            result.consistency = consistency_report(synthetic, ref_array, axis=axis, mask=body,
                                                    slice_range=(first, last))
        if ref is not None:
            if "reference_difference" in want:
                result.reference_difference = volume(
                    np.where(slab, difference_map(synthetic, ref_array), 0.0).astype(np.float32),
                    "reference difference")
            value_range = SYNTHRAD_CT_RANGE if tgt_preset.HOUNSFIELD else None
            regions: dict[str, Any] = {WHOLE: None if (first, last) == (0, n) else slab, BODY: body & slab}
            for name in ordered_regions([m for m in masks if m != BODY], self.roi_names):
                regions[name] = masks[name] & slab
            images = {"synthetic": synthetic, **({"baseline": baseline} if self.baseline_metrics else {})}
            rows = _safe_metrics(ref_array, images, regions, value_range)
            result.metrics = rows["synthetic"]
            result.baseline_metrics = rows.get("baseline")
        return result


def _inverse_of_minus_one(preset: IntensityPreset) -> np.float32:
    """The value ``preset.inverse`` gives -1 (the window's lowest value), computed as a batch is."""
    return preset.inverse(np.full(1, -1.0, dtype=np.float32))[0]


def identity_baseline(source: np.ndarray, src_preset: IntensityPreset, tgt_preset: IntensityPreset,
                      normalised: np.ndarray | None = None) -> np.ndarray:
    """The source "translated" by doing nothing, in the target's units (z, y, x float32).

    Same physical units on both sides (CT -> CT, HU and HU): the source itself, unclipped, so
    the baseline is the same for every model of that source and target whatever its windows.
    Other pairs (MR -> CT, MR -> MR, ...) have no common unit: the source through its preset to
    [-1, 1], then through the target preset's inverse (``normalised``: ``src_preset.forward(source)``
    when already computed)."""
    if src_preset.same_units(tgt_preset):
        return np.asarray(source, dtype=np.float32)
    norm = src_preset.forward(source) if normalised is None else normalised
    return np.asarray(tgt_preset.inverse(norm), dtype=np.float32)


def _safe_metrics(reference: np.ndarray, images: dict[str, np.ndarray], regions: dict[str, Any],
                  value_range: tuple[float, float] | None) -> dict[str, dict[str, dict[str, float]]]:
    """``metrics.roi_metrics_many`` (image name -> region -> metrics); a volume too small for SSIM
    (< ``SSIM_WINDOW`` voxels on an axis) gets MAE/RMSE only with PSNR/SSIM as NaN rather than no
    metrics at all."""
    if min(reference.shape) >= SSIM_WINDOW:
        return roi_metrics_many(reference, images, regions, value_range=value_range)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, image in images.items():
        rows = out[key] = {}
        for name, region in regions.items():
            m = np.ones(reference.shape, bool) if region is None else np.asarray(region, bool)
            if not m.any():
                continue
            d = image[m].astype(np.float64) - reference[m].astype(np.float64)
            rows[name] = {"mae": float(np.abs(d).mean()), "psnr": math.nan, "ssim": math.nan,
                          "rmse": float(np.sqrt((d * d).mean()))}
    return out
