"""How slices are taken from volumes: ``SliceSpec``, the one spec training, bundles and the engine share.

Its own module without torch, so that a front end can read a bundle's metadata (``bundle.BundleMeta``
holds a ``SliceSpec``) without importing torch: the Slicer panel lists models on its GUI thread.
``data`` slices volumes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SliceSpec"]


@dataclass
class SliceSpec:
    """How slices are taken from volumes.

    ``size``: output H = W. ``axis``: slicing axis of (z, y, x) volumes (0 = axial).
    ``roi``: a mask name ("tumor", "liver"): keep only slices within ``roi_margin`` of the slice
    where that mask is largest (cases without it are skipped). ``min_foreground``: skip slices
    whose body fraction is below this. ``margin``: body box margin (fraction of its size)."""

    size: int = 128
    axis: int = 0
    roi: str | None = None
    roi_margin: int = 4
    min_foreground: float = 0.0
    margin: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"SliceSpec: size must be a positive int, got {self.size!r}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"SliceSpec: axis must be 0, 1 or 2 (z, y, x), got {self.axis!r}")
        if self.roi is not None and not isinstance(self.roi, str):
            raise ValueError(f"SliceSpec: roi must be a mask name or None, got {self.roi!r}")
        if not isinstance(self.roi_margin, int) or self.roi_margin < 0:
            raise ValueError(f"SliceSpec: roi_margin must be an int >= 0, got {self.roi_margin!r}")
        if not 0.0 <= float(self.min_foreground) <= 1.0:
            raise ValueError(f"SliceSpec: min_foreground must be in [0, 1], got {self.min_foreground!r}")
        if not 0.0 <= float(self.margin) <= 1.0:
            raise ValueError(f"SliceSpec: margin must be in [0, 1], got {self.margin!r}")
