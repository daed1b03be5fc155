"""Sample data: a phantom case as source, reference and a segmentation node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .. import io as mio
from ..modality import modality_label
from .nodes import (
    _LPS,
    BINARY_LABELMAP,
    MODALITY_ATTRIBUTE,
    _ensure_segmentation_converters,
    _to_vtk,
    add_volume_node,
)
from .results import _display


# ---------------------------------------------------------------------------------------------
# sample data
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleNodes:
    source: Any
    reference: Any
    segmentation: Any


_SEGMENT_COLORS = {"liver": (0.86, 0.55, 0.42), "tumor": (0.98, 0.85, 0.25)}


def _oriented_image(mask: np.ndarray, like: mio.Volume) -> Any:
    """vtkOrientedImageData (unsigned char 0/1) of a (z, y, x) mask on ``like``'s grid."""
    image = slicer.vtkOrientedImageData()
    nz, ny, nx = mask.shape
    image.SetDimensions(nx, ny, nz)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _LPS @ like.direction_matrix * np.asarray(like.spacing)
    ijk_to_ras[:3, 3] = _LPS @ np.asarray(like.origin)
    image.SetImageToWorldMatrix(_to_vtk(ijk_to_ras))
    return image


def sample_node_names(prefix: str, source: str = "ct", reference: str | None = "cta_arterial") -> list[str]:
    """Names of the nodes ``add_phantom_case`` adds: source, reference (when given), segmentation."""
    return [f"{prefix} {modality_label(source)}", *([f"{prefix} {modality_label(reference)}"] if reference else []),
            f"{prefix} liver and tumor"]


def add_phantom_case(scene: Any, case: Any, *, source: str = "ct", reference: str | None = "cta_arterial",
                     prefix: str | None = None) -> SampleNodes:
    """Put a ``phantom.PhantomCase`` into the scene: the source and reference volumes (tagged
    with their modality) and a segmentation with "liver" and "tumor" segments, in one
    subject-hierarchy study. Nothing is downloaded."""
    prefix = prefix or f"Phantom {case.seed}"
    names = sample_node_names(prefix, source, reference)
    src = case.images[source]
    source_node = add_volume_node(scene, src, names[0])
    source_node.SetAttribute(MODALITY_ATTRIBUTE, source)
    reference_node = None
    if reference:
        reference_node = add_volume_node(scene, case.images[reference], names[1])
        reference_node.SetAttribute(MODALITY_ATTRIBUTE, reference)
    _ensure_segmentation_converters()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", names[-1])
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(source_node)
    segmentation = segmentation_node.GetSegmentation()
    for name in (m for m in case.masks if m in _SEGMENT_COLORS):  # the phantom's ROI masks
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*_SEGMENT_COLORS[name])
        segment.AddRepresentation(BINARY_LABELMAP, _oriented_image(case.masks[name].array > 0.5, src))
        segmentation.AddSegment(segment, name)
    for node in (source_node, reference_node):
        if node is not None:
            windows = {"ct": (400.0, 40.0), "cta_arterial": (1000.0, 200.0), "cta_portal": (400.0, 60.0)}
            modality = node.GetAttribute(MODALITY_ATTRIBUTE)
            if modality in windows:
                _display(node, *windows[modality])
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is not None:
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), f"MedTranslate phantom (seed {case.seed})")
        study = sh.CreateStudyItem(patient, "Phantom study")
        for node in (source_node, reference_node, segmentation_node):
            if node is not None:
                item = sh.GetItemByDataNode(node)
                if item:
                    sh.SetItemParent(item, study)
                else:
                    sh.CreateItem(study, node)
    return SampleNodes(source_node, reference_node, segmentation_node)
