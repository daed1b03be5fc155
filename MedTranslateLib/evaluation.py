"""Evaluate a model bundle on held-out cases: metrics table (CSV + Markdown) and one figure per case.

A front end of the application layer: every case of the chosen split (``cases.model_split``, the
split training made) is read by ``cases.read_case`` and translated by ``app.run_translation`` (the
same volume translation users get: source preset, the training's slice spec, batched slices,
target preset inverse) with its reference. Metrics (``metrics.roi_metrics``: MAE, PSNR, SSIM,
RMSE in physical units; SynthRAD2023 conventions with the -1024..3000 HU range for CT targets)
cover the regions of ``regions.metric_regions`` (whole, body, the model's ROIs), then the case's
label regions (``regions.LABEL_REGIONS``: aorta, kidney -- where a CT -> CTA model has contrast
to add) when its folder has a region table (``cases.read_region_table``; phantom cases do). The *identity*
baseline (``engine.identity_baseline``: the source with no model, in the target's units -- for
CT -> CT the source HU themselves, otherwise the source through both presets) is measured the
same way, so the table shows what the model adds. No Lightning here.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import app
from . import data as mdata
from .cases import SPLITS, Case, case_files, model_split, read_case
from .intensity import preset_from_config
from .regions import BODY, DEFAULT_ROIS, LABEL_REGIONS, metric_regions, ordered_regions

__all__ = ["REGIONS", "METRICS", "EvaluationResult", "load_case", "evaluate_case", "evaluate_bundle",
           "summarise", "write_table", "case_figure", "bundle_split"]

#: Regions of the table for the default ROIs (``regions.metric_regions``) and the label regions
#: (a case without a tumour has no tumour rows; a case without a region table no label region rows).
REGIONS = (*metric_regions(DEFAULT_ROIS), *LABEL_REGIONS)
METRICS = ("mae", "psnr", "ssim", "rmse")


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def load_case(case: Path, source: str, target: str, roi_names: Sequence[str] = DEFAULT_ROIS) -> Case:
    """Read source, reference and masks of a case folder (``cases.read_case``), with the masks of
    its label regions; a case without a body label map gets one from the source's intensities
    (``data.body_mask``)."""
    files = case_files(case, source, target, roi_names, label_regions=True)
    if files.reference is None:
        raise ValueError(f"{case}: no {target!r} volume")
    loaded = read_case(files)
    if BODY not in loaded.masks:
        loaded.masks[BODY] = mdata.body_mask(loaded.source)
    return loaded


def evaluate_case(options: app.TranslationOptions, case: Case, *, cache: app.ModelCache | None = None
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Translate one case (stochastic methods: the mean of ``options.num_samples`` samples);
    returns (synthetic (z, y, x) in physical units, table rows {case, method, region, mae, psnr,
    ssim, rmse} for "model" and "identity")."""
    result = app.run_translation(app.TranslationRequest(case, options), cache=cache).result
    rows = []
    for name, table in (("model", result.metrics), ("identity", result.baseline_metrics)):
        for region, values in (table or {}).items():
            rows.append({"case": case.name, "method": name, "region": region,
                         **{k: float(values[k]) for k in METRICS}})
    return result.synthetic.array, rows


# ---------------------------------------------------------------------------------------------
# tables and figures
# ---------------------------------------------------------------------------------------------
def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd over cases per (method, region): {method, region, n, <metric>_mean,
    <metric>_sd}. Non-finite values (PSNR of identical volumes, SSIM of tiny regions) are left
    out of that metric's statistics."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["region"]), []).append(row)
    order = {r: i for i, r in enumerate(ordered_regions([r["region"] for r in rows]))}
    out = []
    for (method, region), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != "model", kv[0][0],
                                                                          order[kv[0][1]])):
        entry: dict[str, Any] = {"method": method, "region": region, "n": len(items)}
        for m in METRICS:
            values = np.array([float(r[m]) for r in items])
            values = values[np.isfinite(values)]
            entry[f"{m}_mean"] = float(values.mean()) if values.size else math.nan
            entry[f"{m}_sd"] = float(values.std(ddof=1)) if values.size > 1 else 0.0 if values.size else math.nan
        out.append(entry)
    return out


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: Path, *, title: str, units: str) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per case, method, region) and ``metrics.md`` (mean +- sd per
    method and region, then the per-case values). Returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "metrics.csv", out_dir / "metrics.md"
    columns = ["case", "method", "region", *METRICS]
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
    digits = {"mae": 2, "psnr": 2, "ssim": 4, "rmse": 2}
    lines = [f"# {title}", "",
             f"MAE and RMSE in {units}; PSNR in dB; SSIM unitless. Mean ± sd over cases. *identity*: the "
             f"source with no model, in the target's units (CT -> CT: the source HU themselves; "
             f"otherwise mapped through both intensity presets).", "",
             "| method | region | cases | MAE | PSNR | SSIM | RMSE |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in summarise(rows):
        cells = [f"{_fmt(s[f'{m}_mean'], digits[m])} ± {_fmt(s[f'{m}_sd'], digits[m])}" for m in METRICS]
        lines.append(f"| {s['method']} | {s['region']} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per case", "", "| case | method | region | MAE | PSNR | SSIM | RMSE |",
              "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [_fmt(float(row[m]), digits[m]) for m in METRICS]
        lines.append(f"| {row['case']} | {row['method']} | {row['region']} | " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _display_slice(masks: Mapping[str, np.ndarray], axis: int, roi_names: Sequence[str] = DEFAULT_ROIS) -> int:
    """Slice index with the largest ROI area, later (smaller) ROIs weighted 4x each (the tumour
    before the liver); else the body; else the middle."""
    other = tuple(a for a in range(3) if a != axis)
    shape = masks[BODY].shape
    rois = sum((np.asarray(masks[r], np.int64) * 4 ** i for i, r in enumerate(roi_names) if r in masks),
               np.zeros(shape, np.int64))
    for mask in (rois, masks[BODY]):
        areas = np.asarray(mask).sum(axis=other)
        if areas.any():
            return int(np.argmax(areas))
    return shape[axis] // 2


def case_figure(case: Case, synthetic: np.ndarray, path: Path, *, axis: int = 0,
                windows: tuple[tuple[float, float], tuple[float, float]] | None = None, units: str = "",
                row: Mapping[str, Any] | None = None, roi_names: Sequence[str] = DEFAULT_ROIS) -> Path:
    """PNG: source | synthetic | reference | |synthetic - reference| (heatmap with colour bar)
    at the slice of :func:`_display_slice`. ``windows``: (source, target) display ranges
    (default: 1st-99th percentiles); synthetic and reference share the target window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = _display_slice(case.masks, axis, roi_names)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take(np.asarray(a), k, axis=axis)

    src, syn, ref, body = take(case.source.array), take(synthetic), take(case.reference.array), take(case.masks[BODY])
    diff = np.abs(syn - ref)
    if windows is None:
        windows = (tuple(np.percentile(src, (1, 99))), tuple(np.percentile(ref, (1, 99))))
    (s_lo, s_hi), (t_lo, t_hi) = windows
    d_hi = float(np.percentile(diff[body], 99)) if body.any() else float(diff.max())
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), constrained_layout=True)
    panels = [("source", src, "gray", (s_lo, s_hi)), ("synthetic", syn, "gray", (t_lo, t_hi)),
              ("reference", ref, "gray", (t_lo, t_hi)),
              ("|synthetic − reference|", diff, "inferno", (0.0, d_hi or 1.0))]
    for ax, (title, image, cmap, (lo, hi)) in zip(axes, panels, strict=True):
        im = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=units)
    text = f"{case.name}, slice {k} (axis {axis})"
    if row is not None:
        text += f" — body MAE {row['mae']:.1f} {units}, PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}"
    fig.suptitle(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# a bundle on a data split
# ---------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    csv: Path
    markdown: Path
    figures: list[Path] = field(default_factory=list)


def bundle_split(meta: Any, root: Path, split: str, bundle_path: Any = "the bundle") -> list[Path]:
    """The case folders of ``split`` ("train", "val", "test" or "all") under ``root`` as the
    bundle's training split them (``cases.model_split`` with the bundle's ratios, seed and
    pairing), keeping those that hold both the source and the target volume."""
    from .cases import find_cases
    from .methods import get_method_class

    source, target = meta.source.modality, meta.target.modality
    training = meta.training if isinstance(meta.training, Mapping) else {}
    info = training.get("data", {}) or {}
    config_data = (training.get("config") or {}).get("data") or {}
    paired = info.get("paired", config_data.get("paired"))
    if paired is None:
        paired = get_method_class(meta.method).paired
    ratios = info.get("split", (7, 1, 2))
    seed = info.get("split_seed", 0)
    try:
        if split == "all":
            chosen = find_cases(root, required=(source, target))
        else:
            chosen = model_split(root, source, target, paired=bool(paired), ratios=ratios, seed=seed)[split]
    except ValueError as exc:
        if not Path(root).is_dir():
            raise
        raise ValueError(f"{root}: no case has the {source!r} and {target!r} volumes that bundle "
                         f"{bundle_path} translates") from exc
    usable = [c for c in chosen if all(mdata.find_volume_file(c, s) is not None for s in (source, target))]
    if not usable:
        raise ValueError(f"{root}: the {split} split (ratios {list(ratios)}, seed {seed}) of its cases holds no case "
                         f"with both {source!r} and {target!r}; use --split all or more cases")
    return usable


def evaluate_bundle(bundle_path: str | os.PathLike, data_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                    split: str = "test", steps: int | None = None, batch_size: int | str = "auto",
                    device: str = "auto", seed: int = 0, num_samples: int = 1, max_cases: int | None = None,
                    figures: bool = True,
                    log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate a bundle on ``split`` ("train", "val", "test" as the bundle's training split them
    with its split ratios and seed, or "all") of the cases under ``data_root``; writes
    ``metrics.csv``, ``metrics.md`` and ``figures/<case>.png`` into ``out_dir``."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}")
    options = app.TranslationOptions(model=str(bundle_path), device=device, steps=steps, num_samples=num_samples,
                                     seed=seed, batch_size=batch_size)
    cache = app.ModelCache()
    translator = cache.get(options)
    meta = translator.bundle.meta
    roi_names = translator.roi_names
    root, out = Path(data_root), Path(out_dir)
    cases = bundle_split(meta, root, split, bundle_path)
    if max_cases is not None:
        cases = cases[:max_cases]
    units = translator.target_preset.UNITS
    rows: list[dict[str, Any]] = []
    pictures: list[Path] = []
    for case_path in cases:
        case = load_case(case_path, meta.source.modality, meta.target.modality, roi_names)
        synthetic, case_rows = evaluate_case(options, case, cache=cache)
        rows.extend(case_rows)
        if figures:
            # display windows only (metrics never see the reference's statistics)
            windows = (preset_from_config(meta.source.preset).fit(case.source.array).physical_range,
                       preset_from_config(meta.target.preset).fit(case.reference.array).physical_range)
            body_row = next((r for r in case_rows if r["method"] == "model" and r["region"] == BODY), None)
            pictures.append(case_figure(case, synthetic, out / "figures" / f"{case.name}.png", axis=translator.axis,
                                        windows=windows, units=units, row=body_row, roi_names=roi_names))
        if log is not None:
            body = [r for r in case_rows if r["region"] == BODY]
            log(f"{case.name}: " + "; ".join(f"{r['method']} body MAE {r['mae']:.2f} {units}" for r in body))
    title = f"{meta.method}: {meta.source.modality} → {meta.target.modality}, {len(cases)} case(s) of the {split} split"
    if translator.capabilities.stochastic:
        title += f", {steps or 'default'} steps, mean of {num_samples} sample(s), seed {seed}"
    csv_path, md_path = write_table(rows, out, title=title, units=units)
    return EvaluationResult(rows, summarise(rows), csv_path, md_path, pictures)
