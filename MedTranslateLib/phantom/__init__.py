"""Paired abdominal phantom: our sample and test data (no real paired dataset can be downloaded).

Each seed gives one random 3-D upper abdomen rendered in every modality of the same anatomy:

- ``ct``: non-contrast CT (HU); ``cta_arterial``, ``cta_portal``: late-arterial and
  portal-venous contrast CT (HU);
- ``t1``, ``t1_post``, ``t2``: spin-echo MR at 1.5 T (or 3 T) in arbitrary units (~0..1000),
  T1-weighted before and after gadolinium (portal-venous phase) and T2-weighted;
- masks: ``liver`` (parenchyma + intrahepatic vessels + tumors, as in LiTS), ``tumor`` (viable +
  necrotic) and ``labels`` (the full label map, values in :data:`LABELS`, 0 outside the body);
  ``info["regions"]`` (written as ``cases.REGION_TABLE``) says which labels form the evaluation
  regions ``aorta`` and ``kidney`` (:data:`.tissues.REGION_LABELS`).

Anatomy (see :mod:`.anatomy`): body outline varying along z, subcutaneous fat, abdominal wall and
back muscles, ribs, spine (vertebral bodies with cortical shell and marrow, discs, neural arch,
canal), lung bases and diaphragm, liver (irregular, right side) with 0-3 tumors (hypervascular,
rim-enhancing, necrotic-core, hypovascular), gallbladder, aorta with celiac/SMA/renal branches,
IVC with renal veins, portal venous system (SMV, splenic vein, branching intrahepatic tree),
branching hepatic veins, kidneys (cortex, medulla pyramids, sinus fat, pelvis, perirenal fat),
spleen, stomach (air-fluid level), pancreas, bowel loops in visceral fat. Tissue tables and their
sources: :mod:`.tissues`; acquisition effects: :mod:`.render`.

Geometry and frames
    Arrays are (z, y, x); spacing and origin are (x, y, z) mm, LPS, identity direction: x
    increases to the patient's LEFT (the liver is at small x indices), y POSTERIOR (the spine is
    at large y indices), z SUPERIOR. The volume centre is at (0, 0, :data:`CENTRE_Z_MM`).
    ``ct`` and ``t1`` are the *source* frame. With ``misregistration_mm > 0`` each *target*
    modality (``cta_arterial``, ``cta_portal``, ``t1_post``, ``t2``) is the anatomy resampled
    through its own small rigid transform (``info["misregistration"]``); all masks are in the
    source frame (they match ``ct`` and ``t1`` exactly, the targets only approximately).

Determinism
    ``generate_case(seed)`` is a pure function of ``seed`` and the config (independent random
    streams per part, so e.g. switching misregistration on does not change the anatomy or the
    noise). ``write_phantom_dataset`` derives case ``i``'s seed from
    ``np.random.SeedSequence([seed, i])``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..cases import write_region_table
from ..io import Volume, write_volume
from . import anatomy as _anatomy
from .anatomy import TUMOR_TYPES
from .render import SOURCE_MODALITIES, TARGET_MODALITIES, render_images
from .tissues import LABELS, REGION_LABELS, TISSUES, region_table

__all__ = [
    "MODALITIES",
    "MASKS",
    "LABELS",
    "REGION_LABELS",
    "TISSUES",
    "SOURCE_MODALITIES",
    "TARGET_MODALITIES",
    "TUMOR_TYPES",
    "CENTRE_Z_MM",
    "PhantomConfig",
    "PhantomCase",
    "generate_case",
    "write_case",
    "write_phantom_dataset",
    "case_seed",
]

MODALITIES = ("ct", "cta_arterial", "cta_portal", "t1", "t1_post", "t2")
MASKS = ("liver", "tumor", "labels")
#: World z (mm) of the volume centre (a table position; x and y are centred on 0).
CENTRE_Z_MM = -200.0
#: Largest volume generated (voxels): about 20 float32 working copies are held at once.
MAX_VOXELS = 2 ** 26
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _finite(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"phantom {what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"phantom {what} must be finite, got {value!r}")
    return v


@dataclass
class PhantomConfig:
    """Size and acquisition settings of the phantom (defaults: ~2.5 mm upper abdomen).

    ``shape``: (z, y, x) voxels, each >= 16. ``spacing``: (x, y, z) mm. The anatomy fills a
    330 x 330 x 160 mm field of view and is shrunk to fit a smaller one.
    ``misregistration_mm``: largest rigid shift of each target modality against the sources
    (``ct``, ``t1``); the rotation is up to ``min(3, 0.5 * misregistration_mm)`` degrees per
    axis. 0 = perfectly paired.
    """

    shape: tuple[int, int, int] = (64, 128, 128)
    spacing: tuple[float, float, float] = (2.5, 2.5, 2.5)
    misregistration_mm: float = 0.0
    ct_noise_hu: float = 12.0           # CT noise standard deviation (HU)
    mr_noise: float = 8.0               # MR noise: sd of each complex channel (a.u.)
    mr_bias: float = 0.1                # MR bias field strength (~sd of its logarithm)
    mr_scale: float = 1300.0            # MR receiver gain: signal (PD units) -> a.u.
    partial_volume_sigma: float = 0.7   # Gaussian blur of the noise-free images (voxels)
    texture: float = 1.0                # intra-organ texture and perfusion heterogeneity scale
    field_strength_t: float = 1.5       # 1.5 or 3.0 (relaxation-time tables)
    t1_tr_ms: float = 500.0
    t1_te_ms: float = 15.0
    t2_tr_ms: float = 4000.0
    t2_te_ms: float = 100.0
    gd_r1: float = 4.5                  # gadolinium relaxivities (1/mM/s)
    gd_r2: float = 5.5
    t2_flow_void: bool = True           # fast blood is dark on the T2 spin echo
    tumor_count: tuple[int, int] = (0, 3)  # inclusive range of liver tumors per case
    tumor_types: tuple[str, ...] = TUMOR_TYPES  # drawn uniformly for each tumor

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(v) for v in self.shape)
            ok = len(shape) == 3 and all(float(v) == int(v) for v in self.shape)
        except (TypeError, ValueError):
            ok = False
        if not ok or min(shape) < 16:
            raise ValueError(f"phantom shape must be 3 integers >= 16 (z y x), got {self._show(self.shape)}")
        if math.prod(shape) > MAX_VOXELS:
            raise ValueError(f"phantom shape {shape} has {math.prod(shape)} voxels; at most {MAX_VOXELS}")
        self.shape = shape
        try:
            spacing = tuple(float(v) for v in self.spacing)
        except (TypeError, ValueError):
            spacing = ()
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"phantom spacing must be 3 positive numbers (x y z mm), got {self._show(self.spacing)}")
        self.spacing = spacing
        for name in ("misregistration_mm", "ct_noise_hu", "mr_noise", "mr_bias",
                     "partial_volume_sigma", "texture", "t1_te_ms", "t2_te_ms", "gd_r1", "gd_r2"):
            v = _finite(getattr(self, name), name)
            if v < 0:
                raise ValueError(f"phantom {name} must be >= 0, got {v:g}")
            setattr(self, name, v)
        if self.misregistration_mm > 50:
            raise ValueError(f"phantom misregistration_mm must be <= 50 (a small shift), got {self.misregistration_mm:g}")
        for name in ("mr_scale", "t1_tr_ms", "t2_tr_ms"):
            v = _finite(getattr(self, name), name)
            if v <= 0:
                raise ValueError(f"phantom {name} must be > 0, got {v:g}")
            setattr(self, name, v)
        if self.t1_te_ms >= self.t1_tr_ms or self.t2_te_ms >= self.t2_tr_ms:
            raise ValueError("phantom echo times must be shorter than the repetition times")
        fs = _finite(self.field_strength_t, "field_strength_t")
        if fs not in (1.5, 3.0):
            raise ValueError(f"phantom field_strength_t must be 1.5 or 3.0 (tesla), got {fs:g}")
        self.field_strength_t = fs
        self.t2_flow_void = bool(self.t2_flow_void)
        try:
            lo, hi = (int(v) for v in self.tumor_count)
        except (TypeError, ValueError):
            raise ValueError(f"phantom tumor_count must be (min, max), got {self.tumor_count!r}") from None
        if not 0 <= lo <= hi <= 10:
            raise ValueError(f"phantom tumor_count must satisfy 0 <= min <= max <= 10, got {(lo, hi)}")
        self.tumor_count = (lo, hi)
        types = (self.tumor_types,) if isinstance(self.tumor_types, str) else tuple(self.tumor_types)
        bad = [t for t in types if t not in TUMOR_TYPES]
        if not types or bad:
            raise ValueError(f"phantom tumor_types must be a non-empty subset of {', '.join(TUMOR_TYPES)}, "
                             f"got {self._show(types) or 'nothing'}")
        self.tumor_types = types

    @staticmethod
    def _show(value) -> str:
        try:
            return " ".join(str(v) for v in value)
        except TypeError:
            return repr(value)

    @classmethod
    def from_cli(cls, *, shape=None, spacing=None, misregistration_mm=None) -> PhantomConfig:
        """Config from command-line values; None keeps the default. Raises a one-line
        ValueError for invalid values."""
        kwargs = {}
        if shape is not None:
            kwargs["shape"] = tuple(shape) if _iterable(shape) else shape
        if spacing is not None:
            kwargs["spacing"] = tuple(spacing) if _iterable(spacing) else spacing
        if misregistration_mm is not None:
            kwargs["misregistration_mm"] = misregistration_mm
        return cls(**kwargs)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return not isinstance(value, str | bytes)


@dataclass
class PhantomCase:
    """One generated case: ``images`` (MODALITIES -> Volume), ``masks`` (MASKS -> Volume), all on
    the same grid; ``seed``; ``info`` (JSON-serialisable: tumors, misregistration, labels...)."""

    images: dict[str, Volume]
    masks: dict[str, Volume]
    seed: int
    info: dict = field(default_factory=dict)


def _check_seed(seed, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"phantom {what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([_check_seed(seed), _check_seed(index, "case index")])
               .generate_state(1)[0])


def generate_case(seed: int, config: PhantomConfig | None = None) -> PhantomCase:
    """One random abdomen in every modality (deterministic in ``seed`` and ``config``)."""
    seed = _check_seed(seed)
    cfg = config if config is not None else PhantomConfig()
    if not isinstance(cfg, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {type(cfg).__name__}")
    streams = np.random.SeedSequence(seed).spawn(5)
    rngs = {name: np.random.default_rng(s) for name, s in
            zip(("anatomy", "texture", "noise", "bias", "misregistration"), streams, strict=True)}
    grid = _anatomy.make_grid(cfg.shape, cfg.spacing)
    anat = _anatomy.build_anatomy(rngs["anatomy"], grid, cfg.tumor_count, cfg.tumor_types)
    arrays, misregistration = render_images(anat.tissue, grid, cfg, rngs)

    nz, ny, nx = cfg.shape
    sx, sy, sz = cfg.spacing
    centre = np.array([0.0, 0.0, CENTRE_Z_MM])
    origin = tuple(float(v) for v in centre - (np.array([nx, ny, nz]) - 1) / 2.0 * np.array([sx, sy, sz]))

    def vol(a: np.ndarray, name: str) -> Volume:
        return Volume(a, cfg.spacing, origin, _IDENTITY, source=f"phantom seed {seed}: {name}")

    images = {m: vol(arrays[m], m) for m in MODALITIES}
    masks = {"liver": vol(anat.liver.astype(np.float32), "liver"),
             "tumor": vol(anat.tumor.astype(np.float32), "tumor"),
             "labels": vol(anat.labels.astype(np.float32), "labels")}

    scale = np.array([grid.scale_xy, grid.scale_xy, grid.scale_z])
    voxel_ml = sx * sy * sz / 1000.0
    necrotic = anat.tissue == _anatomy.T_NECROTIC
    tumors = []
    for t in anat.info["tumors"]:
        m, box = t["mask"], t["box"]
        world = t["centre"] * scale + centre
        tumors.append({
            "type": t["type"],
            "centre_mm": [round(float(v), 3) for v in world],
            "centre_index_zyx": [round(float(v), 2) for v in grid.to_index(t["centre"])],
            "radii_mm": [round(float(v), 2) for v in t["radii"] * scale],
            "rim_mm": round(t["rim_mm"] * float(grid.scale_xy), 2),
            "voxels": int(m.sum()),
            "volume_ml": round(float(m.sum()) * voxel_ml, 3),
            "necrotic_voxels": int((m & necrotic[box]).sum()),
        })
    body = anat.info["body"]
    info = {
        "seed": seed,
        "generator": "MedTranslateLib.phantom",
        "config": cfg.to_dict(),
        "modalities": list(MODALITIES),
        "source_modalities": list(SOURCE_MODALITIES),
        "target_modalities": list(TARGET_MODALITIES),
        "units": {"ct": "HU", "cta_arterial": "HU", "cta_portal": "HU", "t1": "a.u.",
                  "t1_post": "a.u.", "t2": "a.u."},
        "phases": {"cta_arterial": "late arterial (~35 s)", "cta_portal": "portal venous (~70 s)",
                   "t1_post": "portal venous (~70 s), gadolinium"},
        "labels": dict(LABELS),
        "regions": region_table(),
        "frame": ("LPS, identity direction; arrays (z, y, x); x to the patient's left (liver at "
                  "small x), y posterior, z superior; masks in the source frame (ct, t1)"),
        "anatomy_scale": {"xy": round(float(grid.scale_xy), 4), "z": round(float(grid.scale_z), 4)},
        "habitus": round(float(body["habitus"]), 3),
        "tumors": tumors,
        "misregistration": misregistration,
        "misregistration_convention": ("target(p) = anatomy(R (p - c) + c + t), p in mm (x, y, z), "
                                       "c the volume centre, R = Rz Ry Rx of rotation_deg"),
    }
    return PhantomCase(images=images, masks=masks, seed=seed, info=info)


def write_case(case: PhantomCase, folder: str | os.PathLike) -> Path:
    """Write the 6 modalities and 3 masks as ``<name>.nii.gz``, the label regions' table
    (``cases.REGION_TABLE``) and ``phantom.json`` (the case info) into ``folder`` (created);
    returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODALITIES:
        write_volume(case.images[name], folder / f"{name}.nii.gz")
    for name in MASKS:
        write_volume(case.masks[name], folder / f"{name}.nii.gz")
    write_region_table(folder, case.info["regions"])
    (folder / "phantom.json").write_text(json.dumps(case.info, indent=2) + "\n")
    return folder


def write_phantom_dataset(out: str | os.PathLike, cases: int = 1, seed: int = 0,
                          config: PhantomConfig | None = None) -> list[Path]:
    """Generate and write ``cases`` cases to ``out/case_000``, ``out/case_001``, ...; case ``i``
    uses :func:`case_seed` ``(seed, i)``. Returns the case folders."""
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise ValueError(f"phantom cases must be an integer >= 1, got {cases!r}")
    seed = _check_seed(seed)
    cfg = config if config is not None else PhantomConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    width = max(3, len(str(int(cases) - 1)))
    folders = []
    for i in range(int(cases)):
        case = generate_case(case_seed(seed, i), cfg)
        folders.append(write_case(case, out / f"case_{i:0{width}d}"))
    return folders
