"""How slices are taken from volumes: ``SliceSpec``, the one spec training, bundles and the engine share.

Its own module without torch, so that a front end can read a bundle's metadata (``bundle.BundleMeta``
holds a ``SliceSpec``) without importing torch: the Slicer panel lists models on its GUI thread.
``data`` slices volumes with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SliceSpec", "MAX_SLICE_SIZE", "MAX_ROI_MARGIN"]

#: Largest ``SliceSpec.size``. Clinical CT and MR slices are at most 1024 x 1024 (512 x 512 is
#: usual); a 4096 x 4096 slice is already 64 MiB per channel in float32 and a U-Net's activations
#: at that size need tens of GiB, so a larger value is a typo or a hostile bundle, refused in
#: one line rather than failing later with an out-of-memory error.
MAX_SLICE_SIZE = 4096
#: Largest ``SliceSpec.roi_margin`` (slices on each side of the ROI's largest slice): more than
#: any scan has along one axis (a whole-body CT at 0.5 mm has about 4000 slices).
MAX_ROI_MARGIN = 10_000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


@dataclass
class SliceSpec:
    """How slices are taken from volumes.

    ``size``: output H = W (1..``MAX_SLICE_SIZE``). ``axis``: slicing axis of (z, y, x) volumes
    (0 = axial). ``roi``: a mask name ("tumor", "liver"): keep only slices within ``roi_margin``
    (0..``MAX_ROI_MARGIN``) of the slice where that mask is largest (cases without it are
    skipped). ``min_foreground``: skip slices whose body fraction is below this. ``margin``: body
    box margin (fraction of its size). Any other value raises ValueError (one line)."""

    size: int = 128
    axis: int = 0
    roi: str | None = None
    roi_margin: int = 4
    min_foreground: float = 0.0
    margin: float = 0.05

    def __post_init__(self) -> None:
        if not _is_int(self.size) or not 1 <= self.size <= MAX_SLICE_SIZE:
            raise ValueError(f"SliceSpec: size must be an int from 1 to {MAX_SLICE_SIZE}, got {self.size!r}")
        if not _is_int(self.axis) or self.axis not in (0, 1, 2):
            raise ValueError(f"SliceSpec: axis must be 0, 1 or 2 (z, y, x), got {self.axis!r}")
        if self.roi is not None and not isinstance(self.roi, str):
            raise ValueError(f"SliceSpec: roi must be a mask name or None, got {self.roi!r}")
        if not _is_int(self.roi_margin) or not 0 <= self.roi_margin <= MAX_ROI_MARGIN:
            raise ValueError(f"SliceSpec: roi_margin must be an int from 0 to {MAX_ROI_MARGIN}, "
                             f"got {self.roi_margin!r}")
        if not _is_fraction(self.min_foreground):
            raise ValueError(f"SliceSpec: min_foreground must be in [0, 1], got {self.min_foreground!r}")
        if not _is_fraction(self.margin):
            raise ValueError(f"SliceSpec: margin must be in [0, 1], got {self.margin!r}")
