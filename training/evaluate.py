#!/usr/bin/env python
"""Evaluate a model bundle on held-out cases: metrics table (CSV + Markdown) and a figure per case.

    python training/evaluate.py --bundle runs/pix2pix_smoke/bundle --data runs/phantom_smoke --out runs/pix2pix_smoke/eval

``--split`` picks the bundle's own train/val/test split of the cases under ``--data`` (its split
ratios and seed are in the bundle), or ``all``. Writes ``metrics.csv``, ``metrics.md`` and
``figures/<case>.png`` into ``--out``. Metrics: MAE / PSNR / SSIM / RMSE in physical units over the
whole volume, the body, the liver and the tumour, for the model and the identity baseline.
All logic lives in ``MedTranslateLib.evaluation``. Errors a user can cause end in one line on
stderr and exit code 2 (MEDTRANSLATE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds MedTranslateLib.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "evaluate.py"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="model bundle (folder or .zip)")
    parser.add_argument("--data", required=True, type=Path, help="folder of case folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion methods)")
    parser.add_argument("--batch-size", type=_batch_size, default="auto",
                        help="slices per forward pass (auto: from free GPU memory, 8 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (stochastic methods)")
    parser.add_argument("--max-cases", type=int, default=None, help="evaluate at most this many cases")
    parser.add_argument("--no-figures", action="store_true", help="skip the per-case PNG figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from MedTranslateLib.evaluation import evaluate_bundle

        result = evaluate_bundle(args.bundle, args.data, args.out, split=args.split, steps=args.steps,
                                 batch_size=args.batch_size, device=args.device, seed=args.seed,
                                 max_cases=args.max_cases,
                                 figures=not args.no_figures, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        text = str(exc).strip()
        message = text.splitlines()[0] if text else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(result.markdown.read_text(encoding="utf-8").split("## Per case")[0].rstrip())
    print(f"table:   {result.csv}  {result.markdown}")
    if result.figures:
        print(f"figures: {result.figures[0].parent} ({len(result.figures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
