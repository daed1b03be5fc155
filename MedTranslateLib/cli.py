"""``medtranslate`` command line: demo | translate | evaluate | phantom | models.

Every failure the user can cause (bad file, bad option) ends in one line on stderr and a
non-zero exit code, never a traceback. Set MEDTRANSLATE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def _cmd_demo(args: argparse.Namespace) -> int:
    """Until the engine lands: a phantom case, and the identity baseline's metrics on it."""
    from . import intensity, io, metrics, phantom

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    case_dir = phantom.write_phantom_dataset(out / "phantom", cases=1, seed=args.seed)[0]
    ct = io.read_volume(case_dir / "ct.nii.gz")
    cta = io.read_volume(case_dir / "cta_arterial.nii.gz")
    liver = io.read_volume(case_dir / "liver.nii.gz").array > 0.5
    tumor = io.read_volume(case_dir / "tumor.nii.gz").array > 0.5
    body = io.read_volume(case_dir / "labels.nii.gz").array > 0
    # Identity baseline: the source mapped through the source and target presets.
    src = intensity.preset_from_config("ct_abdomen").fit(ct.array)
    tgt = intensity.preset_from_config("ct_angio").fit(cta.array)
    identity = tgt.inverse(src.forward(ct.array))
    rows = {}
    for name, mask in (("whole", None), ("body", body), ("liver", liver), ("tumor", tumor)):
        if mask is not None and not mask.any():
            continue
        rows[name] = metrics.image_metrics(cta.array, identity, mask, value_range=(-1024, 3000))
    report = {"case": str(case_dir), "method": "identity", "metrics": rows}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"phantom case: {case_dir}")
    print(f"metrics:      {out / 'metrics.json'}")
    for name, row in rows.items():
        print(f"  {name:6s} " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Medical image translation.")
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

    p = sub.add_parser("demo", help="offline demo on a generated phantom case")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, KeyError, RuntimeError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
