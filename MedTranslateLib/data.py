"""Datasets: case folders -> 2-D slice datasets (paired and unpaired), masks carried along.

A *case folder* holds one file per modality and per mask, named by its stem:
``ct.nii.gz``, ``cta_arterial.nrrd``, ``t1.mha``, ``liver.nii.gz``, ``tumor.nii.gz``,
``labels.nii.gz`` (0 = outside the body), ... Any extension ``io.read_volume`` reads works, and
a sub-folder named after the stem is read as a DICOM series.

Slices are taken along ``SliceSpec.axis`` of the (z, y, x) volume (0 = axial), cropped to the
body's in-plane bounding box (the same box for every slice of a volume, made square in
millimetres) and resized to ``SliceSpec.size``. :class:`SliceGeometry` records that mapping and
inverts it, so a model output can be put back into the original slice grid.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import io as mio
from .cases import BODY_LABELS, find_cases, find_volume_file, split_cases
from .intensity import IntensityPreset, preset_from_config
from .metrics import bounding_box
from .regions import DEFAULT_ROIS
from .slicing import SliceSpec

__all__ = [
    "BODY_LABELS",
    "find_cases",
    "find_volume_file",
    "split_cases",
    "SliceSpec",
    "SliceGeometry",
    "fit_slice_to_size",
    "body_mask",
    "roi_slice_range",
    "PairedSliceDataset",
    "UnpairedSliceDataset",
]

# ---------------------------------------------------------------------------------------------
# in-plane geometry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceGeometry:
    """Crop/pad box of a slice and its resize to ``size`` x ``size``.

    ``in_shape``: (H, W) of the original slice. ``box``: (r0, r1, c0, c1) pixel bounds of the
    region that is resized (may extend past the slice: that part is padded with ``fill``).
    """

    in_shape: tuple[int, int]
    box: tuple[int, int, int, int]
    size: int

    @classmethod
    def from_mask(cls, mask, size: int, *, spacing: Sequence[float] = (1.0, 1.0),
                  margin: float = 0.05) -> SliceGeometry:
        """Box around ``mask`` > 0 (the whole slice when empty) grown by ``margin`` of its
        size on each side, then made square in millimetres (``spacing`` = (row, col) mm)."""
        m = np.asarray(mask) > 0
        if m.ndim != 2:
            raise ValueError(f"SliceGeometry.from_mask: mask must be 2-D, got shape {m.shape}")
        h, w = m.shape
        if m.any():
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        else:
            r0, r1, c0, c1 = 0, h, 0, w
        sr, sc = (float(s) for s in spacing)
        if sr <= 0 or sc <= 0:
            raise ValueError(f"SliceGeometry.from_mask: spacing must be positive, got {spacing}")
        height_mm = (r1 - r0) * sr * (1 + 2 * margin)
        width_mm = (c1 - c0) * sc * (1 + 2 * margin)
        side_mm = max(height_mm, width_mm)
        nr = max(1, int(math.ceil(side_mm / sr - 1e-6)))
        nc = max(1, int(math.ceil(side_mm / sc - 1e-6)))
        rc, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
        br0 = int(math.floor(rc - nr / 2.0 + 0.5))
        bc0 = int(math.floor(cc - nc / 2.0 + 0.5))
        return cls((int(h), int(w)), (br0, br0 + nr, bc0, bc0 + nc), int(size))

    @classmethod
    def full(cls, in_shape: Sequence[int], size: int) -> SliceGeometry:
        """The whole slice padded to a square (pixel units), resized to ``size``."""
        return cls.from_mask(np.ones(tuple(in_shape), bool), size, margin=0.0)

    @property
    def box_shape(self) -> tuple[int, int]:
        r0, r1, c0, c1 = self.box
        return r1 - r0, c1 - c0

    def apply(self, image, *, mode: str = "bilinear", fill: float = 0.0):
        """(..., H, W) slice(s) -> (..., size, size). numpy in -> numpy out, torch -> torch.
        ``mode``: "bilinear" (images) or "nearest" (masks)."""
        x, was_numpy = _to_tensor(image)
        if tuple(x.shape[-2:]) != self.in_shape:
            raise ValueError(f"SliceGeometry.apply: expected (..., {self.in_shape[0]}, "
                             f"{self.in_shape[1]}), got {tuple(x.shape)}")
        h, w = self.in_shape
        r0, r1, c0, c1 = self.box
        crop = x.new_full((*x.shape[:-2], r1 - r0, c1 - c0), float(fill))
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if sr1 > sr0 and sc1 > sc0:
            crop[..., sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = x[..., sr0:sr1, sc0:sc1]
        out = _resize(crop, (self.size, self.size), mode)
        return out.numpy() if was_numpy else out

    def invert(self, image, *, mode: str = "bilinear", fill: float = 0.0):
        """(..., size, size) model output -> (..., H, W) in the original slice grid; pixels
        outside the box get ``fill``."""
        x, was_numpy = _to_tensor(image)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"SliceGeometry.invert: expected (..., {self.size}, {self.size}), "
                             f"got {tuple(x.shape)}")
        h, w = self.in_shape
        r0, r1, c0, c1 = self.box
        back = _resize(x, (r1 - r0, c1 - c0), mode)
        out = x.new_full((*x.shape[:-2], h, w), float(fill))
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        if sr1 > sr0 and sc1 > sc0:
            out[..., sr0:sr1, sc0:sc1] = back[..., sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0]
        return out.numpy() if was_numpy else out

    def to_dict(self) -> dict[str, Any]:
        return {"in_shape": list(self.in_shape), "box": list(self.box), "size": self.size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceGeometry:
        return cls(tuple(d["in_shape"]), tuple(d["box"]), int(d["size"]))  # type: ignore[arg-type]


def _to_tensor(image) -> tuple[torch.Tensor, bool]:
    if isinstance(image, torch.Tensor):
        return image, False
    arr = np.asarray(image)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)), True


def _resize(x: torch.Tensor, out_hw: tuple[int, int], mode: str) -> torch.Tensor:
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"resize mode must be 'bilinear' or 'nearest', got {mode!r}")
    if tuple(x.shape[-2:]) == tuple(out_hw):
        return x.clone()
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    dtype = flat.dtype
    if not flat.is_floating_point():
        flat = flat.float()
    if mode == "nearest":
        out = F.interpolate(flat, size=out_hw, mode="nearest-exact")
    else:
        out = F.interpolate(flat, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return out.to(dtype).reshape(*lead, *out_hw)


def fit_slice_to_size(image, size: int, *, mask=None, spacing: Sequence[float] = (1.0, 1.0),
                      margin: float = 0.05, mode: str = "bilinear", fill: float = -1.0,
                      geometry: SliceGeometry | None = None):
    """Crop ``image`` (..., H, W) to the bounding box of ``mask`` (body), pad it to a square in
    millimetres and resize to ``size`` x ``size``. Returns ``(resized, geometry)``; use
    ``geometry.invert`` to map a (..., size, size) output back. ``geometry`` reuses a box
    (e.g. the image's box for its masks, with ``mode="nearest", fill=0``)."""
    if geometry is None:
        shape = tuple(np.shape(image)[-2:])
        if mask is None:
            mask = np.ones(shape, bool)
        geometry = SliceGeometry.from_mask(mask, size, spacing=spacing, margin=margin)
    return geometry.apply(image, mode=mode, fill=fill), geometry


# ---------------------------------------------------------------------------------------------
# masks and slice selection
# ---------------------------------------------------------------------------------------------
def body_mask(volume: mio.Volume, preset: IntensityPreset | None = None, *, fill_holes: bool = True) -> np.ndarray:
    """Body mask (z, y, x) bool from intensities: > -500 HU for CT presets, else above 5 % of
    the (fitted) preset range; opened with a 3x3 in-plane square (specks removed), its largest
    6-connected component kept (ties: the first in raster order), holes filled per slice
    (``fill_holes``: a hole lies inside its slice's box, so a crop box needs no filling)."""
    arr = volume.array
    if preset is None or preset.kind == "ct_window":
        m = arr > -500.0
    else:
        lo, hi = preset.physical_range
        m = arr > lo + 0.05 * (hi - lo)
    outer = bounding_box(m)
    if outer is None:
        return m
    # binary opening with a 3x3 in-plane square, separable (outside the volume counts as 0, as in
    # ndimage.binary_opening): the same mask, ~10x faster than ndimage's filters on 512x512x300.
    # Inside the thresholded voxels' box: an opening never grows a mask, so nothing is cut off.
    core = _open_3x3(m[outer])
    inner = bounding_box(core)
    if inner is not None:
        largest = _largest_component(core[inner])
        if largest is not None:
            core[...] = False
            core[inner] = largest
    m[outer] = core  # m is False outside its box already
    if fill_holes and inner is not None:
        box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner, strict=True))
        _fill_holes_per_slice(m, box)
    return m


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 6-connected component of a 3-D bool array (ties: the first in raster order),
    or None when the array is one component. ITK's run-length label map (SimpleITK, on torch's
    thread count) counts the components without writing a label image (0.05 s against 0.16 s
    for ``ConnectedComponent`` on the 56M voxels of a 512 x 512 x 300 CT's body box, issue 14);
    only with more than one is it written out, numbered as ``ndimage.label`` numbers them
    (tested), and its sizes counted in chunks (``np.bincount`` of the whole label image makes an
    8-byte copy of it: 0.31 s against 0.15 s)."""
    import SimpleITK as sitk

    mapping = sitk.BinaryImageToLabelMapFilter()
    mapping.SetFullyConnected(False)
    mapping.SetNumberOfThreads(torch.get_num_threads())
    label_map = mapping.Execute(sitk.GetImageFromArray(mask.view(np.uint8)))
    n = mapping.GetNumberOfObjects()
    if n <= 1:
        return None
    to_image = sitk.LabelMapToLabelImageFilter()
    to_image.SetNumberOfThreads(torch.get_num_threads())
    image = to_image.Execute(label_map)
    labels = sitk.GetArrayViewFromImage(image).reshape(-1)  # a view: ``image`` stays alive until it is read
    sizes = np.zeros(n + 1, np.int64)
    for start in range(0, labels.size, _COUNT_CHUNK):
        sizes += np.bincount(labels[start:start + _COUNT_CHUNK], minlength=n + 1)
    return (labels == (int(np.argmax(sizes[1:])) + 1)).reshape(mask.shape)


#: voxels per ``np.bincount`` call when counting component sizes (its intp copy stays in cache)
_COUNT_CHUNK = 1 << 16


#: 4-connected within a slice, never across slices: ``ndimage.binary_fill_holes``'s default in 2-D
_IN_SLICE_CROSS = np.zeros((3, 3, 3), bool)
_IN_SLICE_CROSS[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def _fill_holes_per_slice(m: np.ndarray, box: tuple[slice, ...]) -> None:
    """``m[k] = ndimage.binary_fill_holes(m[k])`` for every slice k, in place, in one labelling:
    a hole is background that is not 4-connected within its slice to the slice's border. ``box``
    holds every True voxel of ``m``, so the background on the box's in-plane edges touches the
    border through the empty frame around it, and a hole lies inside the box."""
    from scipy import ndimage

    labels, n = ndimage.label(~m[box], structure=_IN_SLICE_CROSS)
    outside = np.zeros(n + 1, bool)
    outside[0] = True  # the body itself
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    m[box] |= ~outside[labels]


#: bytes of bool slices opened at a time: small enough for a core's L2 cache (0.10 -> 0.05 s on the
#: 56M-voxel body box of a 512 x 512 x 300 CT, two slices at a time)
_OPEN_BYTES = 1 << 19


def _open_3x3(m: np.ndarray) -> np.ndarray:
    """Binary opening of the bool (z, y, x) array ``m`` with a 3x3 square in every slice (outside
    the array counts as False), a few slices at a time (a new array; ``m`` is kept)."""
    if min(m.shape[1:]) < 3:  # every voxel has an outside neighbour: the erosion leaves nothing
        return np.zeros_like(m)
    step = max(1, _OPEN_BYTES // max(1, m[0].size))
    if step >= len(m):
        return _open_3x3_slab(m)
    out = np.empty_like(m)
    for k in range(0, len(m), step):
        out[k:k + step] = _open_3x3_slab(m[k:k + step])
    return out


def _open_3x3_slab(m: np.ndarray) -> np.ndarray:
    """``_open_3x3`` of a few slices (each at least 3 x 3): 3-voxel erosions along y and x, then
    dilations, each two logical operations on shifted views written into one of two buffers."""
    a, b = m.copy(), np.empty_like(m)
    for erode in (True, False):
        combine = np.logical_and if erode else np.logical_or
        for axis in (1, 2):
            def part(start: int | None, stop: int | None, axis: int = axis) -> tuple[slice, ...]:
                return tuple(slice(start, stop) if k == axis else slice(None) for k in range(m.ndim))

            middle = part(1, -1)
            combine(a[part(None, -2)], a[middle], out=b[middle])
            combine(b[middle], a[part(2, None)], out=b[middle])
            if erode:  # the first and last voxels have an outside (False) neighbour
                b[part(0, 1)] = False
                b[part(-1, None)] = False
            else:
                combine(a[part(0, 1)], a[part(1, 2)], out=b[part(0, 1)])
                combine(a[part(-2, -1)], a[part(-1, None)], out=b[part(-1, None)])
            a, b = b, a
    return a


def roi_slice_range(roi, axis: int, margin: int) -> tuple[int, int] | None:
    """[first, last) slice indices within ``margin`` of the slice with the largest ROI area
    along ``axis``; None when the ROI is empty. Ties go to the lowest index."""
    r = np.asarray(roi) > 0
    areas = r.sum(axis=tuple(a for a in range(3) if a != axis))
    if not areas.any():
        return None
    best = int(np.argmax(areas))
    return max(0, best - margin), min(r.shape[axis], best + margin + 1)


# ---------------------------------------------------------------------------------------------
# per-volume cache
# ---------------------------------------------------------------------------------------------
_IN_PLANE = {0: (1, 2), 1: (0, 2), 2: (0, 1)}  # (row, col) axes of (z, y, x) per slicing axis


@dataclass
class _Side:
    """One modality of one case, normalised and ready for slicing."""

    case: str
    path: Path
    volume: mio.Volume  # geometry (array replaced by the normalised one)
    image: np.ndarray  # (z, y, x) float32 in [-1, 1]
    preset: IntensityPreset  # fitted
    masks: dict[str, np.ndarray]  # name -> (z, y, x) uint8 {0, 1}; always includes "body"
    geometry: SliceGeometry
    slices: list[int]

    def take(self, arr: np.ndarray, axis: int, k: int) -> np.ndarray:
        return np.take(arr, k, axis=axis)


def _load_side(case: Path, modality: str, preset_cfg, spec: SliceSpec, mask_names: Sequence[str],
               like: mio.Volume | None = None) -> _Side:
    path = find_volume_file(case, modality)
    if path is None:
        raise ValueError(f"{case}: no volume for modality {modality!r} "
                         f"(looked for {modality}{{{','.join(mio.FILE_EXTENSIONS)}}})")
    vol = mio.read_volume(path)
    if like is not None and not vol.same_geometry(like, atol=1e-3):
        warnings.warn(f"{path}: geometry differs from {like.source}; resampling it onto that grid "
                      f"(linear) for pairing", stacklevel=3)
        vol = mio.resample_like(vol, like, interpolation="linear", default=float(vol.array.min()))
    preset = preset_from_config(preset_cfg).fit(vol.array)
    image = np.asarray(preset.forward(vol.array), dtype=np.float32)

    masks: dict[str, np.ndarray] = {}
    wanted = list(dict.fromkeys([*mask_names, *([spec.roi] if spec.roi else [])]))
    for name in wanted:
        mpath = find_volume_file(case, name)
        if mpath is None:
            warnings.warn(f"{case}: no {name!r} mask; using an empty one", stacklevel=3)
            masks[name] = np.zeros(vol.shape, np.uint8)
        else:
            masks[name] = (mio.read_mask(mpath, like=vol).array > 0.5).astype(np.uint8)
    lpath = find_volume_file(case, BODY_LABELS)
    if lpath is not None:
        body = mio.read_mask(lpath, like=vol).array > 0.5
    else:
        body = body_mask(vol, preset)
    masks["body"] = body.astype(np.uint8)

    axis = spec.axis
    rows_ax, cols_ax = _IN_PLANE[axis]
    spacing_zyx = vol.spacing[::-1]
    projection = masks["body"].any(axis=axis)
    geometry = SliceGeometry.from_mask(projection, spec.size, margin=spec.margin,
                                       spacing=(spacing_zyx[rows_ax], spacing_zyx[cols_ax]))
    n = vol.shape[axis]
    candidates = range(n)
    if spec.roi:
        rng = roi_slice_range(masks[spec.roi], axis, spec.roi_margin)
        candidates = range(*rng) if rng else range(0)
    if spec.min_foreground > 0:
        frac = masks["body"].mean(axis=_IN_PLANE[axis])
        candidates = [k for k in candidates if frac[k] >= spec.min_foreground]
    return _Side(case.name, path, vol, image, preset, masks, geometry, list(candidates))


def _resolve_cases(cases) -> list[Path]:
    if isinstance(cases, (str, os.PathLike)):
        raise ValueError("cases must be a list of case folders (use find_cases(root) to list them)")
    paths = [Path(c) for c in cases]
    if not paths:
        raise ValueError("no cases given")
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ValueError(f"case folder(s) not found: {', '.join(missing)}")
    return paths


class _SliceDatasetBase(Dataset):
    def __init__(self, cases, source: str, target: str, source_preset, target_preset,
                 spec: SliceSpec | None = None, masks: Sequence[str] = DEFAULT_ROIS) -> None:
        self.spec = spec if spec is not None else SliceSpec()
        if not isinstance(self.spec, SliceSpec):
            raise ValueError(f"spec must be a SliceSpec, got {type(self.spec).__name__}")
        self.source, self.target = source, target
        self.source_preset_config = preset_from_config(source_preset).to_config()
        self.target_preset_config = preset_from_config(target_preset).to_config()
        self.mask_names = tuple(masks)
        if "body" in self.mask_names:
            raise ValueError("'body' is always provided; do not list it in masks")
        self.case_paths = _resolve_cases(cases)

    # item helpers -----------------------------------------------------------------------------
    def _slice(self, side: _Side, k: int) -> dict[str, torch.Tensor]:
        axis = self.spec.axis
        g = side.geometry
        out = {"image": torch.from_numpy(g.apply(side.take(side.image, axis, k)[None], fill=-1.0))}
        for name, m in side.masks.items():
            sl = side.take(m, axis, k)[None].astype(np.float32)
            out[name] = torch.from_numpy(g.apply(sl, mode="nearest", fill=0.0))
        return out


class PairedSliceDataset(_SliceDatasetBase):
    """Paired (registered) source/target slices.

    ``cases``: case folders holding both modalities. ``source``/``target``: modality stems.
    ``source_preset``/``target_preset``: intensity preset names/configs, fitted per volume.
    Item: ``source``, ``target`` (1, size, size) float32 in [-1, 1]; one (1, size, size) {0, 1}
    tensor per mask name plus ``body``; ``case`` (folder name) and ``index`` (slice index).
    The target is resampled onto the source grid when their geometries differ."""

    def __init__(self, cases, source: str, target: str, source_preset, target_preset,
                 spec: SliceSpec | None = None, masks: Sequence[str] = DEFAULT_ROIS) -> None:
        super().__init__(cases, source, target, source_preset, target_preset, spec, masks)
        self._src: list[_Side] = []
        self._tgt: list[_Side] = []
        self.items: list[tuple[int, int]] = []
        skipped = []
        for case in self.case_paths:
            src = _load_side(case, source, self.source_preset_config, self.spec, self.mask_names)
            tgt = _load_side(case, target, self.target_preset_config, self.spec, (), like=src.volume)
            # target shares the source grid: same box, same masks, same slices
            tgt.geometry, tgt.slices = src.geometry, src.slices
            if not src.slices:
                skipped.append(case.name)
            ci = len(self._src)
            self._src.append(src)
            self._tgt.append(tgt)
            self.items.extend((ci, k) for k in src.slices)
        if skipped:
            warnings.warn(f"no usable slices (roi={self.spec.roi!r}, min_foreground="
                          f"{self.spec.min_foreground}) in case(s): {', '.join(skipped)}", stacklevel=2)
        if not self.items:
            raise ValueError(f"no slices selected from {len(self.case_paths)} case(s) with {self.spec}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        ci, k = self.items[index]
        s = self._slice(self._src[ci], k)
        tgt = self._tgt[ci]
        t_image = tgt.geometry.apply(tgt.take(tgt.image, self.spec.axis, k)[None], fill=-1.0)
        item: dict[str, Any] = {"source": s.pop("image"), "target": torch.from_numpy(t_image)}
        item.update(s)
        item["case"] = self._src[ci].case
        item["index"] = k
        return item

    def geometry(self, index: int) -> SliceGeometry:
        """In-plane geometry of item ``index`` (to put a model output back into its slice)."""
        return self._src[self.items[index][0]].geometry

    def presets(self, case: str) -> tuple[IntensityPreset, IntensityPreset]:
        """Fitted (source, target) presets of a case (folder name)."""
        for s, t in zip(self._src, self._tgt, strict=True):
            if s.case == case:
                return s.preset, t.preset
        raise KeyError(case)

    @property
    def cases(self) -> list[str]:
        return [s.case for s in self._src]


class UnpairedSliceDataset(_SliceDatasetBase):
    """Unpaired slices for CycleGAN-type methods.

    Source slices come from every case holding ``source``, target slices from every case holding
    ``target``; item ``i`` pairs source slice ``i`` with a target slice from a *different* case,
    chosen deterministically from ``(seed, i)``. Item: ``source``, ``target`` (1, size, size)
    in [-1, 1]; masks as ``source_<name>`` / ``target_<name>`` (incl. ``body``);
    ``case``/``source_case``, ``target_case``, ``index``, ``target_index``."""

    def __init__(self, cases, source: str, target: str, source_preset, target_preset,
                 spec: SliceSpec | None = None, masks: Sequence[str] = DEFAULT_ROIS,
                 seed: int = 0) -> None:
        super().__init__(cases, source, target, source_preset, target_preset, spec, masks)
        self.seed = int(seed)
        self._src: list[_Side] = []
        self._tgt: list[_Side] = []
        for case in self.case_paths:
            has_s = find_volume_file(case, source) is not None
            has_t = find_volume_file(case, target) is not None
            if not (has_s or has_t):
                raise ValueError(f"{case}: has neither {source!r} nor {target!r}")
            if has_s:
                self._src.append(_load_side(case, source, self.source_preset_config, self.spec,
                                            self.mask_names))
            if has_t:
                self._tgt.append(_load_side(case, target, self.target_preset_config, self.spec,
                                            self.mask_names))
        self.items = [(ci, k) for ci, s in enumerate(self._src) for k in s.slices]
        self.target_items = [(ci, k) for ci, t in enumerate(self._tgt) for k in t.slices]
        if not self.items or not self.target_items:
            raise ValueError(f"no {'source' if not self.items else 'target'} slices selected "
                             f"with {self.spec}")
        # per source case: indices into target_items from other cases
        self._other: dict[str, np.ndarray] = {}
        for s in self._src:
            idx = np.array([j for j, (ci, _) in enumerate(self.target_items)
                            if self._tgt[ci].case != s.case], dtype=np.int64)
            if idx.size == 0:
                raise ValueError(f"case {s.case}: no target slices from another case; unpaired "
                                 f"sampling needs target slices from at least two cases")
            self._other[s.case] = idx

    def __len__(self) -> int:
        return len(self.items)

    def target_for(self, index: int) -> tuple[int, int]:
        """(target case number, slice index) drawn for item ``index``."""
        ci, _ = self.items[index]
        pool = self._other[self._src[ci].case]
        j = pool[int(np.random.default_rng((self.seed, index)).integers(pool.size))]
        return self.target_items[int(j)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index = index % len(self)
        ci, k = self.items[index]
        ti, tk = self.target_for(index)
        s = self._slice(self._src[ci], k)
        t = self._slice(self._tgt[ti], tk)
        item: dict[str, Any] = {"source": s.pop("image"), "target": t.pop("image")}
        item.update({f"source_{n}": v for n, v in s.items()})
        item.update({f"target_{n}": v for n, v in t.items()})
        item.update(case=self._src[ci].case, source_case=self._src[ci].case,
                    target_case=self._tgt[ti].case, index=k, target_index=tk)
        return item

    def geometry(self, index: int) -> SliceGeometry:
        return self._src[self.items[index][0]].geometry

    @property
    def cases(self) -> list[str]:
        return sorted({s.case for s in self._src} | {t.case for t in self._tgt})
