"""``medtranslate`` command line: demo | translate | evaluate | phantom | models.

Every failure the user can cause (bad file, bad option) ends in one line on stderr and a
non-zero exit code, never a traceback. Set MEDTRANSLATE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "medtranslate"


class CLIError(Exception):
    """An error whose message is meant for the user as it is."""


def _cmd_phantom(args: argparse.Namespace) -> int:
    from . import phantom

    config = phantom.PhantomConfig.from_cli(shape=args.shape, spacing=args.spacing,
                                            misregistration_mm=args.misregistration)
    folders = phantom.write_phantom_dataset(args.out, cases=args.cases, seed=args.seed, config=config)
    for folder in folders:
        print(folder)
    return 0


# ---------------------------------------------------------------------------------------------
# translate / demo (the volume engine)
# ---------------------------------------------------------------------------------------------
#: Files written per case in folder mode (and by the demo), besides metrics.json.
_CASE_OUTPUTS = ("synthetic", "difference", "reference_difference", "uncertainty")


@dataclass
class _Case:
    """One volume to translate: its source file, mask files by name, optional reference."""

    name: str
    source: Path
    masks: dict[str, Path] = field(default_factory=dict)
    reference: Path | None = None


class _ProgressBar:
    """The engine's progress callback as a tqdm bar on stderr (hidden when stderr is no terminal)."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="slice", file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)

    def __call__(self, done: int, total: int, eta: float | None) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _volume_stem(path: Path) -> str | None:
    from .io import FILE_EXTENSIONS

    lower = path.name.lower()
    for ext in FILE_EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            return path.name[: -len(ext)]
    return None


def _check_output(path: Path, flag: str) -> Path:
    """An output path must be a volume file name or an extension-less DICOM folder name."""
    from .io import FILE_EXTENSIONS

    if _volume_stem(path) is None and path.suffix and not path.is_dir():
        raise CLIError(f"{flag} {path}: unsupported output extension {path.suffix!r}; use one of "
                       f"{', '.join(FILE_EXTENSIONS)} or a folder name (DICOM series)")
    return path


def _find_cases(root: Path, source: str, target: str) -> list[_Case] | None:
    """Cases under folder ``root``: case folders holding ``<source>.*`` (masks liver/tumor/labels
    and the reference ``<target>.*`` when present), else every volume file directly in ``root``.
    None when ``root`` is a single volume (a file, or a DICOM series folder)."""
    from . import data

    if not root.exists():
        raise ValueError(f"{root}: file not found")
    if not root.is_dir():
        return None
    try:
        folders = data.find_cases(root, required=[source])
    except ValueError:
        folders = []
    if folders:
        cases = []
        for folder in folders:
            rel = folder.relative_to(root)
            masks = {name: p for name, stem in (("liver", "liver"), ("tumor", "tumor"), ("body", data.BODY_LABELS))
                     if (p := data.find_volume_file(folder, stem)) is not None}
            cases.append(_Case(name=root.name if str(rel) == "." else rel.as_posix(),
                               source=data.find_volume_file(folder, source), masks=masks,
                               reference=data.find_volume_file(folder, target)))
        return cases
    files = sorted(p for p in root.iterdir() if p.is_file() and _volume_stem(p))
    if files:
        return [_Case(name=_volume_stem(p) or p.name, source=p) for p in files]
    return None


def _read_case(case: _Case):
    """(source Volume, masks {name: Volume on the source grid}, reference Volume or None)."""
    from . import io

    vol = io.read_volume(case.source)
    masks = {name: io.read_mask(path, like=vol) for name, path in case.masks.items()}
    ref = io.read_volume(case.reference) if case.reference is not None else None
    return vol, masks, ref


def _run_case(translator, case: _Case, args: argparse.Namespace):
    vol, masks, ref = _read_case(case)
    bar = _ProgressBar(case.name)
    try:
        return translator.translate(vol, masks=masks, reference=ref, steps=args.steps,
                                    num_samples=args.num_samples, seed=args.seed,
                                    slice_range=_slice_range(args), progress=bar)
    finally:
        bar.close()


def _slice_range(args: argparse.Namespace):
    if args.roi is not None:
        return args.roi
    if args.slices is None:
        return None
    try:
        first, last = (int(v) for v in args.slices.split(":"))
    except ValueError:
        raise CLIError(f"--slices must be FIRST:LAST (e.g. 10:40), got {args.slices!r}") from None
    return first, last


def _dicom_modality(translator) -> str:
    kind = translator.bundle.meta.target.preset
    kind = kind.get("kind") if isinstance(kind, dict) else kind
    return "CT" if str(kind).startswith("ct") else "PT" if str(kind).startswith("pet") else "MR"


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_all(items: list[tuple[object, Path]], modality: str) -> list[Path]:
    """Write volumes / JSON documents; on any failure remove what this call already wrote."""
    from . import io

    written: list[Path] = []
    try:
        for obj, path in items:
            if isinstance(obj, io.Volume):
                io.write_volume(obj, path, modality=modality)
            else:
                _write_json(obj, path)
            written.append(path)
    except BaseException:
        for path in written:
            _remove(path)
        raise
    return written


def _metrics_doc(result, translator, case: _Case | None = None) -> dict:
    meta = translator.bundle.meta
    return {"model": str(translator.bundle.path), "method": meta.method,
            "source": meta.source.modality, "target": meta.target.modality,
            "case": case.name if case else None, "input": str(case.source) if case else None,
            "metrics": result.metrics, "identity": result.baseline_metrics,
            "consistency": result.consistency, "slice_range": list(result.slice_range),
            "info": result.info}


def _print_metrics(result, indent: str = "  ") -> None:
    if not result.metrics:
        return
    base = result.baseline_metrics or {}
    head = f"{indent}{'region':6s} {'MAE':>8s} {'PSNR':>7s} {'SSIM':>6s}" + ("   identity MAE" if base else "")
    print(head)
    for region, row in result.metrics.items():
        line = f"{indent}{region:6s} {row['mae']:8.2f} {row['psnr']:7.2f} {row['ssim']:6.3f}"
        if region in base:
            line += f"   {base[region]['mae']:12.2f}"
        print(line)


def _make_translator(args: argparse.Namespace, device: str):
    from . import engine, model_store

    batch = args.batch_size
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            raise CLIError(f"--batch-size must be 'auto' or a positive integer, got {batch!r}") from None
    return engine.VolumeTranslator(model_store.find_model(args.model), device=device, precision=args.precision,
                                   batch_size=batch, shared_noise=args.shared_noise, roi_margin=args.roi_margin,
                                   baseline_metrics=True)


def _cmd_translate(args: argparse.Namespace) -> int:
    """translate one volume (file or DICOM folder) or a folder of cases with a model bundle."""
    from . import engine

    rank, world, local = engine.distributed_env()
    device = args.device
    if device == "auto" and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    translator = _make_translator(args, device)
    meta = translator.bundle.meta
    source = Path(args.input)
    cases = _find_cases(source, meta.source.modality, meta.target.modality)
    if cases is None:
        return _translate_single(translator, args)
    per_case = [f for f in ("liver", "tumor", "reference", "difference", "uncertainty", "metrics")
                if getattr(args, f) is not None]
    if per_case:
        raise CLIError(f"--{per_case[0]} applies to a single input; {source} is a folder of {len(cases)} "
                       f"case(s): masks and references are read from each case folder and every output "
                       f"is written to --output/<case>/")
    out = Path(args.output)
    if _volume_stem(out) is not None or (out.exists() and not out.is_dir()):
        raise CLIError(f"--output {out}: must be a folder when --input is a folder of cases")
    mine = engine.shard(cases, rank, world)
    print(f"{len(mine)} of {len(cases)} case(s) on rank {rank}/{world}, device {translator.device}")
    failed = 0
    for case in mine:
        try:
            result = _run_case(translator, case, args)
            folder = _write_case_folder(result, translator, case, out / case.name)
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            if os.environ.get("MEDTRANSLATE_DEBUG"):
                raise
            failed += 1
            print(f"{PROG}: error: {case.name}: {_one_line(exc)}", file=sys.stderr)
            continue
        extra = ""
        if result.metrics and "liver" in result.metrics:
            extra = f", liver MAE {result.metrics['liver']['mae']:.1f}"
        print(f"{case.name}: {folder} ({result.info['slices']} slices, {result.info['seconds']:.1f} s{extra})")
    if failed:
        print(f"{PROG}: error: {failed} of {len(mine)} case(s) failed", file=sys.stderr)
        return 2
    return 0


def _translate_single(translator, args: argparse.Namespace) -> int:
    out = _check_output(Path(args.output), "--output")
    extra = {"difference": args.difference, "uncertainty": args.uncertainty}
    for name, path in extra.items():
        if path is not None:
            _check_output(Path(path), f"--{name}")
    targets = [Path(p).resolve() for p in (out, *(p for p in extra.values() if p), args.metrics) if p]
    if len(set(targets)) != len(targets):
        raise CLIError("--output, --difference, --uncertainty and --metrics must be different paths")
    inputs = {Path(p).resolve() for p in (args.input, args.liver, args.tumor, args.reference) if p}
    if inputs & set(targets):
        raise CLIError(f"an output path is also an input: {sorted(str(p) for p in inputs & set(targets))[0]}")
    if args.reference is None and args.metrics is not None:
        raise CLIError("--metrics needs --reference (metrics compare the synthetic with a reference)")
    masks = {name: Path(p) for name, p in (("liver", args.liver), ("tumor", args.tumor)) if p is not None}
    reference = Path(args.reference) if args.reference else None
    case = _Case(name=Path(args.input).name, source=Path(args.input), masks=masks, reference=reference)
    result = _run_case(translator, case, args)
    if args.uncertainty is not None and result.uncertainty is None:
        method = translator.method
        raise CLIError(f"--uncertainty: the {method.name} model defines no uncertainty map"
                       + (" (try --num-samples 8)" if method.stochastic or getattr(
                           method.config, "test_time_dropout", False) else ""))
    items: list[tuple[object, Path]] = [(result.synthetic, out)]
    if args.difference:
        items.append((result.difference, Path(args.difference)))
    if args.uncertainty:
        items.append((result.uncertainty, Path(args.uncertainty)))
    if args.metrics:
        items.append((_metrics_doc(result, translator, case), Path(args.metrics)))
    written = _write_all(items, _dicom_modality(translator))
    info = result.info
    print(f"synthetic: {written[0]} ({info['slices']} slices in {info['seconds']:.1f} s on {info['device']}, "
          f"{info['precision']}, batch {info['batch_size']})")
    for path in written[1:]:
        print(f"wrote:     {path}")
    _print_metrics(result)
    return 0


def _write_case_folder(result, translator, case: _Case, folder: Path) -> Path:
    """All outputs of one case into ``folder``, atomically (a temporary folder renamed into place)."""
    import shutil
    import tempfile

    target = translator.bundle.meta.target.modality
    names = {"synthetic": f"{target}_synthetic.nii.gz", "difference": "difference.nii.gz",
             "reference_difference": "reference_difference.nii.gz", "uncertainty": "uncertainty.nii.gz"}
    if folder.exists():
        allowed = {*names.values(), "metrics.json"}
        if not folder.is_dir() or any(p.name not in allowed for p in folder.iterdir()):
            raise CLIError(f"{folder}: exists and holds other files; not replacing it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        items = [(getattr(result, key), tmp / name) for key, name in names.items()
                 if getattr(result, key) is not None]
        items.append((_metrics_doc(result, translator, case), tmp / "metrics.json"))
        _write_all(items, _dicom_modality(translator))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _demo_models(names: list[str] | None) -> list[Path]:
    from . import bundle, model_store

    if names:
        return [model_store.find_model(n) for n in names]
    folder = model_store.bundled_models_dir()
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and bundle.is_bundle(p)) \
        if folder.is_dir() else []
    if not found:
        raise CLIError(f"no demo model bundles in {folder}; give one with --model")
    return found


def _demo_figure(path: Path, translator, case, source, result, reference) -> Path:
    import numpy as np

    from . import maps
    from .intensity import preset_from_config

    meta = translator.bundle.meta
    centre = maps.focus_index(case.masks["tumor"], case.masks["liver"], shape=source.shape)
    body = case.masks["labels"].array > 0  # heatmaps inside the body only: air is clipped anyway

    def in_body(vol):
        return None if vol is None else np.where(body, vol.array, np.nan)

    columns = {"source": source.array, "synthetic": result.synthetic.array,
               "reference": None if reference is None else reference.array,
               "difference": in_body(result.difference),
               "reference_difference": in_body(result.reference_difference),
               # shown as a standard deviation so its colour bar is in the image's units
               "uncertainty": None if result.uncertainty is None else np.sqrt(in_body(result.uncertainty))
               if result.uncertainty_kind == "variance" else in_body(result.uncertainty)}
    rows = []
    for i, view in enumerate(("axial", "coronal", "sagittal")):
        row: dict = {"label": view}
        for key, arr in columns.items():
            if arr is not None:
                name, image, aspect = maps.orthogonal_views(arr, centre, source.spacing)[i]
                row[key], row["aspect"] = image, aspect
        rows.append(row)
    # The source is drawn in its own window (an MR source in a CT window is saturated).
    src_lo, src_hi = preset_from_config(result.info["source_preset"]).physical_range \
        if "source_preset" in result.info else (None, None)
    window = result.info["target_preset"]
    lo, hi = preset_from_config(window).physical_range
    units = "HU" if _dicom_modality(translator) == "CT" else "a.u."
    title = (f"{Path(translator.bundle.path).name}: {meta.source.modality} \u2192 {meta.target.modality} "
             f"({meta.method}), phantom seed {case.seed}")
    return maps.comparison_figure(path, rows, title=title, window=(lo, hi), units=units,
                                  source_window=None if src_lo is None else (src_lo, src_hi),
                                  uncertainty_label=f"std ({units})")


def _cmd_demo(args: argparse.Namespace) -> int:
    """The offline demo: a phantom case through every bundled demo model, with the identity
    baseline's metrics next to each model's."""
    import time

    from . import engine, phantom

    t0 = time.perf_counter()
    out = Path(args.out)
    translators = [engine.VolumeTranslator(p, device=args.device, baseline_metrics=True)
                   for p in _demo_models(args.model)]
    seed = phantom.case_seed(args.seed, 0)
    case = phantom.generate_case(seed, phantom.PhantomConfig.from_cli(shape=args.shape))
    case_dir = phantom.write_case(case, out / "phantom")
    report: dict = {"case": {"folder": str(case_dir), "seed": seed, "dataset_seed": args.seed,
                             "tumors": len(case.info.get("tumors", []))}, "models": {}}
    masks = {"liver": case.masks["liver"], "tumor": case.masks["tumor"], "body": case.masks["labels"]}
    print(f"phantom case: {case_dir}")
    for translator in translators:
        meta = translator.bundle.meta
        name = Path(translator.bundle.path).name
        name = name[:-4] if name.lower().endswith(".zip") else name
        source, reference = case.images.get(meta.source.modality), case.images.get(meta.target.modality)
        if source is None:
            print(f"{name}: skipped (the phantom has no {meta.source.modality!r} image)")
            continue
        bar = _ProgressBar(name)
        try:
            result = translator.translate(source, masks=masks, reference=reference, seed=args.seed, progress=bar)
        finally:
            bar.close()
        folder = out / name
        items = [(getattr(result, key), folder / f"{key}.nii.gz") for key in _CASE_OUTPUTS
                 if getattr(result, key) is not None]
        files = _write_all(items, _dicom_modality(translator))
        figure = _demo_figure(folder / "figure.png", translator, case, source, result, reference)
        report["models"][name] = {**_metrics_doc(result, translator),
                                  "outputs": [str(p) for p in files], "figure": str(figure)}
        print(f"{name} ({meta.method}, {meta.source.modality} -> {meta.target.modality}): "
              f"{result.info['slices']} slices in {result.info['seconds']:.1f} s")
        print(f"  outputs: {folder}/ ({', '.join(p.name for p in files)})")
        print(f"  figure:  {figure}")
        _print_metrics(result, indent="    ")
    report["seconds"] = time.perf_counter() - t0
    metrics_path = _write_json(report, out / "metrics.json")
    print(f"metrics: {metrics_path}")
    print(f"done in {report['seconds']:.1f} s")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    """models list | show NAME | import PATH [--name N] [--force]: the user model folder."""
    from . import bundle, model_store

    if args.models_command == "list":
        models = model_store.list_models()
        if not models:
            print(f"no models in {model_store.models_dir()} "
                  f"(add one with: {PROG} models import PATH)")
            return 0
        rows = [(m.name, m.method, f"{m.source} -> {m.target}", m.origin,
                 str(m.path) if m.error is None else f"BROKEN: {m.error}") for m in models]
        header = ("NAME", "METHOD", "TRANSLATION", "ORIGIN", "PATH")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
        return 0
    if args.models_command == "show":
        path = model_store.find_model(args.name)
        meta = bundle.read_bundle_meta(path)
        print(f"# {path}")
        print(bundle.meta_summary(meta), end="")
        return 0
    if args.models_command == "import":
        info = model_store.import_model(args.path, args.name, overwrite=args.force)
        print(f"imported {info.name} ({info.method}: {info.source} -> {info.target}) into {info.path}")
        return 0
    raise CLIError(f"unknown models command {args.models_command!r}")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return value


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """A bundle on held-out cases: metrics table (CSV + Markdown) and a figure per case."""
    from .evaluation import evaluate_bundle

    result = evaluate_bundle(args.bundle, args.data, args.out, split=args.split, steps=args.steps,
                             batch_size=args.batch_size, device=args.device, seed=args.seed,
                             num_samples=args.num_samples, max_cases=args.max_cases, figures=not args.no_figures,
                             log=lambda line: print(line, flush=True))
    print(result.markdown.read_text(encoding="utf-8").split("## Per case")[0].rstrip())
    print(f"table:   {result.csv}  {result.markdown}")
    if result.figures:
        print(f"figures: {result.figures[0].parent} ({len(result.figures)})")
    return 0


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Medical image translation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write paired abdominal phantom cases (all modalities + masks)")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per case)")
    p.add_argument("--cases", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="volume size in voxels (default 64 128 128)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                   help="voxel spacing in mm, x y z (default 2.5 2.5 2.5)")
    p.add_argument("--misregistration", type=float, default=None,
                   help="max rigid shift in mm between source and target modalities (default 0)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("demo", help="offline demo: a phantom case through the bundled demo models")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seed", type=int, default=4,
                   help="phantom dataset seed; its case 0 is used (default 4: 3 liver tumors; the demo model "
                        "was trained on dataset seed 7)")
    p.add_argument("--model", action="append", default=None,
                   help="model name or bundle path (repeatable; default: every bundled demo model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="phantom size in voxels (default 64 128 128; smaller is faster)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("translate", help="translate a volume, or a folder of cases, with a model bundle")
    p.add_argument("--model", required=True, help="bundle folder/.zip or model name (see: models list)")
    p.add_argument("--input", required=True, help="source volume file, DICOM series folder, or folder of cases")
    p.add_argument("--output", required=True,
                   help="synthetic volume file (folder without extension: DICOM series); a folder for cases")
    p.add_argument("--liver", default=None, help="liver mask (resampled onto the source grid if needed)")
    p.add_argument("--tumor", default=None, help="tumor mask")
    p.add_argument("--reference", default=None, help="real target volume: metrics and reference difference")
    p.add_argument("--difference", default=None, help="write synthetic - source (target units) here")
    p.add_argument("--uncertainty", default=None, help="write the uncertainty map here (methods that have one)")
    p.add_argument("--metrics", default=None, help="write metrics JSON here (needs --reference)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion methods)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per slice (uncertainty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--batch-size", default="auto", help="slices per batch, or auto")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--slices", default=None, metavar="FIRST:LAST", help="translate only these slices")
    g.add_argument("--roi", choices=("liver", "tumor"), default=None,
                   help="translate only the slices of this mask (+- --roi-margin)")
    p.add_argument("--roi-margin", type=int, default=4)
    p.add_argument("--shared-noise", action="store_true", help="same noise for every slice (diffusion methods)")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("evaluate", help="evaluate a bundle on held-out cases: metrics table + figures")
    p.add_argument("--bundle", required=True, type=Path, help="model bundle (folder or .zip)")
    p.add_argument("--data", required=True, type=Path, help="folder of case folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="the bundle's own case split (ratios and seed are in the bundle), or all")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion methods)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="slices per forward pass (auto: from free GPU memory, 8 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (stochastic methods)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples per slice, averaged (stochastic methods)")
    p.add_argument("--max-cases", type=int, default=None, help="evaluate at most this many cases")
    p.add_argument("--no-figures", action="store_true", help="skip the per-case PNG figures")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("models", help="list, show and import model bundles (user model folder)")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="user models ($MEDTRANSLATE_HOME/models) and bundled models")
    q = msub.add_parser("show", help="print a model's medtranslate.yaml")
    q.add_argument("name", help="model name or bundle path")
    q = msub.add_parser("import", help="check a bundle (folder or .zip) and copy it into the model folder")
    q.add_argument("path", type=Path)
    q.add_argument("--name", default=None, help="name in the model folder (default: folder name / zip stem)")
    q.add_argument("--force", action="store_true", help="replace an existing model of that name")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, KeyError, RuntimeError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
