"""Evaluate a model bundle on held-out cases: metrics table (CSV + Markdown) and one figure per case.

Every case of the chosen split goes through ``engine.VolumeTranslator`` (the same volume
translation users get: source preset, the training's slice cropping, batched slices, target
preset inverse) with its reference. Metrics (``metrics.roi_metrics``: MAE, PSNR, SSIM, RMSE in
physical units; SynthRAD2023 conventions with the -1024..3000 HU range for CT targets) cover the
whole volume, the body, the liver and the tumour. The *identity* baseline
(``engine.identity_baseline``: the source with no model, in the target's units -- for CT -> CT the
source HU clipped to the target window, otherwise the source through both presets) is measured
the same way, so the table shows what the model adds. No Lightning here.
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

from . import data as mdata
from . import io as mio
from .engine import VolumeTranslator
from .intensity import preset_from_config

__all__ = ["REGIONS", "METRICS", "CaseVolumes", "EvaluationResult", "load_case", "evaluate_case",
           "evaluate_bundle", "summarise", "write_table", "case_figure"]

#: Regions of the table, in order (a case without a tumour has no tumour rows).
REGIONS = ("whole", "body", "liver", "tumor")
METRICS = ("mae", "psnr", "ssim", "rmse")


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseVolumes:
    """A case read for evaluation. Masks are (z, y, x) bool on the source grid; the reference is
    resampled onto it when its geometry differs."""

    name: str
    source: mio.Volume
    reference: mio.Volume
    masks: dict[str, np.ndarray]  # "body", "liver", "tumor"


def load_case(case: Path, source: str, target: str) -> CaseVolumes:
    """Read source, reference and masks (body from ``labels``, else from the source's
    intensities; missing liver / tumour masks are empty) of a case folder."""
    paths = {}
    for stem in (source, target):
        path = mdata.find_volume_file(case, stem)
        if path is None:
            raise ValueError(f"{case}: no {stem!r} volume")
        paths[stem] = path
    src = mio.read_volume(paths[source])
    ref = mio.read_volume(paths[target])
    if not ref.same_geometry(src, atol=1e-4):
        ref = mio.resample_like(ref, src, interpolation="linear", default=float(ref.array.min()))
    masks = {}
    labels = mdata.find_volume_file(case, mdata.BODY_LABELS)
    masks["body"] = mio.read_mask(labels, like=src).array > 0.5 if labels is not None else mdata.body_mask(src)
    for name in ("liver", "tumor"):
        path = mdata.find_volume_file(case, name)
        masks[name] = mio.read_mask(path, like=src).array > 0.5 if path is not None else np.zeros(src.shape, bool)
    return CaseVolumes(case.name, src, ref, masks)


def evaluate_case(translator: VolumeTranslator, case: CaseVolumes, *, steps: int | None = None,
                  seed: int = 0, num_samples: int = 1) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Translate one case (stochastic methods: the mean of ``num_samples`` samples); returns (synthetic (z, y, x) in physical units, table rows
    {case, method, region, mae, psnr, ssim, rmse} for "model" and "identity")."""
    result = translator.translate(case.source, masks=case.masks, reference=case.reference, steps=steps,
                                  seed=seed, num_samples=num_samples)
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
    order = {r: i for i, r in enumerate(REGIONS)}
    out = []
    for (method, region), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != "model", kv[0][0],
                                                                          order.get(kv[0][1], 99))):
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
             f"source with no model, in the target's units (CT -> CT: clipped to the target window; "
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


def _display_slice(masks: Mapping[str, np.ndarray], axis: int) -> int:
    """Slice index with the largest tumour + liver area (else body, else the middle)."""
    other = tuple(a for a in range(3) if a != axis)
    for mask in (masks["tumor"].astype(np.int64) * 4 + masks["liver"], masks["body"]):
        areas = np.asarray(mask).sum(axis=other)
        if areas.any():
            return int(np.argmax(areas))
    return masks["body"].shape[axis] // 2


def case_figure(case: CaseVolumes, synthetic: np.ndarray, path: Path, *, axis: int = 0,
                windows: tuple[tuple[float, float], tuple[float, float]] | None = None, units: str = "",
                row: Mapping[str, Any] | None = None) -> Path:
    """PNG: source | synthetic | reference | |synthetic - reference| (heatmap with colour bar)
    at the slice of :func:`_display_slice`. ``windows``: (source, target) display ranges
    (default: 1st-99th percentiles); synthetic and reference share the target window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = _display_slice(case.masks, axis)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take(np.asarray(a), k, axis=axis)

    src, syn, ref, body = take(case.source.array), take(synthetic), take(case.reference.array), take(case.masks["body"])
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


def _split_cases(root: Path, split: str, source: str, target: str, training: Mapping[str, Any],
                 bundle_path: Path) -> list[Path]:
    try:
        cases = mdata.find_cases(root, required=(source, target))
    except ValueError as exc:
        if not Path(root).is_dir():
            raise
        raise ValueError(f"{root}: no case has the {source!r} and {target!r} volumes that bundle "
                         f"{bundle_path} translates") from exc
    if split == "all":
        return cases
    info = training.get("data", {}) if isinstance(training, Mapping) else {}
    ratios = info.get("split", (7, 1, 2))
    seed = info.get("split_seed", 0)
    chosen = mdata.split_cases(cases, ratios=ratios, seed=seed)[split]
    if not chosen:
        raise ValueError(f"{root}: the {split} split (ratios {list(ratios)}, seed {seed}) of its {len(cases)} "
                         f"cases is empty; use --split all or more cases")
    return chosen


def evaluate_bundle(bundle_path: str | os.PathLike, data_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                    split: str = "test", steps: int | None = None, batch_size: int | str = "auto",
                    device: str = "auto", seed: int = 0, num_samples: int = 1, max_cases: int | None = None,
                    figures: bool = True,
                    log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate a bundle on ``split`` ("train", "val", "test" as the bundle's training split them
    with its split ratios and seed, or "all") of the cases under ``data_root``; writes
    ``metrics.csv``, ``metrics.md`` and ``figures/<case>.png`` into ``out_dir``."""
    from .bundle import load_bundle

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}")
    bundle = load_bundle(bundle_path)
    translator = VolumeTranslator(bundle, device=device, batch_size=batch_size, baseline_metrics=True)
    meta = bundle.meta
    root, out = Path(data_root), Path(out_dir)
    cases = _split_cases(root, split, meta.source.modality, meta.target.modality, meta.training, Path(bundle_path))
    if max_cases is not None:
        cases = cases[:max_cases]
    target_is_ct = preset_from_config(meta.target.preset).kind == "ct_window"
    units = "HU" if target_is_ct else f"{meta.target.modality} units"
    rows: list[dict[str, Any]] = []
    pictures: list[Path] = []
    for case_path in cases:
        case = load_case(case_path, meta.source.modality, meta.target.modality)
        synthetic, case_rows = evaluate_case(translator, case, steps=steps, seed=seed, num_samples=num_samples)
        rows.extend(case_rows)
        if figures:
            # display windows only (metrics never see the reference's statistics)
            windows = (preset_from_config(meta.source.preset).fit(case.source.array).physical_range,
                       preset_from_config(meta.target.preset).fit(case.reference.array).physical_range)
            body_row = next((r for r in case_rows if r["method"] == "model" and r["region"] == "body"), None)
            pictures.append(case_figure(case, synthetic, out / "figures" / f"{case.name}.png", axis=translator.axis,
                                        windows=windows, units=units, row=body_row))
        if log is not None:
            body = [r for r in case_rows if r["region"] == "body"]
            log(f"{case.name}: " + "; ".join(f"{r['method']} body MAE {r['mae']:.2f} {units}" for r in body))
    title = f"{meta.method}: {meta.source.modality} → {meta.target.modality}, {len(cases)} case(s) of the {split} split"
    if translator.method.stochastic:
        title += f", {steps or 'default'} steps, mean of {num_samples} sample(s), seed {seed}"
    csv_path, md_path = write_table(rows, out, title=title, units=units)
    return EvaluationResult(rows, summarise(rows), csv_path, md_path, pictures)
