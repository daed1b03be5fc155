#!/usr/bin/env python
"""Evaluate a model bundle on held-out cases: metrics table (CSV + Markdown) and a figure per case.

    python training/evaluate.py --bundle runs/pix2pix_smoke/bundle --data runs/phantom_smoke --out runs/pix2pix_smoke/eval

Same as ``medtranslate evaluate``. ``--split`` picks the bundle's own train/val/test split of the
cases under ``--data`` (its split ratios and seed are in the bundle), or ``all``. Writes
``metrics.csv``, ``metrics.md`` and ``figures/<case>.png`` into ``--out``. Metrics: MAE / PSNR /
SSIM / RMSE in physical units over the whole volume, the body, the model's ROIs (liver, tumour) and
the case's label regions (aorta, kidney: ``regions.LABEL_REGIONS``), for the model and the identity
baseline. All logic lives in ``MedTranslateLib.evaluation``. Errors a user
can cause end in one line on stderr and exit code 2 (MEDTRANSLATE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds MedTranslateLib.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from MedTranslateLib.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)], prog="evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
