"""Regions: the one home of the mask vocabulary and of the regions metrics are reported for.

A model is trained with named ROI masks (``data.masks`` of its training config, kept in its
bundle); liver and tumour are only the default, for the abdominal CT/MR models this project
started with. A T1 -> T2 brain model may name ``lesion``, a CT -> PET model ``lymph_nodes``.
Metrics are reported for the whole volume, the body, each ROI, then each *label region* the case
provides, in this order.

Label regions are evaluation regions a case derives from its label map, whatever the model
trained with: the ones a CT -> CTA method is judged in, where contrast actually appears (in the
phantom's late arterial phase the aorta enhances by ~300 HU, the renal cortex by ~160 HU, the
liver by only ~15 HU). Which label values form each is the case's own record (``cases``: the
region table beside the label map, written by ``phantom``); this module only names and orders them.

Leaf module: nothing of the library is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["WHOLE", "BODY", "DEFAULT_ROIS", "BASE_REGIONS", "AORTA", "KIDNEY", "LABEL_REGIONS",
           "metric_regions", "ordered_regions", "roi_names_from_training"]

WHOLE = "whole"
#: The body mask: non-zero voxels of a case's ``labels`` map, else found from the intensities.
BODY = "body"
#: ROI mask names when a model says nothing else.
DEFAULT_ROIS: tuple[str, ...] = ("liver", "tumor")
#: Regions every metrics table has, before the ROIs.
BASE_REGIONS: tuple[str, ...] = (WHOLE, BODY)
AORTA = "aorta"
KIDNEY = "kidney"
#: Regions a case may derive from its label map, reported after the ROIs.
LABEL_REGIONS: tuple[str, ...] = (AORTA, KIDNEY)


def metric_regions(roi_names: Iterable[str] = DEFAULT_ROIS) -> tuple[str, ...]:
    """Regions of a metrics table, in order: whole, body, then the ROIs."""
    rois = [r for r in dict.fromkeys(roi_names) if r not in BASE_REGIONS]
    return (*BASE_REGIONS, *rois)


def ordered_regions(names: Iterable[str], roi_names: Sequence[str] = DEFAULT_ROIS) -> list[str]:
    """``names`` in table order: the regions of ``metric_regions(roi_names)`` first, then the
    ``LABEL_REGIONS``, the rest after."""
    names = list(dict.fromkeys(names))
    known = [r for r in dict.fromkeys((*metric_regions(roi_names), *LABEL_REGIONS)) if r in names]
    return known + [r for r in names if r not in known]


def roi_names_from_training(training: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The ROI names a bundle's ``training`` record says the model was trained with
    (``training.config.data.masks``, or ``training.data.masks``); ``DEFAULT_ROIS`` otherwise."""
    if not isinstance(training, Mapping):
        return DEFAULT_ROIS
    config = training.get("config")
    for data in ((config.get("data") if isinstance(config, Mapping) else None), training.get("data")):
        if isinstance(data, Mapping) and isinstance(data.get("masks"), (list, tuple)):
            names = tuple(str(m) for m in data["masks"] if str(m) != BODY)
            if names:
                return names
    return DEFAULT_ROIS
