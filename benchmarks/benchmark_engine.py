#!/usr/bin/env python
"""Speed of the volume engine: slices/s and peak memory per method and slice size.

    python benchmarks/benchmark_engine.py [--methods pix2pix bbdm resshift] [--sizes 128 256]
        [--steps 10 50 200] [--device cpu] [--slices 16] [--arch default|demo|CONFIG.yaml]
        [--batch-size auto] [--json out.json] [--no-consistency]

For every method, size and (for diffusion methods) number of sampling steps, in the same process
and on the same volume:

- engine: ``VolumeTranslator`` (batched, automatic batch size, mixed precision on GPU), timed
  over the batch loop (crop/resize, network, inverse resize and intensity mapping included);
- reference: a plain loop, one slice at a time, fp32, ``torch.no_grad``, no batching, no
  crop/resize: the lower bound a naive script would reach;
- peak host memory (VmHWM, reset through /proc/self/clear_refs before each run when the kernel
  allows it; psutil is not needed) and peak GPU memory (``torch.cuda.max_memory_allocated``);
- the network's FLOPs per slice (``torch.utils.flop_counter.FlopCounterMode``) and the achieved
  GFLOP/s, next to a measured matrix-multiply rate of the device (the practical ceiling for
  convolution-heavy networks), so the distance to the hardware's limit is visible.

With a bundled demo model of a method (Resources/Models), it also reports the inter-slice
consistency (``maps.consistency_report``: mean |slice k+1 - slice k| in the body, synthetic vs
reference) on the demo's phantom case. Networks are random-initialised with the method's default
architecture (``--arch default``; paper size for the diffusion methods), the demo bundle's
(``--arch demo``) or the ``model`` section of a training config (``--arch
training/configs/demo/bbdm.yaml``): speed does not depend on the weights. ``--steps`` lists
sampling-step counts for the diffusion methods (their default when omitted); ResShift always
runs its T trained steps. Prints a Markdown table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from MedTranslateLib import engine, model_store  # noqa: E402
from MedTranslateLib.bundle import Bundle, BundleMeta, ModalitySpec, SliceSpec, is_bundle, load_bundle  # noqa: E402
from MedTranslateLib.intensity import preset_from_config  # noqa: E402
from MedTranslateLib.io import Volume  # noqa: E402
from MedTranslateLib.methods import available_methods, build_method, get_method_class  # noqa: E402

SOURCE_PRESET, TARGET_PRESET = "ct_abdomen", "ct_angio"


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size (MiB) since the last reset (or process start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak host RSS and GPU memory of the block (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = self.gpu = float("nan")
        self.reset_ok = False

    def __enter__(self) -> PeakMemory:
        self.reset_ok = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.host = peak_rss_mib()


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def body_volume(n: int, size: int, seed: int = 0) -> Volume:
    """(n, size, size) CT-like volume: an elliptic body (soft tissue with texture, a bright
    'aorta', a 'spine') filling most of the slice, air around; 2.5 mm voxels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    body = ((y - 0.5) / 0.42) ** 2 + ((x - 0.5) / 0.47) ** 2 < 1
    tissue = 40 + 30 * np.sin(12 * x) * np.cos(9 * y)
    tissue[((y - 0.55) / 0.05) ** 2 + ((x - 0.5) / 0.05) ** 2 < 1] = 45
    tissue[((y - 0.75) / 0.07) ** 2 + ((x - 0.5) / 0.06) ** 2 < 1] = 400
    arr = np.where(body, tissue, -1000).astype(np.float32)[None].repeat(n, 0)
    arr += rng.normal(0, 12, arr.shape).astype(np.float32)
    return Volume(arr, spacing=(2.5, 2.5, 2.5), source=f"benchmark {n}x{size}x{size}")


def make_bundle(name: str, size: int, arch: str) -> Bundle:
    """A random-initialised method (default architecture, or the demo bundle's) as a Bundle."""
    config = None
    if arch.endswith((".yaml", ".yml")):
        from MedTranslateLib.training import load_train_config

        train_cfg = load_train_config(arch, ["data.root=unused"])
        if train_cfg.method != name:
            raise SystemExit(f"--arch {arch}: a {train_cfg.method} config, not {name}")
        config = train_cfg.model
    elif arch == "demo":
        demo = demo_bundle_path(name)
        if demo is None:
            raise SystemExit(f"--arch demo: no bundled demo model for {name}")
        config = load_bundle(demo).meta.architecture
    torch.manual_seed(0)
    method = build_method(name, config).eval()
    meta = BundleMeta(method=name, source=ModalitySpec("ct", SOURCE_PRESET),
                      target=ModalitySpec("cta_arterial", TARGET_PRESET), slice=SliceSpec(size=size, axis=0))
    return Bundle(method=method, meta=meta, path=Path(f"<random {name} {arch}>"))


def demo_bundle_path(name: str) -> Path | None:
    folder = model_store.bundled_models_dir()
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if is_bundle(path) and load_bundle(path).meta.method == name:
            return path
    return None


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def flops_per_slice(method, size: int, device: torch.device, steps: int | None) -> float:
    x = torch.zeros(1, method.in_channels, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        method.translate(x, steps=steps, generator=torch.Generator(device=device).manual_seed(0))
    return float(counter.get_total_flops())


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured dense matrix-multiply rate (GFLOP/s): a practical ceiling for the device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def reference_loop(method, vol: Volume, device: torch.device, steps: int | None) -> float:
    """Seconds for the plain loop: one slice at a time, fp32, no batching, no crop/resize."""
    norm = np.asarray(preset_from_config(SOURCE_PRESET).forward(vol.array), dtype=np.float32)
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(norm.shape[0]):
            x = torch.from_numpy(norm[k]).to(device)[None, None]
            y = method.translate(x, steps=steps, generator=g).image
            y.cpu()
    return time.perf_counter() - t0


def run_one(name: str, size: int, steps: int | None, args: argparse.Namespace, device: torch.device) -> dict:
    bundle = make_bundle(name, size, args.arch)
    method = bundle.method.to(device)
    vol = body_volume(args.slices, size)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    translator = engine.VolumeTranslator(bundle, device=str(device), precision=args.precision, batch_size=batch)
    translator.translate(vol, slice_range=(0, min(2, args.slices)), seed=0)  # warm-up
    with PeakMemory(device) as mem_engine:
        result = translator.translate(vol, seed=0, steps=steps)
    engine_sps = args.slices / result.info["loop_seconds"]

    method.to(memory_format=torch.contiguous_format)
    reference_loop(method, body_volume(1, size), device, steps)  # warm-up
    with PeakMemory(device) as mem_ref:
        ref_seconds = reference_loop(method, vol, device, steps)
    ref_sps = args.slices / ref_seconds
    flops = flops_per_slice(method, size, device, steps)
    return {
        "method": name, "size": size, "steps": steps, "slices": args.slices, "device": str(device),
        "precision": result.info["precision"], "batch_size": result.info["batch_size"],
        "params": sum(p.numel() for p in method.parameters()),
        "engine_slices_per_s": engine_sps, "engine_total_seconds": result.info["seconds"],
        "reference_slices_per_s": ref_sps, "speedup": engine_sps / ref_sps,
        "gflop_per_slice": flops / 1e9, "engine_gflops": flops * engine_sps / 1e9,
        "reference_gflops": flops * ref_sps / 1e9,
        "engine_peak_rss_mib": mem_engine.host, "reference_peak_rss_mib": mem_ref.host,
        "rss_reset": mem_engine.reset_ok,
        "engine_peak_gpu_mib": mem_engine.gpu, "reference_peak_gpu_mib": mem_ref.gpu,
    }


def consistency(name: str, device: torch.device, seed: int = 0) -> dict | None:
    """Inter-slice consistency of the method's bundled demo model on the demo's phantom case."""
    path = demo_bundle_path(name)
    if path is None:
        return None
    from MedTranslateLib import phantom

    case = phantom.generate_case(phantom.case_seed(seed, 0))
    translator = engine.VolumeTranslator(load_bundle(path), device=str(device))
    meta = translator.bundle.meta
    masks = {"body": case.masks["labels"], "liver": case.masks["liver"]}
    out = {"model": path.name}
    modes = [False, True] if translator.method.stochastic else [False]
    for shared in modes:
        translator.shared_noise = shared
        res = translator.translate(case.images[meta.source.modality], masks=masks,
                                   reference=case.images[meta.target.modality], seed=0)
        out["shared_noise" if shared else "independent_noise"] = res.consistency
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def markdown(rows: list[dict], peak: float, peak_label: str, consistency_rows: list[dict]) -> str:
    gpu = any(np.isfinite(r["engine_peak_gpu_mib"]) for r in rows)
    head = ["method", "size", "steps", "batch", "precision", "engine slices/s", "reference slices/s", "speed-up",
            "GFLOP/slice", "engine GFLOP/s", f"% of {peak_label}", "peak RSS MiB (engine / ref)"]
    if gpu:
        head.append("peak GPU MiB (engine / ref)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["size"]), "-" if r["steps"] is None else str(r["steps"]), str(r["batch_size"]), r["precision"],
                 f"{r['engine_slices_per_s']:.2f}", f"{r['reference_slices_per_s']:.2f}", f"{r['speedup']:.2f}x",
                 f"{r['gflop_per_slice']:.3f}", f"{r['engine_gflops']:.1f}",
                 f"{100 * r['engine_gflops'] / peak:.0f} %",
                 f"{r['engine_peak_rss_mib']:.0f} / {r['reference_peak_rss_mib']:.0f}"]
        if gpu:
            cells.append(f"{r['engine_peak_gpu_mib']:.0f} / {r['reference_peak_gpu_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    for c in consistency_rows:
        for mode, rep in c.items():
            if mode in ("method", "model"):
                continue
            lines.append(f"\nInter-slice consistency, {c['method']} ({c['model']}, {mode.replace('_', ' ')}): "
                         f"synthetic {rep['synthetic']:.1f} vs reference {rep['reference']:.1f} "
                         f"(ratio {rep['ratio']:.2f}; 1 = as smooth across slices as the real scan)")
    return "\n".join(lines)


def runs_of(name: str, args: argparse.Namespace) -> list[tuple[int, int | None]]:
    """(size, steps) pairs to measure: step counts only for methods that sample (ResShift
    always runs its T trained steps)."""
    steps: list[int | None] = [None]
    if get_method_class(name).stochastic and name != "resshift" and args.steps:
        steps = list(args.steps)
    return [(size, s) for size in args.sizes for s in steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pix2pix"], choices=available_methods())
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--slices", type=int, default=16, help="slices per volume")
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="sampling-step counts to compare (diffusion methods; default: the method's)")
    parser.add_argument("--arch", default="default",
                        help="network size: 'default' (the method's config), 'demo' (its demo bundle's) or a "
                             "training config YAML whose model section is used")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-consistency", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.resolve_device(args.device)
    peak_dtype = engine.resolve_precision(args.precision, device) or torch.float32
    peak = matmul_gflops(device, peak_dtype, n=4096 if device.type == "cuda" else 1024)
    peak_label = f"{str(peak_dtype).replace('torch.', '')} GEMM"
    rows = []
    for name in args.methods:
        for size, steps in runs_of(name, args):
            row = run_one(name, size, steps, args, device)
            rows.append(row)
            print(f"# {name} {size} steps {steps}: engine {row['engine_slices_per_s']:.2f} slices/s, "
                  f"reference {row['reference_slices_per_s']:.2f} slices/s", file=sys.stderr)
    cons = []
    if not args.no_consistency:
        for name in args.methods:
            c = consistency(name, device)
            if c is not None:
                cons.append({"method": name, **c})
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           f"{peak_label} GFLOP/s": peak, "arch": args.arch}
    print(f"Device: {env['gpu'] or env['cpu']} ({device}, {env['threads']} threads), torch {torch.__version__}; "
          f"measured {peak_label}: {peak:.1f} GFLOP/s; networks: {args.arch} architecture, "
          f"{args.slices} slices per volume.\n")
    print(markdown(rows, peak, peak_label, cons))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": rows, "consistency": cons}, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
