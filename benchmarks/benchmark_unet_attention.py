#!/usr/bin/env python
"""Speed of the denoising U-Net with global vs swin attention: slices/s of one forward pass.

    python benchmarks/benchmark_unet_attention.py [--nets demo paper] [--sizes 64 256]
        [--batch-sizes 2 1] [--threads 1 0] [--max-global-tokens 16384] [--min-time 1.0]

The networks are ResShift's U-Nets of this repository, random-initialised (speed does not depend
on the weights), as pixel-space denoisers (source concatenated: 2 channels in, 1 out):

- ``demo``: ``training/configs/demo/resshift.yaml`` (the bundled demo model's U-Net);
- ``paper``: ``training/configs/resshift.yaml`` (160 channels, mult 1-2-2-4, 2 res blocks,
  attention at every level, 32-channel heads).

Each runs with ``attention: global`` (its config) and ``attention: swin`` (ResShift's
``UNetModelSwin``: window 8, depth 2, embedding 192 for ``paper`` as in the official configs, 32
for ``demo``, one 32-channel head). Timing: eval mode, ``torch.no_grad``, fp32, on the CPU, for
each thread count in ``--threads`` (0: torch's default); one warm-up forward, then forwards until
``--min-time`` seconds have passed, unless the warm-up alone took longer than 3 s (then it is the
measurement). Global attention over more than ``--max-global-tokens`` positions at one level
(65536 at 256² for ``paper``: a 65536² attention matrix per head) is skipped and said so.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from MedTranslateLib.config import from_dict  # noqa: E402
from MedTranslateLib.nn.diffusion_unet import DenoisingUNet, DenoisingUNetConfig  # noqa: E402

NETS = {"demo": ROOT / "training" / "configs" / "demo" / "resshift.yaml",
        "paper": ROOT / "training" / "configs" / "resshift.yaml"}
SWIN = {"demo": {"swin_embed_dim": 32}, "paper": {"swin_embed_dim": 192}}  # window 8, depth 2: defaults


def unet_config(net: str, attention: str) -> DenoisingUNetConfig:
    arch = yaml.safe_load(NETS[net].read_text())["model"]["unet"]
    extra = {"attention": "swin", **SWIN[net]} if attention == "swin" else {}
    return from_dict(DenoisingUNetConfig, {**arch, **extra}, where=str(NETS[net]), prefix="model.unet")


def largest_global_attention(cfg: DenoisingUNetConfig, size: int) -> int:
    """Positions of the largest global attention (levels with attention and the middle block)."""
    levels = set(cfg.attention_levels) | {len(cfg.channel_mult) - 1}
    return max((size >> lv) ** 2 for lv in levels)


def time_forward(net: DenoisingUNet, x: torch.Tensor, t: torch.Tensor, min_time: float) -> tuple[float, int]:
    """Seconds per forward and the number of timed forwards."""
    with torch.no_grad():
        start = time.perf_counter()
        net(x, t)
        first = time.perf_counter() - start
        if first > 3.0:
            return first, 1
        runs, start = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - start < min_time:
            net(x, t)
            runs += 1
        return (time.perf_counter() - start) / runs, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["demo", "paper"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 1],
                        help="one per size (the last one repeats)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="0: torch's default")
    parser.add_argument("--max-global-tokens", type=int, default=16384)
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args(argv)

    default_threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, default threads {default_threads}, "
          f"load average {load:.1f} at start\n")
    print("| net | attention | size | batch | threads | params (M) | s/forward | slices/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.nets:
        for attention in ("global", "swin"):
            cfg = unet_config(name, attention)
            torch.manual_seed(0)
            net = DenoisingUNet(2, 1, cfg).eval()
            params = sum(p.numel() for p in net.parameters()) / 1e6
            for i, size in enumerate(args.sizes):
                batch = args.batch_sizes[min(i, len(args.batch_sizes) - 1)]
                for threads in args.threads:
                    torch.set_num_threads(threads or default_threads)
                    row = f"| {name} | {attention} | {size}² | {batch} | {threads or default_threads} | {params:.1f} |"
                    tokens = largest_global_attention(cfg, size)
                    if attention == "global" and tokens > args.max_global_tokens:
                        print(f"{row} skipped: global attention over {tokens} positions | |", flush=True)
                        continue
                    x = torch.randn(batch, 2, size, size)
                    seconds, _ = time_forward(net, x, torch.full((batch,), 2), args.min_time)
                    print(f"{row} {seconds:.3f} | {batch / seconds:.2f} |", flush=True)
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
