"""Cases: the one reader of case folders, the one case split, and the in-memory ``Case``.

A *case folder* holds one file per modality and per mask, named by its stem: ``ct.nii.gz``,
``cta_arterial.nrrd``, ``t1.mha``, ``liver.nii.gz``, ``tumor.nii.gz``, ``labels.nii.gz``
(0 = outside the body), ... Any extension ``io.read_volume`` reads works, and a sub-folder named
after the stem is read as a DICOM series. Beside the label map, ``regions.json`` may say which of
its values form each *label region* (``regions.LABEL_REGIONS``: aorta, kidney), e.g.
``{"aorta": [8], "kidney": [12, 13]}``; the phantom writes one, so evaluation can judge a model
where contrast appears.

- ``find_cases`` / ``find_volume_file``: discovery; ``split_cases``: the deterministic split;
  ``model_split``: which cases a model trained on, validated on and was tested on (training and
  evaluation both call it, so ``evaluate --split test`` is the test set training left out).
- ``CaseFiles``: the files of one case (source, reference, masks by name); ``case_files`` reads
  a folder, ``CaseFiles.single`` names files given one by one (the CLI's flags, a GUI).
- ``Case``: the volumes, read (``read_case``): source, masks by name on the source grid,
  reference.
- ``read_region_table`` / ``write_region_table`` / ``label_region_masks``: the label regions of
  a case.

torch-free (numpy, SimpleITK through ``io``): the Slicer panel and the CLI use it before any
model is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import io as mio
from .regions import BODY, DEFAULT_ROIS, LABEL_REGIONS

__all__ = ["BODY_LABELS", "REGION_TABLE", "volume_stem", "find_volume_file", "find_cases", "split_cases", "SPLITS",
           "model_split", "read_region_table", "write_region_table", "label_region_masks", "CaseFiles",
           "case_files", "find_case_files", "Case", "read_case"]

#: The splits of ``split_cases``, in order.
SPLITS = ("train", "val", "test")

#: Stem of the label map whose non-zero voxels are the body.
BODY_LABELS = "labels"
#: File beside the label map: label region name -> the label values that form it (JSON).
REGION_TABLE = "regions.json"


def volume_stem(path: Path) -> str | None:
    """Volume stem of a file (``ct`` for ``ct.nii.gz``), None when not a volume file."""
    name = path.name
    lower = name.lower()
    for ext in mio.FILE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def find_volume_file(case: str | os.PathLike, stem: str) -> Path | None:
    """The file (or DICOM series folder) for ``stem`` in a case folder; None when absent.
    Raises ValueError when several files match (e.g. ``ct.nii.gz`` and ``ct.nrrd``)."""
    case = Path(case)
    matches = sorted(p for p in case.iterdir() if p.is_file() and volume_stem(p) == stem)
    sub = case / stem
    if sub.is_dir() and any(p.is_file() for p in sub.iterdir()):
        matches.append(sub)
    if len(matches) > 1:
        raise ValueError(f"{case}: several files for {stem!r}: {', '.join(p.name for p in matches)}")
    return matches[0] if matches else None


def _case_stems(folder: Path) -> set[str]:
    stems = set()
    for p in folder.iterdir():
        if p.is_file():
            s = volume_stem(p)
            if s:
                stems.add(s)
    return stems


def find_cases(root: str | os.PathLike, required: Sequence[str] = ()) -> list[Path]:
    """Case folders under ``root`` (sorted by path) holding every stem in ``required``.

    A case folder is a directory with at least one volume file; ``root`` itself counts when it
    is one, otherwise sub-folders are searched (a case's own sub-folders are not).
    Raises ValueError when ``root`` is missing or no case qualifies."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: case root folder not found")
    required = tuple(required)
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        if _case_stems(folder):
            found.append(folder)
            continue
        stack.extend(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    cases = sorted((c for c in found if all(find_volume_file(c, s) is not None for s in required)),
                   key=lambda p: str(p))
    if not cases:
        want = f" with {', '.join(required)}" if required else ""
        extra = f" ({len(found)} case folders lack some of them)" if found and required else ""
        raise ValueError(f"{root}: no case folders{want} found{extra}; expected folders of volume "
                         f"files ({', '.join(mio.FILE_EXTENSIONS)}) named by modality/mask")
    return cases


def split_cases(cases: Sequence[str | os.PathLike], ratios: Sequence[float] = (7, 1, 2),
                seed: int = 0) -> dict[str, list[Path]]:
    """Deterministic case-level train/val/test split.

    The cases are sorted by folder name (then full path), shuffled with ``seed`` and cut by
    ``ratios`` (largest-remainder rounding), so the result depends on names and seed only, never
    on the order given. Each case lands in exactly one split; with >= 3 cases val and test get at
    least one each. Lists are returned sorted."""
    paths = [Path(c) for c in cases]
    if len({str(p) for p in paths}) != len(paths):
        raise ValueError("split_cases: duplicate cases given")
    ratios = [float(r) for r in ratios]
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"split_cases: ratios must be 3 non-negative numbers (train, val, test), got {ratios}")
    ordered = sorted(paths, key=lambda p: (p.name, str(p)))
    n = len(ordered)
    exact = [n * r / sum(ratios) for r in ratios]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(3), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:
        for i in (1, 2):  # val, test non-empty: take from the largest split
            if counts[i] == 0:
                counts[i] = 1
                counts[int(np.argmax(counts))] -= 1
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in perm]
    out, start = {}, 0
    for key, count in zip(("train", "val", "test"), counts, strict=True):
        out[key] = sorted(shuffled[start:start + count], key=lambda p: (p.name, str(p)))
        start += count
    return out


# ---------------------------------------------------------------------------------------------
# the split a model was trained with
# ---------------------------------------------------------------------------------------------
def model_split(root: str | os.PathLike, source: str, target: str, *, paired: bool,
                ratios: Sequence[float] = (7, 1, 2), seed: int = 0) -> dict[str, list[Path]]:
    """The train / val / test case folders under ``root`` for a model translating ``source`` to
    ``target``: the cases split are those holding both volumes when the model trains ``paired``,
    every case folder otherwise (unpaired training takes either side from any case). Training
    (``training.case_splits``) and evaluation (``evaluation.evaluate_bundle``) both call this with
    the values the bundle records, so they agree on every case."""
    cases = find_cases(root, required=(source, target) if paired else ())
    return split_cases(cases, ratios=ratios, seed=seed)


# ---------------------------------------------------------------------------------------------
# label regions
# ---------------------------------------------------------------------------------------------
def read_region_table(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The label regions of a case folder from its ``REGION_TABLE``: name -> label values, in
    ``LABEL_REGIONS`` order; {} when the folder has no table. ValueError names the file when it
    is not a JSON object mapping label region names to lists of positive integers."""
    path = Path(folder) / REGION_TABLE
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON region table ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected an object of region name -> label values")
    unknown = sorted(set(table) - set(LABEL_REGIONS))
    if unknown:
        raise ValueError(f"{path}: unknown label regions {', '.join(unknown)}; known: {', '.join(LABEL_REGIONS)}")
    out = {}
    for name in (r for r in LABEL_REGIONS if r in table):
        values = table[name]
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
            raise ValueError(f"{path}: {name!r} must be a non-empty list of label values > 0, got {values!r}")
        out[name] = tuple(values)
    return out


def write_region_table(folder: str | os.PathLike, table: Mapping[str, Sequence[int]]) -> Path:
    """Write ``REGION_TABLE`` (label region name -> label values) into ``folder``; returns its path."""
    path = Path(folder) / REGION_TABLE
    path.write_text(json.dumps({name: [int(v) for v in values] for name, values in table.items()}, indent=2) + "\n",
                    encoding="utf-8")
    return path


def label_region_masks(labels: np.ndarray, table: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """name -> (z, y, x) bool: the voxels of the label map ``labels`` holding one of the
    region's values (``table``: ``read_region_table``)."""
    labels = np.asarray(labels)
    return {name: np.isin(labels, np.asarray(values, dtype=labels.dtype)) for name, values in table.items()}


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseFiles:
    """The files of one case: ``source`` volume, optional ``reference`` (the real target), and
    masks by name (ROI names, plus ``body`` for the label map whose non-zero voxels are the body).
    ``label_regions``: name -> values of the ``body`` label map that form it (``read_region_table``);
    ``read_case`` adds their masks."""

    name: str
    source: Path
    reference: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)
    label_regions: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def single(cls, source: str | os.PathLike, *, reference: str | os.PathLike | None = None,
               masks: Mapping[str, str | os.PathLike | None] | None = None, name: str | None = None) -> CaseFiles:
        """A case from files given one by one (None entries are left out)."""
        source = Path(source)
        return cls(name=name or source.name, source=source,
                   reference=Path(reference) if reference is not None else None,
                   masks={k: Path(v) for k, v in (masks or {}).items() if v is not None})

    @property
    def inputs(self) -> list[Path]:
        """Every path this case reads (outputs must never touch them)."""
        return [self.source, *([self.reference] if self.reference else []), *self.masks.values()]


def case_files(folder: str | os.PathLike, source: str, target: str | None,
               roi_names: Iterable[str] = DEFAULT_ROIS, *, name: str | None = None,
               label_regions: bool = False) -> CaseFiles:
    """The ``CaseFiles`` of a case folder: ``<source>.*``, ``<target>.*`` when present, one mask per
    ROI name present, and ``labels.*`` as the ``body`` mask; with ``label_regions``, the folder's
    region table too (when it has a label map). ValueError when the source is missing."""
    folder = Path(folder)
    src = find_volume_file(folder, source)
    if src is None:
        raise ValueError(f"{folder}: no {source!r} volume")
    masks = {}
    for roi in (*roi_names, BODY):
        path = find_volume_file(folder, BODY_LABELS if roi == BODY else roi)
        if path is not None:
            masks[roi] = path
    ref = find_volume_file(folder, target) if target else None
    table = read_region_table(folder) if label_regions and BODY in masks else {}
    return CaseFiles(name=name or folder.name, source=src, reference=ref, masks=masks, label_regions=table)


def find_case_files(root: str | os.PathLike, source: str, target: str | None,
                    roi_names: Iterable[str] = DEFAULT_ROIS) -> list[CaseFiles]:
    """``case_files`` of every case folder under ``root`` holding ``<source>.*`` (names relative to
    ``root``; ``root``'s own name when it is the case). ValueError when there is none."""
    root = Path(root)
    roi_names = tuple(roi_names)
    out = []
    for folder in find_cases(root, required=[source]):
        rel = folder.relative_to(root)
        out.append(case_files(folder, source, target, roi_names,
                              name=root.name if str(rel) == "." else rel.as_posix()))
    return out


@dataclass
class Case:
    """One case in memory. ``masks``: name -> (z, y, x) bool on the source grid (``body`` among
    them when the case has a label map, and its label regions when they were asked for);
    ``reference``: the real target on the source grid, or None."""

    name: str
    source: mio.Volume
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    reference: mio.Volume | None = None

    def mask(self, name: str) -> np.ndarray:
        """The named mask, or an empty one when the case has none of that name."""
        m = self.masks.get(name)
        return m if m is not None else np.zeros(self.source.shape, dtype=bool)


def read_case(files: CaseFiles) -> Case:
    """Read a case: masks (nearest neighbour) and the reference (linear) onto the source grid
    when their geometry differs; the label regions' masks from the ``body`` label map. Read
    errors name the file (``io``)."""
    src = mio.read_volume(files.source)
    masks = {}
    for name, path in files.masks.items():
        labels = mio.read_mask(path, like=src).array
        masks[name] = labels > 0.5
        if name == BODY:
            masks.update(label_region_masks(labels, files.label_regions))
    ref = None
    if files.reference is not None:
        ref = mio.read_volume(files.reference)
        if not ref.same_geometry(src, atol=1e-4):
            ref = mio.resample_like(ref, src, interpolation="linear", default=float(ref.array.min()))
    return Case(files.name, src, masks, ref)
