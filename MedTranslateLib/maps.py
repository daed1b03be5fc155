"""Difference and uncertainty maps, inter-slice consistency, and the comparison figure.

A leaf module (numpy only; matplotlib is imported inside ``comparison_figure``) used by the
engine, the command line and the training scripts. Volumes are (z, y, x) arrays; anything with
an ``.array`` attribute (``io.Volume``) is accepted in place of an array.

- ``difference_map(synthetic, baseline)``: signed ``synthetic - baseline`` in physical units.
- ``uncertainty_to_physical(u, scale, kind)``: a method's uncertainty in normalised target units
  ([-1, 1]) -> physical units, given the preset's half-width ``scale`` = (hi - lo) / 2.
- ``inter_slice_consistency(volume, axis, mask, slice_range)``: mean absolute difference between
  neighbouring slices; ``consistency_report`` puts the synthetic's next to the reference's.
- ``comparison_figure(...)``: one PNG, one row per view: source | synthetic | reference |
  difference heatmaps (diverging, centred at 0, colour bar in physical units) | uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "difference_map",
    "uncertainty_to_physical",
    "inter_slice_consistency",
    "consistency_report",
    "symmetric_limit",
    "comparison_figure",
    "orthogonal_views",
    "focus_index",
]


#: Figure columns, in order, with their titles.
_COLUMNS = {"source": "source", "synthetic": "synthetic", "reference": "reference",
            "difference": "synthetic \u2212 source", "reference_difference": "synthetic \u2212 reference",
            "uncertainty": "uncertainty"}


def _array(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(getattr(value, "array", value))
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def difference_map(synthetic: Any, baseline: Any) -> np.ndarray:
    """``synthetic - baseline`` (float32, same shape), e.g. synthetic CTA minus the source CT
    mapped into the target's units, or synthetic minus the reference."""
    a, b = _array(synthetic, "synthetic"), _array(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"difference_map: shapes differ: {a.shape} vs {b.shape}")
    return (a.astype(np.float32) - b.astype(np.float32)).astype(np.float32)


def uncertainty_to_physical(uncertainty: Any, scale: float, kind: str | None) -> np.ndarray:
    """Uncertainty in normalised target units -> physical units.

    ``scale``: physical units per normalised unit ((hi - lo) / 2 of the target preset).
    ``kind``: "std" (scaled by ``scale``) or "variance" (by ``scale**2``; returned as a
    variance). Anything else is treated as a standard deviation."""
    u = _array(uncertainty, "uncertainty").astype(np.float32)
    s = float(scale)
    return u * np.float32(s * s if kind == "variance" else s)


def _slab(arr: np.ndarray, axis: int, slice_range: tuple[int, int] | None) -> np.ndarray:
    if slice_range is None:
        return arr
    a, b = slice_range
    return np.take(arr, np.arange(a, b), axis=axis)


def inter_slice_consistency(volume: Any, *, axis: int = 0, mask: Any = None,
                            slice_range: tuple[int, int] | None = None) -> float:
    """Mean |v[k+1] - v[k]| over neighbouring slices along ``axis`` (physical units).

    ``mask`` (same shape, > 0 = measured): a voxel pair counts when both voxels are in the mask.
    ``slice_range``: [first, last) slices to look at. NaN when fewer than 2 slices (or no pair
    in the mask)."""
    arr = _array(volume, "volume").astype(np.float64)
    if arr.ndim != 3:
        raise ValueError(f"inter_slice_consistency: expected a (z, y, x) volume, got shape {arr.shape}")
    arr = _slab(arr, axis, slice_range)
    if arr.shape[axis] < 2:
        return float("nan")
    diff = np.abs(np.diff(arr, axis=axis))
    if mask is None:
        return float(diff.mean())
    m = _slab(_array(mask, "mask") > 0, axis, slice_range)
    if m.shape != arr.shape:
        raise ValueError(f"inter_slice_consistency: mask shape {m.shape} does not match {arr.shape}")
    both = np.logical_and(np.take(m, np.arange(1, m.shape[axis]), axis=axis),
                          np.take(m, np.arange(0, m.shape[axis] - 1), axis=axis))
    if not both.any():
        return float("nan")
    return float(diff[both].mean())


def consistency_report(synthetic: Any, reference: Any | None = None, *, axis: int = 0, mask: Any = None,
                       slice_range: tuple[int, int] | None = None) -> dict[str, float]:
    """Inter-slice consistency of ``synthetic`` and, when given, of ``reference`` on the same
    voxels, with their ratio (1 = as smooth across slices as the real image; > 1 = flicker)."""
    out = {"synthetic": inter_slice_consistency(synthetic, axis=axis, mask=mask, slice_range=slice_range)}
    if reference is not None:
        ref = inter_slice_consistency(reference, axis=axis, mask=mask, slice_range=slice_range)
        out["reference"] = ref
        out["ratio"] = out["synthetic"] / ref if ref > 0 and math.isfinite(ref) else float("nan")
    return out


def symmetric_limit(values: np.ndarray, percentile: float = 99.0, floor: float = 1e-6) -> float:
    """Colour limit for a diverging map: the ``percentile`` of |values| (at least ``floor``)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 1.0
    return max(float(np.percentile(v, percentile)), floor)


def comparison_figure(path: str | Path, rows: Sequence[dict[str, Any]], *, title: str = "",
                      window: tuple[float, float] | None = None, units: str = "HU",
                      source_window: tuple[float, float] | None = None,
                      uncertainty_label: str | None = None, dpi: int = 100) -> Path:
    """Write a PNG with one row per view.

    Each row is a dict of 2-D (H, W) arrays, any of: ``source``, ``synthetic``, ``reference``,
    ``difference`` (synthetic - source, physical units), ``reference_difference`` (synthetic -
    reference), ``uncertainty``; a column is drawn when some row has it. Optional ``label`` (row
    title) and ``aspect`` (pixel height / width, for anisotropic spacing). Images share the grey
    ``window`` (lo, hi) (default: the synthetic's 1-99 percentiles); difference heatmaps use a
    diverging colour map centred at 0 with a colour bar in ``units``. ``source_window``: the
    source's own grey window (another modality); ``uncertainty_label``: its colour bar's label. NaN pixels are left blank
    (e.g. heatmaps masked to the body). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("comparison_figure: no rows")
    columns = [c for c in _COLUMNS if any(r.get(c) is not None for r in rows)]
    if window is None:
        lo, hi = np.percentile(np.concatenate([np.ravel(r["synthetic"]) for r in rows]), [1, 99])
        window = (float(lo), float(max(hi, lo + 1e-6)))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.1 * len(columns), 3.0 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        aspect = float(row.get("aspect", 1.0))
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_COLUMNS[col], fontsize=10)
            if j == 0 and row.get("label"):
                ax.set_ylabel(str(row["label"]), fontsize=9)
            image = row.get(col)
            if image is None:
                ax.set_axis_off()
                continue
            image = np.asarray(image, dtype=np.float32)
            if col in ("difference", "reference_difference"):
                lim = symmetric_limit(image)
                im = ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect=aspect,
                               interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(units, fontsize=8)
            elif col == "uncertainty":
                finite = image[np.isfinite(image)]
                vmax = max(float(np.percentile(finite, 99.5)) if finite.size else 1.0, 1e-6)
                im = ax.imshow(image, cmap="magma", vmin=0.0, vmax=vmax, aspect=aspect, interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(uncertainty_label or units,
                                                                              fontsize=8)
            else:
                lo, hi = source_window if (col == "source" and source_window) else window
                ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def orthogonal_views(array: Any, centre_zyx: Sequence[int], spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)
                     ) -> list[tuple[str, np.ndarray, float]]:
    """Axial, coronal and sagittal slices of a (z, y, x) volume through ``centre_zyx``:
    ``[(name, (H, W) image, aspect)]`` with superior up in the coronal and sagittal views and
    ``aspect`` = pixel height / width in mm (for ``comparison_figure``)."""
    arr = _array(array, "array")
    if arr.ndim != 3:
        raise ValueError(f"orthogonal_views: expected a (z, y, x) volume, got shape {arr.shape}")
    z, y, x = (int(np.clip(c, 0, n - 1)) for c, n in zip(centre_zyx, arr.shape, strict=True))
    sx, sy, sz = (float(s) for s in spacing_xyz)
    return [("axial", arr[z], sy / sx),
            ("coronal", arr[::-1, y, :], sz / sx),
            ("sagittal", arr[::-1, :, x], sz / sy)]


def focus_index(*masks: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    """(z, y, x) through the largest cross-sections of the first non-empty mask (e.g. tumour,
    then liver); the volume centre when all are empty or None."""
    for mask in masks:
        if mask is None:
            continue
        m = _array(mask, "mask") > 0
        if m.any():
            return tuple(int(np.argmax(m.sum(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3))
    return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]
