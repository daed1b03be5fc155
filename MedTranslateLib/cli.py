"""``medtranslate`` command line: demo | translate | evaluate | phantom | models.

Every failure the user can cause (bad file, bad option) ends in one line on stderr and a
non-zero exit code, never a traceback. Set MEDTRANSLATE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .app import MAX_SEED
from .app import UserError as CLIError
from .runtime import SELECT_MODES, first_line, short_lived_process

PROG = "medtranslate"
#: the demo's sampling steps for models whose steps can be chosen, and samples for models that
#: score their samples (CPU time: every step and sample is one more network pass per slice)
DEMO_STEPS = 10
DEMO_SCORED_SAMPLES = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (``prog: error: ...``, exit 2), without the usage block."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high if high is not None else 'inf'}")
        return value

    parse.__name__ = "integer"
    return parse




def _cmd_phantom(args: argparse.Namespace) -> int:
    from . import phantom

    config = phantom.PhantomConfig.from_cli(shape=args.shape, spacing=args.spacing,
                                            misregistration_mm=args.misregistration)
    folders = phantom.write_phantom_dataset(args.out, cases=args.cases, seed=args.seed, config=config)
    for folder in folders:
        print(folder)
    return 0


# ---------------------------------------------------------------------------------------------
# translate / demo (the application layer)
# ---------------------------------------------------------------------------------------------


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


def _check_output(path: Path, flag: str) -> Path:
    """An output path must be a volume file name or an extension-less DICOM folder name."""
    from .cases import volume_stem
    from .io import FILE_EXTENSIONS

    if volume_stem(path) is None and path.suffix and not path.is_dir():
        raise CLIError(f"{flag} {path}: unsupported output extension {path.suffix!r}; use one of "
                       f"{', '.join(FILE_EXTENSIONS)} or a folder name (DICOM series)")
    return path


def _find_cases(root: Path, source: str, target: str, roi_names):
    """Cases under folder ``root``: case folders holding ``<source>.*`` (their ROI masks, body
    labels and reference ``<target>.*`` when present), else every volume file directly in
    ``root``. None when ``root`` is a single volume (a file, or a DICOM series folder)."""
    from .cases import CaseFiles, find_case_files, volume_stem

    if not root.exists():
        raise ValueError(f"{root}: file not found")
    if not root.is_dir():
        return None
    try:
        cases = find_case_files(root, source, target, roi_names)
    except ValueError:
        cases = []
    if cases:
        return cases
    files = sorted(p for p in root.iterdir() if p.is_file() and volume_stem(p))
    if files:
        return [CaseFiles.single(p, name=volume_stem(p) or p.name) for p in files]
    return None


def _run_case(files, options, cache):
    from . import app
    from .cases import read_case

    case = read_case(files)
    bar = _ProgressBar(files.name)
    try:
        return case, app.run_translation(app.TranslationRequest(case, options), cache=cache, progress=bar)
    finally:
        bar.close()


def _options(args: argparse.Namespace, device: str, outputs=None):
    """The application options of ``translate``; ``outputs``: the optional outputs to compute
    (None: all, as a folder of cases writes them all)."""
    from . import app

    slices = args.roi
    if args.slices is not None:
        try:
            slices = tuple(int(v) for v in args.slices.split(":"))
            if len(slices) != 2:
                raise ValueError
        except ValueError:
            raise CLIError(f"--slices must be FIRST:LAST (e.g. 10:40), got {args.slices!r}") from None
    return app.TranslationOptions(model=args.model, device=device, steps=args.steps, num_samples=args.num_samples,
                                  seed=args.seed, slices=slices, extent_margin=args.extent_margin,
                                  batch_size=args.batch_size, precision=args.precision,
                                  shared_noise=args.shared_noise, outputs=outputs, threads=args.threads,
                                  backend=args.backend, select=args.select)


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


def _print_confidence(result, indent: str = "") -> None:
    """One line (``maps.confidence_line``) when the method gives a per-slice confidence."""
    from .maps import confidence_line, confidence_summary

    line = confidence_line(confidence_summary(result.confidence))
    if line:
        print(f"{indent}{line}")


def _mask_flags(args: argparse.Namespace) -> dict[str, str]:
    """--liver / --tumor / --mask NAME=FILE -> {name: file}."""
    masks = {name: p for name, p in (("liver", args.liver), ("tumor", args.tumor)) if p is not None}
    for item in args.mask or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--mask must be NAME=FILE (e.g. lesion=lesion.nii.gz), got {item!r}")
        masks[name] = path
    return masks


def _cmd_translate(args: argparse.Namespace) -> int:
    """translate one volume (file or DICOM folder) or a folder of cases with a model bundle."""
    from . import app, runtime

    rank, world, _ = runtime.distributed_env()
    options = _options(args, runtime.local_device(args.device))
    single = {name for flag, name in (("difference", "difference"), ("uncertainty", "uncertainty"),
                                      ("metrics", "consistency")) if getattr(args, flag) is not None}
    cache = app.ModelCache()
    translator = cache.get(options)
    meta = translator.bundle.meta
    source = Path(args.input)
    if args.roi is not None and args.roi not in translator.roi_names:
        raise CLIError(f"--roi {args.roi}: the model's ROI masks are {', '.join(translator.roi_names)}")
    cases = _find_cases(source, meta.source.modality, meta.target.modality, translator.roi_names)
    if cases is None:  # compute only what this command writes
        return _translate_single(translator, cache, dataclasses.replace(options, outputs=frozenset(single)), args)
    per_case = [f for f in ("liver", "tumor", "mask", "reference", "difference", "uncertainty", "metrics")
                if getattr(args, f) is not None]
    if per_case:
        raise CLIError(f"--{per_case[0]} applies to a single input; {source} is a folder of {len(cases)} "
                       f"case(s): masks and references are read from each case folder and every output "
                       f"is written to --output/<case>/")
    from .cases import volume_stem

    out = Path(args.output)
    if volume_stem(out) is not None or (out.exists() and not out.is_dir()):
        raise CLIError(f"--output {out}: must be a folder when --input is a folder of cases")
    root, dest = source.resolve(), out.resolve()
    if dest == root or root in dest.parents or dest in root.parents:
        raise CLIError(f"--output {out}: must be outside --input {source} (and not contain it): case folders "
                       f"written there would replace or mix with the inputs")
    model = translator.bundle.path.resolve()
    if model == dest or dest in model.parents:
        raise CLIError(f"--output {out}: holds the model {translator.bundle.path}; choose another folder")
    mine = runtime.shard(cases, rank, world)
    print(f"{len(mine)} of {len(cases)} case(s) on rank {rank}/{world}, device {translator.device}")
    failed = 0
    for files in mine:
        try:
            case, outcome = _run_case(files, options, cache)
            app.write_case_folder(outcome, out / files.name, files, level=args.compression_level)
        except (ValueError, OSError, RuntimeError, KeyError, EOFError, MemoryError) as exc:
            if os.environ.get("MEDTRANSLATE_DEBUG"):
                raise
            failed += 1
            reason = "not enough memory" if isinstance(exc, MemoryError) else runtime.first_line(exc)
            print(f"{PROG}: error: {files.name}: {reason}", file=sys.stderr)
            continue
        result = outcome.result
        extra = ""
        if result.metrics and translator.roi_names and translator.roi_names[0] in result.metrics:
            roi = translator.roi_names[0]
            extra = f", {roi} MAE {result.metrics[roi]['mae']:.1f}"
        print(f"{files.name}: {out / files.name} ({result.info['slices']} slices, "
              f"{result.info['seconds']:.1f} s{extra})")
        _print_confidence(result, indent="  ")
    if failed:
        print(f"{PROG}: error: {failed} of {len(mine)} case(s) failed", file=sys.stderr)
        return 2
    return 0


def _translate_single(translator, cache, options, args: argparse.Namespace) -> int:
    from . import app
    from .cases import CaseFiles

    out = _check_output(Path(args.output), "--output")
    extra = {"difference": args.difference, "uncertainty": args.uncertainty}
    for name, path in extra.items():
        if path is not None:
            _check_output(Path(path), f"--{name}")
    targets = [Path(p).resolve() for p in (out, *(p for p in extra.values() if p), args.metrics) if p]
    if len(set(targets)) != len(targets):
        raise CLIError("--output, --difference, --uncertainty and --metrics must be different paths")
    files = CaseFiles.single(args.input, reference=args.reference, masks=_mask_flags(args))
    from .io import check_outputs_spare_inputs, files_read

    inputs = set().union(*(files_read(p) for p in (*files.inputs, translator.bundle.path)))
    named = {"--output": out, **{f"--{k}": v for k, v in extra.items() if v}}
    try:
        check_outputs_spare_inputs(named, inputs)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.metrics and Path(args.metrics).resolve() in inputs:
        raise CLIError(f"--metrics {args.metrics}: is an input; choose another output path")
    if args.reference is None and args.metrics is not None:
        raise CLIError("--metrics needs --reference (metrics compare the synthetic with a reference)")
    caps = translator.capabilities
    if args.uncertainty is not None and caps.uncertainty is None:
        raise CLIError(f"--uncertainty: the {translator.method.name} model defines no uncertainty map")
    if args.uncertainty is not None and caps.uncertainty_needs_samples and args.num_samples < 2:
        raise CLIError(f"--uncertainty: the {translator.method.name} model defines no uncertainty map from one "
                       f"sample (try --num-samples 8)")
    case, outcome = _run_case(files, options, cache)
    del case  # the source, reference and masks are not needed to write: free them first (peak RSS)
    result = outcome.result
    items: list[tuple[object, Path]] = [(result.synthetic, out)]
    if args.difference:
        items.append((result.difference, Path(args.difference)))
    if args.uncertainty:
        items.append((result.uncertainty, Path(args.uncertainty)))
    if args.metrics:
        items.append((app.metrics_document(outcome, files), Path(args.metrics)))
    written = app.write_outputs(items, translator.target_preset.DICOM_MODALITY, level=args.compression_level)
    info = result.info
    print(f"synthetic: {written[0]} ({info['slices']} slices in {info['seconds']:.1f} s on {info['device']}, "
          f"{info['precision']}, batch {info['batch_size']})")
    for path in written[1:]:
        print(f"wrote:     {path}")
    _print_confidence(result)
    _print_metrics(result)
    return 0


def _demo_models(names: list[str] | None) -> list[Path]:
    from . import app, model_store

    if names:
        return [model_store.find_model(n) for n in names]
    found = app.bundled_models()
    if not found:
        raise CLIError(f"no demo model bundles in {model_store.bundled_models_dir()}; give one with --model")
    return found


def _demo_figure(path: Path, outcome, case, seed: int) -> Path:
    import numpy as np

    from . import maps
    from .intensity import preset_from_config
    from .regions import BODY

    translator, result, source = outcome.translator, outcome.result, case.source
    meta = translator.bundle.meta
    # the smallest ROI first (the tumour before the liver)
    centre = maps.focus_index(*(case.masks.get(r) for r in reversed(translator.roi_names)), shape=source.shape)
    body = case.mask(BODY)  # heatmaps inside the body only

    def in_body(vol):
        return None if vol is None else np.where(body, vol.array, np.nan)

    columns = {"source": source.array, "synthetic": result.synthetic.array,
               "reference": None if case.reference is None else case.reference.array,
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
    src_lo, src_hi = preset_from_config(result.info["source_preset"]).physical_range
    lo, hi = preset_from_config(result.info["target_preset"]).physical_range
    units = translator.target_preset.UNITS
    title = (f"{outcome.model_name}: {meta.source.modality} \u2192 {meta.target.modality} "
             f"({meta.method}), phantom seed {seed}")
    return maps.comparison_figure(path, rows, title=title, window=(lo, hi), units=units,
                                  source_window=(src_lo, src_hi), uncertainty_label=f"std ({units})",
                                  confidence=result.confidence)


def _cmd_demo(args: argparse.Namespace) -> int:
    """The offline demo: a phantom case through every bundled demo model, with the identity
    baseline's metrics next to each model's."""
    import time

    from . import app, phantom
    from .bundle import read_bundle_meta

    t0 = time.perf_counter()
    out = Path(args.out)
    models = _demo_models(args.model)
    seed = phantom.case_seed(args.seed, 0)
    ph = phantom.generate_case(seed, phantom.PhantomConfig.from_cli(shape=args.shape))
    case_dir = phantom.write_case(ph, out / "phantom")
    report: dict = {"case": {"folder": str(case_dir), "seed": seed, "dataset_seed": args.seed,
                             "tumors": len(ph.info.get("tumors", []))}, "models": {}}
    print(f"phantom case: {case_dir}")
    cache = app.ModelCache()
    for path in models:
        meta = read_bundle_meta(path)
        name = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
        if meta.source.modality not in ph.images:
            print(f"{name}: skipped (the phantom has no {meta.source.modality!r} image)")
            continue
        case = app.phantom_case(ph, meta.source.modality, meta.target.modality)
        choice = app.model_choice(_model_info(path, meta))
        steps, samples, note = _demo_sampling(choice, meta, args)
        options = app.TranslationOptions(model=str(path), device=args.device, seed=args.seed, steps=steps,
                                         num_samples=samples)
        bar = _ProgressBar(name)
        try:
            outcome = app.run_translation(app.TranslationRequest(case, options), cache=cache, progress=bar)
        finally:
            bar.close()
        result, folder = outcome.result, out / name
        names = app.output_files(outcome, synthetic_name="synthetic.nii.gz")
        files = app.write_outputs([(getattr(result, key), folder / f"{key}.nii.gz") for key in names],
                                  outcome.translator.target_preset.DICOM_MODALITY)
        figure = _demo_figure(folder / "figure.png", outcome, case, seed)
        report["models"][name] = {**app.metrics_document(outcome), "warnings": choice.warnings,
                                  "sampling": {"steps": steps, "samples": samples},
                                  "outputs": [str(p) for p in files], "figure": str(figure)}
        print(f"{name} ({meta.method}, {meta.source.modality} -> {meta.target.modality}): "
              f"{result.info['slices']} slices in {result.info['seconds']:.1f} s{note}")
        for warning in report["models"][name]["warnings"]:
            print(f"  warning: {warning}")
        print(f"  outputs: {folder}/ ({', '.join(p.name for p in files)})")
        print(f"  figure:  {figure}")
        _print_confidence(result, indent="  ")
        _print_metrics(result, indent="    ")
    report["seconds"] = time.perf_counter() - t0
    metrics_path = app.write_json(report, out / "metrics.json")
    print(f"metrics: {metrics_path}")
    print(f"done in {report['seconds']:.1f} s")
    return 0


def _demo_sampling(choice, meta, args: argparse.Namespace) -> tuple[int | None, int, str]:
    """The demo's sampling steps and samples for one model, and how the output line says so:
    ``--steps`` for methods whose steps can be chosen (fewer than their default, to keep the demo
    short on a CPU); ``--samples``, by default 1, or ``DEMO_SCORED_SAMPLES`` for methods that score
    their samples (the confidence picks the best one)."""
    caps = choice.capabilities
    steps = args.steps if caps.get("steps") else None
    samples = 1
    if caps.get("stochastic"):
        samples = args.samples if args.samples is not None else (DEMO_SCORED_SAMPLES if caps.get("confidence") else 1)
    parts = []
    default = meta.architecture.get("steps")
    if steps is not None:
        parts.append(f"{steps} sampling steps" + (f"; the model's default is {default}" if default else ""))
    if samples > 1:
        parts.append(f"{'best' if caps.get('confidence') else 'mean'} of {samples} samples")
    return steps, samples, f" ({', '.join(parts)})" if parts else ""


def _model_info(path: Path, meta):
    from .model_store import ModelInfo

    return ModelInfo(path.name, path, "bundled", meta=meta)


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


def _threads(text: str) -> int | str:
    return "auto" if text == "auto" else _bounded_int(1, 4096)(text)


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
    parser = _Parser(prog=prog, description="Medical image translation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write paired abdominal phantom cases (all modalities + masks)")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per case)")
    p.add_argument("--cases", type=_bounded_int(1, 100000), default=1)
    p.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=0)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="volume size in voxels (default 64 128 128)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                   help="voxel spacing in mm, x y z (default 2.5 2.5 2.5)")
    p.add_argument("--misregistration", type=float, default=None,
                   help="max rigid shift in mm between source and target modalities (default 0)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("demo", help="offline demo: a phantom case through the bundled demo models")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=4,
                   help="phantom dataset seed; its case 0 is used (default 4: 3 liver tumors; the demo model "
                        "was trained on dataset seed 7)")
    p.add_argument("--model", action="append", default=None,
                   help="model name or bundle path (repeatable; default: every bundled demo model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="phantom size in voxels (default 64 128 128; smaller is faster)")
    p.add_argument("--steps", type=_bounded_int(1, 10000), default=DEMO_STEPS,
                   help=f"sampling steps of the models whose steps can be chosen (default {DEMO_STEPS}, "
                        "fewer than their own default, to keep the demo short on a CPU)")
    p.add_argument("--samples", type=_bounded_int(1, 1024), default=None,
                   help=f"samples per slice of the stochastic models (default 1; {DEMO_SCORED_SAMPLES} for models "
                        "that score their samples and keep the best)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("translate", help="translate a volume, or a folder of cases, with a model bundle")
    p.add_argument("--model", required=True, help="bundle folder/.zip or model name (see: models list)")
    p.add_argument("--input", required=True, help="source volume file, DICOM series folder, or folder of cases")
    p.add_argument("--output", required=True,
                   help="synthetic volume file (folder without extension: DICOM series); a folder for cases")
    p.add_argument("--liver", default=None, help="liver mask (resampled onto the source grid if needed)")
    p.add_argument("--tumor", default=None, help="tumor mask")
    p.add_argument("--mask", action="append", default=None, metavar="NAME=FILE",
                   help="an ROI mask by the model's ROI name (repeatable; see: models show)")
    p.add_argument("--reference", default=None, help="real target volume: metrics and reference difference")
    p.add_argument("--difference", default=None, help="write synthetic - source (target units) here")
    p.add_argument("--uncertainty", default=None, help="write the uncertainty map here (methods that have one)")
    p.add_argument("--metrics", default=None, help="write metrics JSON here (needs --reference)")
    p.add_argument("--steps", type=_bounded_int(1, 100000), default=None, help="sampling steps (diffusion methods)")
    p.add_argument("--num-samples", type=_bounded_int(1, 1024), default=1, help="samples per slice (uncertainty)")
    p.add_argument("--select", default="per_slice", metavar="|".join(SELECT_MODES),
                   help="with --num-samples > 1 and a method that scores its samples: per_slice (the "
                        "method's choice per slice, default) or per_volume (one sample for the whole volume: no "
                        "flicker along z; keeps the samples of the translated slices in memory)")
    p.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=0, help="random seed (same seed, same output)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--batch-size", type=_batch_size, default="auto", help="slices per batch, or auto")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--slices", default=None, metavar="FIRST:LAST", help="translate only these slices")
    g.add_argument("--roi", default=None, metavar="NAME",
                   help="translate only the slices holding this ROI mask (+- --extent-margin)")
    p.add_argument("--extent-margin", "--roi-margin", dest="extent_margin", type=_bounded_int(0, 100000), default=4,
                   help="slices kept on each side of the --roi mask's extent (not the training's data.roi_margin)")
    p.add_argument("--shared-noise", action="store_true", help="same noise for every slice (diffusion methods)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for the network: N, or auto (every core; on a busy machine 1 can be "
                        "several times faster)")
    p.add_argument("--backend", choices=("pytorch", "auto"), default="auto",
                   help="auto (default): on CPU, run the network through ONNX Runtime when it is installed "
                        "(pip install onnxruntime onnx) and matches PyTorch on the first batch; pytorch: never")
    p.add_argument("--compression-level", type=_bounded_int(1, 9), default=None,
                   help="zlib level of .nrrd/.mha outputs: 1 fastest .. 9 smallest (.nii.gz has ITK's own level; "
                        "write .nii for the fastest, uncompressed output)")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("evaluate", help="evaluate a bundle on held-out cases: metrics table + figures")
    p.add_argument("--bundle", required=True, type=Path, help="model bundle (folder or .zip)")
    p.add_argument("--data", required=True, type=Path, help="folder of case folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="the bundle's own case split (ratios and seed are in the bundle), or all")
    p.add_argument("--steps", type=_bounded_int(1, 100000), default=None, help="sampling steps (diffusion methods)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="slices per forward pass (auto: from free GPU memory, 8 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=0, help="random seed (stochastic methods)")
    p.add_argument("--num-samples", type=_bounded_int(1, 1024), default=1,
                   help="samples per slice, averaged (stochastic methods)")
    p.add_argument("--max-cases", type=_bounded_int(1), default=None, help="evaluate at most this many cases")
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
    q.add_argument("--force", action="store_true",
                   help="replace an existing model of that name, or shadow a bundled one")
    p.set_defaults(func=_cmd_models)
    return parser


class _Terminated(BaseException):
    """SIGTERM as an exception, so that every ``finally`` (temporary outputs) runs."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    import signal

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if argv is None:  # the process's own command line: one command, then the process ends
        short_lived_process()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread): keep the default
        previous = None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{prog}: terminated; nothing was written", file=sys.stderr)
        return 143
    except MemoryError:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        print(f"{prog}: error: not enough memory for this input (try --slices or a smaller --batch-size)",
              file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, RuntimeError, EOFError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
