"""Regenerate Testing/data/synthrad_inputs.npz and synthrad_reference.json from the official code.

The official SynthRAD2023 image metrics (github.com/SynthRAD2023/metrics,
functions/image_metrics.py, GPL-3.0) are imported from a local export of that repository at
run time; none of their code is copied into ours. Testing/test_metrics.py checks that
``MedTranslateLib.metrics.image_metrics(..., value_range=(-1024, 3000))`` reproduces the numbers
written here.

    git --git-dir=<mirror of SynthRAD2023/metrics> archive HEAD | tar -x -C /tmp/synthrad
    .venv/bin/python benchmarks/make_synthrad_reference.py /tmp/synthrad --commit <sha>

Needs numpy, scipy, SimpleITK and scikit-image (all in the dev venv). Two things are patched
around, both outside the metric code itself:

- ``evalutils`` (imported by image_metrics.py only for ``score_patient``'s file loader) is not
  installed here; a stand-in module whose ``SimpleITKLoader.load_image`` is
  ``SimpleITK.ReadImage`` is registered when the real one is missing.
- ``ImageMetrics.score_patient`` as committed passes the SimpleITK mask *image* to ``ssim``
  instead of ``mask_array``; numpy turns that image into a flat sequence and ``ssim`` fails to
  broadcast it (recorded in the JSON). So the evaluation below does what ``score_patient`` does
  -- read the .mha files, cast to float32, take the arrays -- and calls ``mae``, ``psnr``
  (``use_population_range=True``) and ``ssim`` with ``mask_array``, as clearly intended.
  Unmasked rows call the same methods with ``mask=None``.

The inputs are small CT-like volumes in HU (int16, like SynthRAD's .mha files), built here from
a fixed seed, with values below -1024 (scanner padding) and above 3000 (metal) so clipping
matters, and masks that reach the borders so SSIM's border crop matters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import scipy
import SimpleITK as sitk
import skimage
from scipy.ndimage import gaussian_filter

DATA_DIR = Path(__file__).resolve().parent.parent / "Testing" / "data"
INPUTS_NAME = "synthrad_inputs.npz"
REFERENCE_NAME = "synthrad_reference.json"

SEED = 2023
SHAPE = (24, 40, 40)
SYNTHETICS = ("synthetic_good", "synthetic_poor")
MASKS = (None, "body", "tumor", "rim")


def make_inputs(seed: int = SEED, shape: tuple[int, int, int] = SHAPE) -> dict[str, np.ndarray]:
    """Reference CT, two synthetic CTs (int16 HU) and three masks (bool), all (z, y, x)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2,
                          indexing="ij")
    body = (y / (0.42 * ny)) ** 2 + (x / (0.46 * nx)) ** 2 < 1.0  # every slice: touches z borders
    liver = ((z - nz / 2) / (0.35 * nz)) ** 2 + ((y + 2) / 8) ** 2 + ((x + 6) / 9) ** 2 < 1.0
    tumor = (z - nz / 2) ** 2 + (y + 2) ** 2 + (x + 8) ** 2 < 3.5**2
    spine = ((y - 0.3 * ny) / 3.5) ** 2 + (x / 3.5) ** 2 < 1.0
    metal = spine & (np.abs(z - nz / 2) < 2) & (np.abs(x) < 1.5)

    ref = np.full(shape, -1000.0)
    ref[body] = 40.0 + 30.0 * gaussian_filter(rng.standard_normal(shape), 2.0)[body] / 0.05
    ref[liver] = 60.0
    ref[tumor] = 95.0
    ref[spine] = 900.0
    ref = gaussian_filter(ref, 0.8)
    ref[metal] = 3500.0  # above the 3000 HU ceiling
    ref += rng.normal(0.0, 8.0, shape)
    outside_fov = (y / (0.5 * ny)) ** 2 + (x / (0.5 * nx)) ** 2 > 1.0
    ref[outside_fov] = -2048.0  # scanner padding, below the -1024 floor

    error = 25.0 * gaussian_filter(rng.standard_normal(shape), 2.5) / 0.04
    good = ref + error + rng.normal(0.0, 12.0, shape)
    good[metal] = 3100.0
    good[outside_fov] = -1024.0

    poor = gaussian_filter(ref, 1.5) + 40.0 + rng.normal(0.0, 45.0, shape)
    poor[outside_fov] = -1100.0

    to_hu = lambda a: np.clip(np.rint(a), -32768, 32767).astype(np.int16)  # noqa: E731
    return {
        "reference": to_hu(ref),
        "synthetic_good": to_hu(good),
        "synthetic_poor": to_hu(poor),
        "body": body,
        "tumor": tumor,
        "rim": body & (z < 5),  # mostly inside SSIM's 3-voxel border crop
    }


def array_digest(array: np.ndarray) -> str:
    """sha256 of dtype, shape and C-order bytes: identifies the data, not the .npz file."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def load_official(synthrad_dir: Path):
    functions = synthrad_dir / "functions"
    if not (functions / "image_metrics.py").is_file():
        sys.exit(f"no functions/image_metrics.py under {synthrad_dir}")
    try:
        import evalutils.io  # noqa: F401
    except ImportError:
        stub = types.ModuleType("evalutils.io")

        class SimpleITKLoader:  # the only part of evalutils that image_metrics.py uses
            def load_image(self, path):
                return sitk.ReadImage(str(path))

        stub.SimpleITKLoader = SimpleITKLoader
        sys.modules["evalutils"] = types.ModuleType("evalutils")
        sys.modules["evalutils.io"] = stub
    sys.path.insert(0, str(functions))
    from image_metrics import ImageMetrics  # type: ignore[import-not-found]

    source = (functions / "image_metrics.py").read_bytes()
    return ImageMetrics(), hashlib.sha256(source).hexdigest()


def official_scores(metrics, gt_path: Path, pred_path: Path, mask_path: Path | None) -> dict:
    """``score_patient``'s reading and casting, then its three metric calls with arrays."""
    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32))

    gt, pred = read(gt_path), read(pred_path)
    mask = None if mask_path is None else read(mask_path)
    return {
        "mae": float(metrics.mae(gt, pred, mask)),
        "psnr": float(metrics.psnr(gt, pred, mask, use_population_range=True)),
        "ssim": float(metrics.ssim(gt, pred, mask)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synthrad_dir", type=Path, help="export of github.com/SynthRAD2023/metrics")
    parser.add_argument("--commit", default=None, help="the exported commit, recorded as is")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)

    metrics, source_sha = load_official(args.synthrad_dir)
    inputs = make_inputs()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out_dir / INPUTS_NAME, **inputs)

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, array in inputs.items():
            paths[name] = Path(tmp) / f"{name}.mha"
            image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool else array)
            sitk.WriteImage(image, str(paths[name]))
        for synthetic in SYNTHETICS:
            for mask in MASKS:
                scores = official_scores(metrics, paths["reference"], paths[synthetic],
                                         None if mask is None else paths[mask])
                cases.append({"synthetic": synthetic, "mask": mask, **scores})
        try:
            metrics.score_patient(paths["reference"], paths["synthetic_good"], paths["body"])
            score_patient_note = "ran"
        except Exception as error:  # noqa: BLE001 -- recorded, not handled
            score_patient_note = f"{type(error).__name__}: {str(error).strip()}"

    reference = {
        "about": "Official SynthRAD2023 image metrics on the arrays of " + INPUTS_NAME
                 + "; regenerate with benchmarks/make_synthrad_reference.py.",
        "official_code": {
            "repository": "https://github.com/SynthRAD2023/metrics",
            "file": "functions/image_metrics.py",
            "commit": args.commit,
            "file_sha256": source_sha,
            "calls": "mae(gt, pred, mask); psnr(gt, pred, mask, use_population_range=True); "
                     "ssim(gt, pred, mask) on float32 arrays read from .mha as in score_patient",
            "score_patient_as_committed": score_patient_note,
        },
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__,
                     "scikit-image": skimage.__version__, "SimpleITK": sitk.Version_VersionString()},
        "value_range": [-1024.0, 3000.0],
        "inputs": {
            "file": INPUTS_NAME,
            "generator": "benchmarks/make_synthrad_reference.py:make_inputs",
            "seed": SEED,
            "shape": list(SHAPE),
            "sha256": {name: array_digest(array) for name, array in inputs.items()},
        },
        "cases": cases,
    }
    (args.out_dir / REFERENCE_NAME).write_text(json.dumps(reference, indent=2) + "\n")
    for case in cases:
        print(f"{case['synthetic']:15s} {case['mask'] or 'whole':6s} "
              f"mae={case['mae']:.4f} psnr={case['psnr']:.4f} ssim={case['ssim']:.6f}")
    print(f"score_patient as committed: {score_patient_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
