#!/usr/bin/env python
"""End-to-end cost of ``medtranslate translate``: where the wall time and the host memory go.

    python benchmarks/benchmark_translate.py [--sizes 128x128x64 512x512x300] [--models pix2pix_ct_cta_demo]
        [--threads 1] [--repeat 1] [--reference] [--warm N] [--json out.json]

For each volume size (x*y*z; an int16 CT phantom resampled from a 64x128x128 case, written as
.nii.gz as scanners' exports are) and each model, a fresh Python process runs the stages of the
CLI's ``translate`` one after the other, as the CLI does (its process set up as the program sets
up its own: ``runtime.short_lived_process``), and reports per stage:

- seconds, and the network's share (the engine's batch loop, ``info["loop_seconds"]``);
- peak RSS during the stage (VmHWM, reset through /proc/self/clear_refs before each stage) and
  its ratio to the float32 volume.

Stages: import (cli, app), model (torch and the bundle; before the volume, so that the last column,
the highest peak RSS above the process with torch and the model loaded, is what the volume costs),
read (source, and the reference with ``--reference``), translate (``app.run_translation``; with ``--reference`` the metrics too), write (the
synthetic volume, uncompressed .nii). A fresh process per run, so imports are counted. ``--warm N``:
other processes, set up as long-lived ones, read, translate and write the volume N more times
after their first run, with torch and the model already loaded as in the Slicer module and the
web app, and a second table gives the median run's stages and the share of network + read + write. Prints Markdown tables; no assertion on time anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()

def reset():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass

def peak():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0

stages = {}
def stage(name, t):
    stages[name] = {"seconds": time.perf_counter() - t, "peak_rss": peak()}
    reset()
    return time.perf_counter()

def current():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

reset()
from pathlib import Path
from MedTranslateLib import app, cli
from MedTranslateLib.cases import CaseFiles, read_case
source, reference, model, out, threads, warm, one_shot = sys.argv[1:8]
if one_shot == "1":  # as the ``medtranslate`` program sets up its process (a library from before: nothing)
    try:
        from MedTranslateLib.runtime import short_lived_process
    except ImportError:
        pass
    else:
        short_lived_process()
t = stage("import", t0)
import torch
torch.set_num_threads(int(threads))
try:  # only the synthetic volume (and the metrics), as a plain ``translate`` computes
    opts = app.TranslationOptions(model=model, device="cpu", seed=0, outputs=frozenset())
except TypeError:  # a library from before ``outputs`` (the "before" column): everything
    opts = app.TranslationOptions(model=model, device="cpu", seed=0)
cache = app.ModelCache()
cache.get(opts)
t = stage("model", t)
baseline = current()  # the process with torch and the model, before any volume
files = CaseFiles.single(source, reference=reference or None)
case = read_case(files)
t = stage("read", t)
outcome = app.run_translation(app.TranslationRequest(case, opts), cache=cache)
network = outcome.result.info["loop_seconds"]
t = stage("translate", t)
shape = list(case.source.shape)
del case  # as ``medtranslate translate`` does before it writes
app.write_outputs([(outcome.result.synthetic, Path(out))], "CT")
t = stage("write", t)
result = {"stages": stages, "network": network, "wall": time.perf_counter() - t0, "baseline_rss": baseline,
          "shape": shape}
del outcome
warm_runs = []
for _ in range(int(warm)):  # the same again in this process, as the Slicer module and the web app run it
    stages = {}
    t = t1 = time.perf_counter()
    case = read_case(files)
    t = stage("read", t)
    outcome = app.run_translation(app.TranslationRequest(case, opts), cache=cache)
    outcome_loop = outcome.result.info["loop_seconds"]
    t = stage("translate", t)
    del case
    app.write_outputs([(outcome.result.synthetic, Path(out))], "CT")
    del outcome
    t = stage("write", t)
    warm_runs.append({"stages": stages, "network": outcome_loop, "wall": t - t1})
if warm_runs:  # the median run by wall time
    result["warm"] = sorted(warm_runs, key=lambda r: r["wall"])[len(warm_runs) // 2]
print("RESULT " + json.dumps(result))
"""


def make_volume(size: tuple[int, int, int], folder: Path) -> tuple[Path, Path]:
    """An int16 CT phantom of ``size`` (x, y, z) and its arterial CTA, as .nii.gz: a 64x128x128
    case at 2.5 mm resampled (linear) onto a 320 x 320 x 160 mm field of view."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from MedTranslateLib import phantom

    case = phantom.generate_case(0, phantom.PhantomConfig(shape=(64, 128, 128), spacing=(2.5, 2.5, 2.5)))
    x, y, z = size
    paths = []
    for key in ("ct", "cta_arterial"):
        small = case.images[key].array
        big = ndimage.zoom(small, (z / small.shape[0], y / small.shape[1], x / small.shape[2]), order=1)
        image = sitk.GetImageFromArray(np.rint(big).astype(np.int16))
        image.SetSpacing((320.0 / x, 320.0 / y, 160.0 / z))
        path = folder / f"{key}_{x}x{y}x{z}.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        paths.append(path)
    return paths[0], paths[1]


def run(source: Path, reference: Path | None, model: str, threads: int, out: Path, library: Path = ROOT,
        warm: int = 0) -> dict:
    """One fresh process. Without ``warm`` it is set up as the ``medtranslate`` program sets up its
    own (``runtime.short_lived_process``); with it, as a long-lived process (the Slicer module,
    the web app), and its first run is a cold one of such a process."""
    env = dict(os.environ, PYTHONPATH=str(library), OMP_NUM_THREADS=str(threads))
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    os.sync()  # the previous run's output written back first: its writeback would throttle this run's write
    # run in the library's folder: ``python -c`` puts the working folder first on sys.path
    proc = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(source), str(reference or ""), model, str(out),
                           str(threads), str(warm), "0" if warm else "1"], capture_output=True, text=True, env=env,
                          cwd=str(library))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def _models(names: list[str]) -> list[str]:
    """``ct`` stands for every bundled model whose source is CT (the benchmark's volume is CT)."""
    if names != ["ct"]:
        return names
    from MedTranslateLib import model_store

    return [m.name for m in model_store.list_models() if m.origin == "bundled" and m.source.lower() == "ct"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["128x128x64", "512x512x300", "512x512x600"])
    parser.add_argument("--models", nargs="+", default=["pix2pix_ct_cta_demo"],
                        help="bundled model names, or 'ct' for every bundled model with a CT source")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (the median wall is reported)")
    parser.add_argument("--reference", action="store_true", help="read a reference and compute the metrics")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--warm", type=int, default=0, metavar="N",
                        help="then read, translate and write N more times in the same process (torch and the "
                             "model loaded, as in the Slicer module and the web app) and print the median run")
    parser.add_argument("--library", type=Path, default=ROOT,
                        help="the checkout whose MedTranslateLib runs (e.g. a worktree of an older commit)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory(prefix="medtranslate-bench-") as tmp:
        folder = Path(tmp)
        for text in args.sizes:
            size = tuple(int(v) for v in text.split("x"))
            source, reference = make_volume(size, folder)
            volume_bytes = 4 * size[0] * size[1] * size[2]
            for model in _models(args.models):
                ref = reference if args.reference else None
                runs = sorted((run(source, ref, model, args.threads, folder / "out.nii", args.library)
                               for _ in range(args.repeat)), key=lambda r: r["wall"])
                result = runs[len(runs) // 2]
                if args.warm:  # in other processes: set up as long-lived ones
                    warm = sorted((run(source, ref, model, args.threads, folder / "out.nii", args.library, args.warm)
                                   for _ in range(args.repeat)), key=lambda r: r["warm"]["wall"])
                    result["warm"] = warm[len(warm) // 2]["warm"]
                rows.append({"size": text, "model": model, "volume_mb": volume_bytes / 2**20, **result})
    print(f"library: {args.library}, threads: {args.threads}, reference + metrics: {args.reference}, "
          f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}\n")
    stages = ("import", "model", "read", "translate", "write")
    print("| size | model | wall s | network s (share) | " + " | ".join(
        f"{s} s / peak RSS (x vol)" for s in stages) + " | max peak above model (x vol) |")
    print("|---" * 10 + "|")
    for r in rows:
        vol = r["volume_mb"] * 2**20
        cells = [f"{r['stages'][s]['seconds']:.2f} / {r['stages'][s]['peak_rss'] / 2**20:.0f} MB "
                 f"({r['stages'][s]['peak_rss'] / vol:.1f}x)" for s in stages]
        above = max(r["stages"][s]["peak_rss"] for s in stages) - r.get("baseline_rss", 0)
        print(f"| {r['size']} | {r['model']} | {r['wall']:.2f} | {r['network']:.2f} ({r['network'] / r['wall']:.0%}) | "
              + " | ".join(cells) + f" | {above / 2**20:.0f} MB ({above / vol:.1f}x) |")
    if args.warm:
        print(f"\nwarm: the median of {args.warm} more runs in the same process (read, translate, write); network + read + write "
              "is the share of the work a loaded model cannot avoid\n")
        print("| size | model | wall s | network s | read s | translate s | write s | network + read + write |")
        print("|---" * 8 + "|")
        for r in rows:
            w = r["warm"]
            sec = {s: w["stages"][s]["seconds"] for s in ("read", "translate", "write")}
            needed = w["network"] + sec["read"] + sec["write"]
            print(f"| {r['size']} | {r['model']} | {w['wall']:.2f} | {w['network']:.2f} | {sec['read']:.2f} | "
                  f"{sec['translate']:.2f} | {sec['write']:.2f} | {needed / w['wall']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
