#!/usr/bin/env python
"""Train a translation method from a YAML config; writes checkpoints, logs and a model bundle.

    python training/train.py --config training/configs/smoke/pix2pix.yaml [--resume] [key.path=value ...]

Overrides use dotted keys, e.g. ``train.max_steps=500 data.root=/data/cases train.devices=2``.
``--resume`` continues ``<train.out_dir>/checkpoints/last.ckpt`` exactly (same config needed).
Several devices: ``train.devices=N`` (Lightning launches the other processes) or
``torchrun --nproc_per_node=N training/train.py ... train.devices=N``.
All logic lives in ``MedTranslateLib.training``. Errors a user can cause end in one line on
stderr and exit code 2 (MEDTRANSLATE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds MedTranslateLib.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "train.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (see training/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.ckpt")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        from MedTranslateLib import training

        cfg = training.load_train_config(args.config, args.overrides)
        bundle = training.fit(cfg, resume=args.resume, command=command)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        from MedTranslateLib.runtime import first_line

        print(f"{PROG}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    if training.is_global_zero():
        print(f"bundle: {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
