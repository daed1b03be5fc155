"""MRML nodes <-> ``io.Volume`` and masks: geometry (RAS/LPS, parent transforms), segmentations
and labelmaps on the source grid, node attributes (modality)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .. import io as mio
from ..modality import from_dicom

ATTRIBUTE_PREFIX = "MedTranslate."
SYNTHETIC_ATTRIBUTE = "MedTranslate.Synthetic"
ROLE_ATTRIBUTE = "MedTranslate.Role"
MODALITY_ATTRIBUTE = "MedTranslate.Modality"
DICOM_MODALITY_ATTRIBUTE = "DICOM.Modality"
BINARY_LABELMAP = "Binary labelmap"

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


# ---------------------------------------------------------------------------------------------
# matrices and geometry
# ---------------------------------------------------------------------------------------------
def _to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _to_vtk(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(array[i, j]))
    return matrix


def _name(node: Any) -> str:
    return node.GetName() or node.GetID() or type(node).__name__


def _parent_transform_matrix(node: Any, frame_node: Any | None) -> np.ndarray | None:
    """4x4 RAS matrix from ``node``'s parent frame to ``frame_node``'s parent frame; None when
    both are under the same transform (or none). Non-linear transforms raise ValueError."""
    if frame_node is None:
        return None
    src, dst = node.GetParentTransformNode(), frame_node.GetParentTransformNode()
    if src is dst or (src is not None and dst is not None and src.GetID() == dst.GetID()):
        return None
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(src, dst, matrix):
        raise ValueError(f"{_name(node)}: it and {_name(frame_node)} are under different non-linear "
                         f"transforms; harden the transforms (Data module) first")
    m = _to_numpy(matrix)
    return None if np.allclose(m, np.eye(4), atol=1e-12) else m


def _volume_from_ijk_to_ras(array: np.ndarray, ijk_to_ras: np.ndarray, extent_start: Sequence[int],
                            source: str) -> mio.Volume:
    """Volume (LPS) from a (z, y, x) array whose voxel (i, j, k) + ``extent_start`` maps to RAS
    through ``ijk_to_ras`` (4x4)."""
    lps = _LPS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{source}: the IJK to RAS matrix is singular")
    direction = lps / spacing
    origin_ras = ijk_to_ras @ np.array([*extent_start, 1.0])
    origin = _LPS @ origin_ras[:3]
    return mio.Volume(array, tuple(spacing), tuple(origin), tuple(direction.ravel()), source=source)


def _image_array(image: vtk.vtkImageData, what: str) -> np.ndarray:
    """(z, y, x) copy of a single-component vtkImageData's scalars (original dtype)."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise ValueError(f"{what}: the node has no image data")
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"{what}: {scalars.GetNumberOfComponents()}-component voxels (e.g. RGB or vector) "
                         f"are not supported; expected a scalar volume")
    nx, ny, nz = image.GetDimensions()
    return np.array(numpy_support.vtk_to_numpy(scalars)).reshape(nz, ny, nx)


def volume_from_node(node: Any, *, frame_node: Any | None = None) -> mio.Volume:
    """``io.Volume`` (float32 copy, LPS) of a scalar or labelmap volume node.

    ``frame_node``: express the geometry in that node's frame (the linear transform between the
    two nodes' parent transforms is applied). The node is only read."""
    if node is None:
        raise ValueError("no volume node given")
    what = _name(node)
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"{what}: the volume node has no image data")
    array = _image_array(image, what).astype(np.float32)
    if array.size == 0:
        raise ValueError(f"{what}: the volume is empty")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _to_numpy(matrix)
    to_frame = _parent_transform_matrix(node, frame_node)
    if to_frame is not None:
        ijk_to_ras = to_frame @ ijk_to_ras
    extent = image.GetExtent()
    return _volume_from_ijk_to_ras(array, ijk_to_ras, (extent[0], extent[2], extent[4]), what)


def update_node_from_volume(node: Any, volume: mio.Volume) -> Any:
    """Put ``volume`` (data and geometry, LPS -> RAS) into ``node`` (float32 image data)."""
    nz, ny, nx = volume.shape
    image = vtk.vtkImageData()
    image.SetDimensions(nx, ny, nz)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(volume.array, dtype=np.float32).ravel(),
                                         deep=True, array_type=vtk.VTK_FLOAT)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    direction = _LPS @ volume.direction_matrix
    directions = np.eye(4)
    directions[:3, :3] = direction
    was_modifying = node.StartModify()
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(_LPS @ np.asarray(volume.origin)))
    node.SetIJKToRASDirectionMatrix(_to_vtk(directions))
    node.SetAndObserveImageData(image)
    node.EndModify(was_modifying)
    return node


def add_volume_node(scene: Any, volume: mio.Volume, name: str, *,
                    class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in ``scene`` holding ``volume``, with default display nodes."""
    node = scene.AddNewNodeByClass(class_name, name)
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------------------
# masks from segmentations and labelmaps
# ---------------------------------------------------------------------------------------------
_ROLE_NAMES = {
    "liver": ("liver",),
    "tumor": ("tumor", "tumour", "lesion", "cancer", "hcc", "metasta", "nodule"),
}


def _is_segmentation(node: Any) -> bool:
    return node is not None and node.IsA("vtkMRMLSegmentationNode")


def mask_choices(node: Any) -> list[tuple[str, str]]:
    """``[(label, key)]`` of the regions ``node`` offers: its segments (key = segment ID) for a
    segmentation; "all labels" (key ``nonzero``) and each label value (key ``label:N``) for a
    labelmap volume; [] for None."""
    if node is None:
        return []
    if _is_segmentation(node):
        segmentation = node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        return [(segmentation.GetSegment(i).GetName() or i, i) for i in ids]
    array = _image_array(node.GetImageData(), _name(node))
    values = [v for v in np.unique(array).tolist() if v != 0][:255]
    return [("all labels (> 0)", "nonzero")] + [(f"label {_label_text(v)}", f"label:{_label_text(v)}")
                                                for v in values]


def _label_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def default_mask_choice(node: Any, role: str) -> str | None:
    """The key to preselect for ``role`` ("liver" / "tumor"): the segment whose name says so
    (the first segment for a one-segment segmentation); for a labelmap, label 2 for the tumor when
    present (LiTS: 1 liver, 2 tumor), else all labels."""
    choices = mask_choices(node)
    if not choices:
        return None
    if _is_segmentation(node):
        for label, key in choices:
            if any(word in label.lower() for word in _ROLE_NAMES.get(role, (role,))):
                return key
        return choices[0][1] if len(choices) == 1 else None
    keys = [key for _, key in choices]
    if role == "tumor" and "label:2" in keys:
        return "label:2"
    return "nonzero"


def _ensure_segmentation_converters() -> None:
    """Register the labelmap <-> surface conversion rules when nothing did (plain MRML; in
    Slicer the Segmentations module has registered them)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByRepresentation(BINARY_LABELMAP) is None:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _segment_labelmap(node: Any, segment_id: str) -> tuple[Any, int]:
    """(vtkOrientedImageData, label value) of a segment; converts a copy of the segmentation when
    it has no binary labelmap (the input node is never changed)."""
    segmentation = node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        names = ", ".join(label for label, _ in mask_choices(node)) or "none"
        raise ValueError(f"{_name(node)}: no segment {segment_id!r} (segments: {names})")
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        _ensure_segmentation_converters()
        copy = slicer.vtkSegmentation()
        copy.DeepCopy(segmentation)
        if not copy.CreateRepresentation(BINARY_LABELMAP):
            raise ValueError(f"{_name(node)}: cannot convert segment {segment_id!r} to a binary labelmap")
        segmentation = copy
    segment = segmentation.GetSegment(segment_id)
    return segment.GetRepresentation(BINARY_LABELMAP), int(segment.GetLabelValue())


def _oriented_image_volume(image: Any, to_frame: np.ndarray | None, source: str) -> mio.Volume | None:
    """Volume of a vtkOrientedImageData (None when its extent is empty)."""
    extent = image.GetExtent() if image is not None else (0, -1, 0, -1, 0, -1)
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None
    array = _image_array(image, source).astype(np.float32)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk_to_ras = _to_numpy(matrix)
    if to_frame is not None:
        ijk_to_ras = to_frame @ ijk_to_ras
    return _volume_from_ijk_to_ras(array, ijk_to_ras, (extent[0], extent[2], extent[4]), source)


def mask_from_node(node: Any, key: str, like: mio.Volume, *, frame_node: Any | None = None) -> np.ndarray:
    """Boolean (z, y, x) mask on ``like``'s grid from a segment (key = segment ID) of a
    segmentation node or a labelmap volume (key ``nonzero`` or ``label:N``).

    ``frame_node``: the node ``like`` was read from (parent transforms are accounted for). The
    region is resampled nearest-neighbour (SimpleITK, as ``io.read_mask``); outside it is False.
    """
    if node is None:
        raise ValueError("no mask node given")
    what = _name(node)
    to_frame = _parent_transform_matrix(node, frame_node)
    if _is_segmentation(node):
        image, label = _segment_labelmap(node, key)
        volume = _oriented_image_volume(image, to_frame, f"{what}: {key}")
        if volume is None:
            return np.zeros(like.shape, dtype=bool)
        region = volume.with_array(volume.array == label)
    else:
        volume = volume_from_node(node, frame_node=frame_node)
        if key == "nonzero":
            inside = volume.array != 0
        elif isinstance(key, str) and key.startswith("label:"):
            try:
                value = float(key.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"{what}: invalid label {key!r}") from None
            inside = volume.array == value
        else:
            raise ValueError(f"{what}: unknown region {key!r} of a labelmap (use 'nonzero' or 'label:N')")
        region = volume.with_array(inside)
    if not region.same_geometry(like, atol=1e-4):
        region = mio.resample_mask_like(region, like)
    return region.array > 0.5


# ---------------------------------------------------------------------------------------------
# modalities, dependencies (model lists, options and errors: ``app``; names: ``modality``)
# ---------------------------------------------------------------------------------------------
def source_modality(node: Any) -> str | None:
    """What the volume is, as far as the scene says: the ``MedTranslate.Modality`` attribute, then
    the DICOM modality (node or subject-hierarchy item attribute ``DICOM.Modality``); None when
    unknown."""
    if node is None:
        return None
    value = node.GetAttribute(MODALITY_ATTRIBUTE)
    if value:
        return value
    dicom = node.GetAttribute(DICOM_MODALITY_ATTRIBUTE)
    scene = node.GetScene()
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if not dicom and sh is not None:
        item = sh.GetItemByDataNode(node)
        if item:
            dicom = sh.GetItemAttribute(item, DICOM_MODALITY_ATTRIBUTE) or sh.GetItemAttribute(
                sh.GetItemParent(item), DICOM_MODALITY_ATTRIBUTE)
    if dicom:
        return from_dicom(dicom)
    return None


