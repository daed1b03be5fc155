#!/usr/bin/env python
"""Cost of c2fmit's guidance branch: slices/s of ``translate`` at 10 / 50 / 200 sampling steps,
c2fmit vs bbdm of the same size (the ratio is what the DGB and the C2FGAM modules cost).

    python benchmarks/benchmark_c2fmit.py [--size demo|paper] [--steps 10 50 200]
        [--batch-size 4] [--threads 1] [--device cpu|cuda] [--repeats 1]

- ``demo`` (default): ``training/configs/demo/c2fmit.yaml`` at 128x128 in the latent of
  ``training/configs/demo/autoencoder_f4.yaml`` (3 x 32 x 32);
- ``paper``: ``training/configs/c2fmit.yaml`` at 256x256 in the latent of
  ``training/configs/autoencoder_f8.yaml`` (4 x 32 x 32; GPU).

bbdm is the same model section without c2fmit's keys (``dgb``, ``prb``, ``fusion``,
``fusion_mode``, ``c2fgam``): the same bridge U-Net, autoencoder, steps and batch (for the demo
it is ``demo/bbdm_latent.yaml``'s network). Weights are random (speed does not depend on them;
the gates are opened so nothing is skipped), eval mode, ``torch.no_grad``, fp32, one generator per
slice (the engine's way). One warm-up ``translate`` at 3 steps each, then per row ``--repeats``
timed calls of each method, interleaved (the best of each is kept). ``translate`` includes encoding, tl (once per call) and decoding.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from MedTranslateLib.methods import build_method  # noqa: E402

CONFIGS = {"demo": ("demo/c2fmit.yaml", "demo/autoencoder_f4.yaml"), "paper": ("c2fmit.yaml", "autoencoder_f8.yaml")}
C2FMIT_ONLY = ("dgb", "prb", "fusion", "fusion_mode", "c2fgam")


def models(size: str) -> tuple[dict, dict, int]:
    """(c2fmit model section, bbdm model section, slice size), latent from the autoencoder config."""
    c2f_path, ae_path = (ROOT / "training" / "configs" / p for p in CONFIGS[size])
    c2f, ae = yaml.safe_load(c2f_path.read_text()), yaml.safe_load(ae_path.read_text())
    model = dict(c2f["model"])
    model["latent"] = {"autoencoder": ae["model"], "normalize": False}
    bbdm = {k: v for k, v in model.items() if k not in C2FMIT_ONLY}
    return model, bbdm, int(c2f["data"]["size"])


def seconds(method, source: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds of one ``translate`` of ``source`` with ``steps`` sampling steps."""
    gens = [torch.Generator(device).manual_seed(i) for i in range(source.shape[0])]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    method.translate(source, steps=steps, generator=gens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50, 200])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c2f_cfg, bbdm_cfg, size = models(args.size)
    torch.manual_seed(0)
    c2f = build_method("c2fmit", c2f_cfg).eval().to(device)
    torch.manual_seed(0)
    bbdm = build_method("bbdm", bbdm_cfg).eval().to(device)
    with torch.no_grad():
        for module in c2f.unet.injections.values():
            module.gate.fill_(0.1)
    count = lambda m, prefix: sum(p.numel() for k, p in m.named_parameters() if k.startswith(prefix))  # noqa: E731
    source = torch.rand(args.batch_size, 1, size, size, device=device) * 2 - 1
    print(f"{args.size} size: {size}x{size} slices, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} thread(s); bridge U-Net {count(bbdm, 'unet.') / 1e6:.2f} M parameters, "
          f"tl {count(c2f, 'tl.') / 1e6:.2f} M, C2FGAM {count(c2f, 'unet.injections.') / 1e6:.3f} M "
          f"at {', '.join(c2f.fusion_sites())}\n")
    print("| steps | bbdm slices/s | c2fmit slices/s | c2fmit time / bbdm time |")
    print("|---:|---:|---:|---:|")
    for method in (bbdm, c2f):
        seconds(method, source, 3, device)  # warm-up
    for steps in args.steps:
        times = [(seconds(bbdm, source, steps, device), seconds(c2f, source, steps, device))
                 for _ in range(args.repeats)]  # interleaved: both see the same load on shared cores
        t_b, t_c = min(t for t, _ in times), min(t for _, t in times)
        n = args.batch_size
        print(f"| {steps} | {n / t_b:.2f} | {n / t_c:.2f} | {t_c / t_b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
