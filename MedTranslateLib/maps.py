"""Difference and uncertainty maps, inter-slice consistency, and the comparison figure.

A leaf module (numpy only; matplotlib is imported inside ``comparison_figure``) used by the
engine, the command line and the training scripts. Volumes are (z, y, x) arrays; anything with
an ``.array`` attribute (``io.Volume``) is accepted in place of an array.

- ``difference_map(synthetic, baseline)``: signed ``synthetic - baseline`` in physical units.
- ``uncertainty_to_physical(u, scale, kind)``: a method's uncertainty in normalised target units
  ([-1, 1]) -> physical units, given the preset's half-width ``scale`` = (hi - lo) / 2.
- ``inter_slice_consistency(volume, axis, mask, slice_range)``: mean absolute difference between
  neighbouring slices; ``consistency_report`` puts the synthetic's next to the reference's.
- ``confidence_summary(confidence)``: a method's per-slice confidence (NaN where not translated)
  -> mean, min and the lowest-confidence slices; ``confidence_line`` says it in one line. Every
  front end (command line, ``metrics.json``, the Slicer module, the demo figure) shows these.
- ``comparison_figure(...)``: one PNG, one row per view: source | synthetic | reference |
  difference heatmaps (diverging, centred at 0, colour bar in physical units) | uncertainty;
  with ``confidence``, a per-slice confidence plot under them.
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
    "confidence_summary",
    "confidence_line",
    "LOWEST_SLICES",
]

#: How many of the lowest-confidence slices the summaries name.
LOWEST_SLICES = 3


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


def confidence_summary(confidence: Any, lowest: int = LOWEST_SLICES) -> dict[str, Any] | None:
    """Per-slice confidence (n,) (NaN where not translated) -> ``{"slices": translated count,
    "mean", "min", "max", "lowest": [{"slice": index along the axis, "confidence"}, ...]}`` with
    the ``lowest`` least confident slices first (ties: the lower index first); None when no slice
    has a confidence (None given, or all NaN)."""
    if confidence is None:
        return None
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    index = np.flatnonzero(np.isfinite(conf))
    if index.size == 0:
        return None
    values = conf[index]
    order = np.argsort(values, kind="stable")[:max(0, int(lowest))]
    return {"slices": int(index.size), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()),
            "lowest": [{"slice": int(index[k]), "confidence": float(values[k])} for k in order]}


def confidence_line(summary: dict[str, Any] | None) -> str:
    """``confidence_summary`` in one line: ``confidence: mean 0.62, min 0.31 over 30 slices;
    lowest: slice 12 (0.31), 13 (0.35), 40 (0.40)``; "" for None."""
    if not summary:
        return ""
    lowest = ", ".join(f"{row['slice']} ({row['confidence']:.2f})" for row in summary["lowest"])
    return (f"confidence: mean {summary['mean']:.2f}, min {summary['min']:.2f} over {summary['slices']} "
            f"slice{'s' if summary['slices'] != 1 else ''}; lowest: slice {lowest}")


def comparison_figure(path: str | Path, rows: Sequence[dict[str, Any]], *, title: str = "",
                      window: tuple[float, float] | None = None, units: str = "HU",
                      source_window: tuple[float, float] | None = None,
                      uncertainty_label: str | None = None, confidence: Any = None,
                      dpi: int = 100) -> Path:
    """Write a PNG with one row per view.

    Each row is a dict of 2-D (H, W) arrays, any of: ``source``, ``synthetic``, ``reference``,
    ``difference`` (synthetic - source, physical units), ``reference_difference`` (synthetic -
    reference), ``uncertainty``; a column is drawn when some row has it. Optional ``label`` (row
    title) and ``aspect`` (pixel height / width, for anisotropic spacing). Images share the grey
    ``window`` (lo, hi) (default: the synthetic's 1-99 percentiles); difference heatmaps use a
    diverging colour map centred at 0 with a colour bar in ``units``. ``source_window``: the
    source's own grey window (another modality); ``uncertainty_label``: its colour bar's label. NaN pixels are left blank
    (e.g. heatmaps masked to the body). ``confidence``: a method's per-slice confidence (n,) (NaN
    where not translated), drawn as a plot under the views with the lowest slices marked
    (``confidence_summary``). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("comparison_figure: no rows")
    columns = [c for c in _COLUMNS if any(r.get(c) is not None for r in rows)]
    if window is None:
        lo, hi = np.percentile(np.concatenate([np.ravel(r["synthetic"]) for r in rows]), [1, 99])
        window = (float(lo), float(max(hi, lo + 1e-6)))
    summary = confidence_summary(confidence)
    extra = 1 if summary else 0
    fig = plt.figure(figsize=(3.1 * len(columns), 3.0 * len(rows) + 2.0 * extra))
    grid = fig.add_gridspec(len(rows) + extra, len(columns), height_ratios=[3.0] * len(rows) + [2.0] * extra)
    axes = [[fig.add_subplot(grid[i, j]) for j in range(len(columns))] for i in range(len(rows))]
    if summary:
        _confidence_plot(fig.add_subplot(grid[len(rows), :]), np.asarray(confidence, dtype=np.float64), summary)
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


def _confidence_plot(ax: Any, confidence: np.ndarray, summary: dict[str, Any]) -> None:
    """Per-slice confidence (NaN gaps where not translated), its mean, the lowest slices marked."""
    ax.plot(np.arange(confidence.size), confidence, color="tab:blue", lw=1.2, marker=".", ms=3)
    ax.axhline(summary["mean"], color="0.5", lw=0.8, ls="--", label=f"mean {summary['mean']:.2f}")
    low = summary["lowest"]
    ax.scatter([r["slice"] for r in low], [r["confidence"] for r in low], color="tab:red", zorder=3,
               s=18, label="lowest: " + ", ".join(str(r["slice"]) for r in low))
    ax.set_xlim(-0.5, confidence.size - 0.5)
    ax.set_ylim(min(0.0, summary["min"]), max(1.05, 1.05 * summary["max"]))
    ax.set_xlabel("slice", fontsize=8)
    ax.set_ylabel("confidence", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")


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
