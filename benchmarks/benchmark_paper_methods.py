#!/usr/bin/env python
"""Speed of the paper methods against their baselines: slices/s of ``translate``.

    python benchmarks/benchmark_paper_methods.py --method c2fmit|rlbcd|dfbk [--size demo|paper]
        [--steps 10 50 200] [--batch-size 4] [--threads 1] [--device cpu|cuda] [--repeats 2]
        [--samples 1 2 4 8] [--samples-steps 10] [--no-matched] [--resolutions 64 256]

Common to every method: weights are random (speed does not depend on them), and the parts that
start as an identity (gates, zero-initialised output projections) are opened so that every module
does its full work and nothing could be short-cut; eval mode, ``torch.no_grad`` (inside
``translate``), fp32, one generator per slice (the engine's way); the source is a random batch in
[-1, 1]. Per method one warm-up ``translate`` (3 steps, or the method's fixed T), then per row
``--repeats`` timed calls of each model, interleaved so that all see the same load on shared
cores; the best of each is kept. A ``translate`` includes encoding and decoding (latent methods)
and everything the method does once per call. Prints Markdown tables after a header line (size,
batch, device, threads, parameter counts). No timing is asserted.

``--method c2fmit`` (the cost of the DGB and the C2FGAM modules): c2fmit vs bbdm of the same size
at ``--steps`` sampling steps. ``demo``: ``training/configs/demo/c2fmit.yaml`` at 128x128 in the
latent of ``training/configs/demo/autoencoder_f4.yaml`` (3 x 32 x 32); ``paper``:
``training/configs/c2fmit.yaml`` at 256x256 in the latent of ``training/configs/autoencoder_f8.yaml``
(4 x 32 x 32; GPU). bbdm is the same model section without c2fmit's keys (``dgb``, ``prb``,
``fusion``, ``fusion_mode``, ``c2fgam``): the same bridge U-Net, autoencoder, steps and batch (for
the demo it is ``demo/bbdm_latent.yaml``'s network). The C2FGAM gates are set to 0.1.

``--method rlbcd`` (co-diffusion: two U-Nets per step, SAM, CMA, H_E): rlbcd vs bbdm with the
same U-Net (one U-Net per step) and vs bbdm with about rlbcd's parameter count (``model_channels``
found by counting parameters on the meta device, ``norm_groups`` 8: at paper size 184, the control
in ``training/configs/rlbcd.yaml``; ``--no-matched`` leaves that column out), at ``--steps``; then
the cost of N samples (``--samples``, at ``--samples-steps``): rlbcd's ``translate(num_samples=N)``
with ``select: lcs`` (H_E scores every sample). ``demo``: ``training/configs/demo/rlbcd.yaml`` at
128x128 in the latent of ``demo/autoencoder_f4.yaml`` with ``domains: [source, target, residual]``;
``paper``: ``training/configs/rlbcd.yaml`` at 256x256 in the latent of ``autoencoder_f8.yaml``
(GPU). bbdm is the model section without rlbcd's keys (``branches``, ``residual_space``, ``sam``,
``cma``, ``lcs``, ``select``). CMA's zero-initialised output projections get N(0, 0.01²) weights.

``--method dfbk`` (DFB and KG): dfbk vs resshift on the same Swin U-Net (dfbk with ``dfb`` and
``kg`` off is resshift bit for bit) vs resshift with ``unet.attention: global``, each a full
``translate`` of T = 4 steps (``--steps`` is not used), at ``--resolutions`` (square slices; demo
default 64 256, paper default 224: the paper's window 14 needs sides that are multiples of 224, a
resolution that does not fit a model gets an n/a cell). ``kg.text: random`` (no embedding file).
The zero-initialised DFB and KG projections get N(0, 0.01²) weights. ``demo``:
``training/configs/demo/dfbk.yaml``; ``paper``: ``training/configs/dfbk.yaml`` (GPU; its global
attention at every level is out of reach of a CPU at 224x224).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from MedTranslateLib.methods import build_method  # noqa: E402

CONFIGS = {
    "c2fmit": {"demo": ("demo/c2fmit.yaml", "demo/autoencoder_f4.yaml"), "paper": ("c2fmit.yaml", "autoencoder_f8.yaml")},
    "rlbcd": {"demo": ("demo/rlbcd.yaml", "demo/autoencoder_f4.yaml"), "paper": ("rlbcd.yaml", "autoencoder_f8.yaml")},
    "dfbk": {"demo": ("demo/dfbk.yaml", None), "paper": ("dfbk.yaml", None)},
}
C2FMIT_ONLY = ("dgb", "prb", "fusion", "fusion_mode", "c2fgam")
RLBCD_ONLY = ("branches", "residual_space", "sam", "cma", "lcs", "select")
DFBK_ONLY = ("dfb", "kg")
RESOLUTIONS = {"demo": [64, 256], "paper": [224]}


# ---- shared ----------------------------------------------------------------------------------------

def load_config(method: str, size: str) -> tuple[dict, dict | None]:
    """(method config, autoencoder config or None) as loaded from the YAML files."""
    path, ae_path = CONFIGS[method][size]
    read = lambda p: yaml.safe_load((ROOT / "training" / "configs" / p).read_text())  # noqa: E731
    return read(path), (read(ae_path) if ae_path else None)


def with_latent(model: dict, ae: dict, **ae_overrides) -> dict:
    """The model section with its latent's autoencoder given by architecture (random weights, no
    bundle, no statistics: ``normalize: False``)."""
    model = dict(model)
    latent = {k: v for k, v in (model.get("latent") or {}).items() if k not in ("autoencoder_bundle", "stats_batches")}
    model["latent"] = latent | {"autoencoder": dict(ae["model"], **ae_overrides), "normalize": False}
    return model


def build(name: str, cfg: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for the same modules
    return build_method(name, cfg).eval().to(device)


def count(module: nn.Module, prefix: str = "", exclude: str | None = None) -> int:
    """Parameters of ``module`` whose name starts with ``prefix`` (and not with ``exclude``)."""
    return sum(p.numel() for k, p in module.named_parameters()
               if k.startswith(prefix) and not (exclude and k.startswith(exclude)))


def open_zero_projection(conv: nn.Module | None) -> None:
    """Small random weights for a zero-initialised projection (its output is no longer zero)."""
    if conv is not None:
        with torch.no_grad():
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.normal_(conv.bias, std=0.01)


#: the clock ``seconds`` reads (``--clock``): wall time, or the calling thread's CPU time
CLOCK = [time.perf_counter]


def seconds(method, source: torch.Tensor, steps: int | None, device: torch.device, num_samples: int = 1) -> float:
    """Seconds of one ``translate`` of ``source`` with ``steps`` sampling steps."""
    gens = [torch.Generator(device).manual_seed(i) for i in range(source.shape[0])]
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = CLOCK[0]
    start = clock()
    method.translate(source, steps=steps, num_samples=num_samples, generator=gens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def best_times(calls: list, repeats: int) -> list[float]:
    """Best of ``repeats`` timings of each zero-argument call, the calls interleaved (all see the
    same load on shared cores)."""
    times = [[call() for call in calls] for _ in range(repeats)]
    return [min(row[i] for row in times) for i in range(len(calls))]


def table(columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * len(columns))


def row(cells: list) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def setting(args: argparse.Namespace, slices: str) -> str:
    return (f"{args.size} size: {slices} slices, batch {args.batch_size}, {args.device}, "
            f"{torch.get_num_threads()} thread(s), {'thread CPU' if CLOCK[0] is time.thread_time else 'wall'} time")


def random_source(args: argparse.Namespace, size: int, device: torch.device) -> torch.Tensor:
    return torch.rand(args.batch_size, 1, size, size, device=device) * 2 - 1


# ---- c2fmit ---------------------------------------------------------------------------------------

def run_c2fmit(args: argparse.Namespace, device: torch.device) -> None:
    cfg, ae = load_config("c2fmit", args.size)
    model = with_latent(cfg["model"], ae)
    size = int(cfg["data"]["size"])
    c2f = build("c2fmit", model, device)
    bbdm = build("bbdm", {k: v for k, v in model.items() if k not in C2FMIT_ONLY}, device)
    with torch.no_grad():
        for module in c2f.unet.injections.values():
            module.gate.fill_(0.1)
    source = random_source(args, size, device)
    print(f"{setting(args, f'{size}x{size}')}; bridge U-Net {count(bbdm, 'unet.') / 1e6:.2f} M parameters, "
          f"tl {count(c2f, 'tl.') / 1e6:.2f} M, C2FGAM {count(c2f, 'unet.injections.') / 1e6:.3f} M "
          f"at {', '.join(c2f.fusion_sites())}\n")
    table(["steps", "bbdm slices/s", "c2fmit slices/s", "c2fmit time / bbdm time"])
    for method in (bbdm, c2f):
        seconds(method, source, 3, device)  # warm-up
    n = args.batch_size
    for steps in args.steps:
        t_b, t_c = best_times([functools.partial(seconds, m, source, steps, device) for m in (bbdm, c2f)],
                              args.repeats)
        row([steps, f"{n / t_b:.2f}", f"{n / t_c:.2f}", f"{t_c / t_b:.3f}"])


# ---- rlbcd ----------------------------------------------------------------------------------------

def matched_channels(bbdm: nn.Module, target: int) -> tuple[int, int]:
    """(model_channels, parameters) of the bbdm U-Net, ``norm_groups`` 8, whose parameter count
    is closest to ``target``; U-Nets counted on the meta device (nothing allocated)."""
    unet_cfg = bbdm.config.unet
    other = count(bbdm, exclude="autoencoder.") - count(bbdm, "unet.")
    guess = unet_cfg.model_channels * math.sqrt(target / max(1, count(bbdm, "unet.")))
    best: tuple[int, int] | None = None
    for ch in range(max(8, 8 * round(guess / 8) - 24), 8 * round(guess / 8) + 32, 8):
        try:
            cfg = dataclasses.replace(unet_cfg, model_channels=ch, norm_groups=8)
            with torch.device("meta"):
                unet = type(bbdm.unet)(bbdm.unet_in_channels(), bbdm.space_channels, cfg)
        except ValueError:
            continue
        params = other + count(unet)
        if best is None or abs(params - target) < abs(best[1] - target):
            best = (ch, params)
    if best is None:
        raise ValueError(f"no bbdm U-Net of norm_groups 8 near model_channels {guess:.0f}")
    return best


def run_rlbcd(args: argparse.Namespace, device: torch.device) -> None:
    cfg, ae = load_config("rlbcd", args.size)
    domains = ae["model"].get("domains", ["source", "target"])
    model = with_latent(cfg["model"], ae, domains=list(dict.fromkeys([*domains, "residual"])))
    size = int(cfg["data"]["size"])
    rl = build("rlbcd", model, device)
    bbdm_cfg = {k: v for k, v in model.items() if k not in RLBCD_ONLY}
    bbdm = build("bbdm", bbdm_cfg, device)
    for module in rl.unet.injections.values():
        open_zero_projection(getattr(module, "proj", None))  # CMA's zero-initialised W_o
    total = count(rl, exclude="autoencoder.")
    unet = count(rl, "unet.", exclude="unet.injections.")
    sam = sum(count(m) for s, m in rl.unet.injections.items() if s.startswith("enc"))
    cma = sum(count(m) for s, m in rl.unet.injections.items() if s.startswith("dec"))
    models = {"bbdm": bbdm}
    matched = ""
    if args.matched:
        ch, params = matched_channels(bbdm, total)
        same = dict(bbdm_cfg, unet=dict(bbdm_cfg["unet"], model_channels=ch, norm_groups=8))
        models[f"bbdm ch {ch}"] = build("bbdm", same, device)
        matched = f"; bbdm of about that count: model_channels {ch}, norm_groups 8, {params / 1e6:.2f} M"
    models["rlbcd"] = rl
    source = random_source(args, size, device)
    print(f"{setting(args, f'{size}x{size}')}; U-Net {unet / 1e6:.2f} M parameters (bbdm 1, rlbcd 2), "
          f"SAM {sam / 1e6:.3f} M, CMA {cma / 1e6:.3f} M, H_E {count(rl, 'fusion.') / 1e6:.3f} M: rlbcd "
          f"{total / 1e6:.2f} M without the autoencoder{matched}\n")
    for method in models.values():
        seconds(method, source, 3, device)  # warm-up
    n = args.batch_size
    names = list(models)
    table(["steps"] + [f"{k} slices/s" for k in names] + [f"rlbcd time / {k} time" for k in names[:-1]])
    for steps in args.steps:
        times = best_times([functools.partial(seconds, m, source, steps, device) for m in models.values()],
                           args.repeats)
        row([steps] + [f"{n / t:.2f}" for t in times] + [f"{times[-1] / t:.3f}" for t in times[:-1]])
    print(f"\nrlbcd, N samples per slice at {args.samples_steps} steps (select: {rl.config.select}):\n")
    table(["N", "rlbcd slices/s", "time / time at N = 1", "time per sample / time at N = 1"])
    times = best_times([functools.partial(seconds, rl, source, args.samples_steps, device, num_samples=k)
                        for k in args.samples], args.repeats)
    base = dict(zip(args.samples, times, strict=True)).get(1)
    for k, t in zip(args.samples, times, strict=True):
        rel = (f"{t / base:.3f}", f"{t / base / k:.3f}") if base else ("n/a", "n/a")
        row([k, f"{n / t:.2f}", *rel])


# ---- dfbk -----------------------------------------------------------------------------------------

def run_dfbk(args: argparse.Namespace, device: torch.device) -> None:
    cfg, _ = load_config("dfbk", args.size)
    model = dict(cfg["model"])
    model["kg"] = dict(model.get("kg") or {}, text="random", embedding_file=None)
    base = {k: v for k, v in model.items() if k not in DFBK_ONLY}
    models = {
        "resshift (global attention)": build("resshift", dict(base, unet=dict(base["unet"], attention="global")), device),
        "resshift (swin)": build("resshift", base, device),
        "dfbk": build("dfbk", model, device),
    }
    dfbk = models["dfbk"]
    for block in dfbk.unet.injections.values():
        open_zero_projection(block.dfb_proj)
        open_zero_projection(block.kg_proj)
    print(f"{args.size} size: square slices, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} "
          f"thread(s), {'thread CPU' if CLOCK[0] is time.thread_time else 'wall'} time, T = {dfbk.config.process.num_train_timesteps} steps; Swin U-Net "
          f"{count(models['resshift (swin)'], 'unet.') / 1e6:.2f} M parameters, DFB/KG blocks "
          f"{count(dfbk, 'unet.injections.') / 1e6:.3f} M at {', '.join(dfbk.block_sites)}; global-attention "
          f"U-Net {count(models['resshift (global attention)'], 'unet.') / 1e6:.2f} M\n")
    names = list(models)
    table(["slice size"] + [f"{k} slices/s" for k in names]
          + ["dfbk time / resshift (swin) time", "resshift (global) time / resshift (swin) time"])
    n, notes = args.batch_size, []
    for res in args.resolutions or RESOLUTIONS[args.size]:
        source = random_source(args, res, device)
        ok = {}
        for name, method in models.items():
            try:
                seconds(method, source, None, device)  # warm-up (and: does this size fit the model?)
                ok[name] = method
            except (ValueError, RuntimeError) as err:
                notes.append(f"n/a: {name} at {res}x{res}: {str(err).splitlines()[0]}")
        times = dict(zip(ok, best_times([functools.partial(seconds, m, source, None, device) for m in ok.values()],
                                        args.repeats), strict=True))
        ratios = [f"{times[a] / times[b]:.3f}" if a in times and b in times else "n/a"
                  for a, b in (("dfbk", "resshift (swin)"), ("resshift (global attention)", "resshift (swin)"))]
        row([f"{res}x{res}"] + [f"{n / times[k]:.2f}" if k in times else "n/a" for k in names] + ratios)
    for note in notes:
        print(f"\n{note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--size", choices=("demo", "paper"), default="demo")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50, 200], help="sampling steps (c2fmit, rlbcd)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall clock, or the calling thread's CPU time (one CPU thread only: other processes' "
                             "load on a shared machine stays out of the numbers)")
    parser.add_argument("--samples", nargs="+", type=int, default=[1, 2, 4, 8], help="rlbcd: samples per slice")
    parser.add_argument("--samples-steps", type=int, default=10, help="rlbcd: sampling steps of the N-samples table")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="rlbcd: leave out the bbdm of rlbcd's parameter count")
    parser.add_argument("--resolutions", nargs="+", type=int, default=None,
                        help="dfbk: slice sides (default: demo 64 256, paper 224)")
    args = parser.parse_args(argv)
    if args.method != "dfbk" and min(args.steps + [args.samples_steps]) < 3:
        parser.error("--steps and --samples-steps must be >= 3 (the Brownian-bridge skip schedule)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "thread":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            parser.error("--clock thread needs --device cpu and --threads 1 (all the work in the calling thread)")
        CLOCK[0] = time.thread_time
    {"c2fmit": run_c2fmit, "rlbcd": run_rlbcd, "dfbk": run_dfbk}[args.method](args, device)


if __name__ == "__main__":
    main()
