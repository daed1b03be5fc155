"""Slicer MRML nodes <-> the engine: everything the Slicer module does that touches MRML but not Qt.

Runs inside Slicer and, for the tests, in plain Python with the ``slicer-core`` package (real
MRML, no application): it uses only MRML, VTK and numpy (+ the library). torch is imported only
by the functions that run the engine or list models and devices.

Conventions
    MRML stores a volume as ``vtkImageData`` (x fastest, i.e. a (z, y, x) numpy array) plus an
    IJK -> RAS matrix. ``io.Volume`` is LPS (SimpleITK): ``LPS = diag(-1, -1, 1) @ RAS``. A node
    under a parent transform is read in its own (local) frame; when two nodes are combined (masks
    or reference vs. source), the linear transform between their parents is applied to the
    geometry. Non-linear transforms must be hardened first (ValueError).

Flow (the module's Logic is a thin adapter over this)
    ``TranslationRun(scene, source_node, options, liver=..., tumor=..., reference_node=...)``
    reads the inputs on the calling (GUI) thread; ``run.work(progress, cancel)`` loads the model
    and translates (any thread: it touches no node); ``run.finish(result)`` adds the result nodes
    (GUI thread). Input nodes are only read. A cancelled or failed run adds nothing.

Results: ``"<source> – synthetic <target> (<method>)"`` scalar volume tagged with node attributes
``MedTranslate.Synthetic = 1`` (+ role, method, model, seed, ...), difference heatmaps (vs.
source; vs. reference) with a diverging colour table centred on 0, uncertainty with a heat
colour table, a metrics table (MAE/PSNR/SSIM/RMSE per region) and a per-slice confidence table
where the method gives them; placed in the source's subject-hierarchy study and parent transform.
"""

from __future__ import annotations

import importlib.util
import math
import xml.sax.saxutils as saxutils
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import io as mio
from .app import (
    ModelCache,
    ModelChoice,
    TranslationOptions,
    TranslationRequest,
    UserError,
    model_choices,
    readable_error,
    run_translation,
)
from .maps import symmetric_limit
from .modality import from_dicom, modality_family, modality_label, model_fits
from .regions import DEFAULT_ROIS, ordered_regions
from .runtime import device_choices

#: The model cache of the previous name (kept importable).
TranslatorCache = ModelCache

__all__ = [
    "ATTRIBUTE_PREFIX", "SYNTHETIC_ATTRIBUTE", "MODALITY_ATTRIBUTE", "ROLE_ATTRIBUTE",
    "DEPENDENCIES", "RESULT_LAYOUT_ID", "RESULT_VIEWS",
    "volume_from_node", "update_node_from_volume", "add_volume_node",
    "mask_choices", "default_mask_choice", "mask_from_node",
    "source_modality", "modality_family", "modality_label", "model_fits",
    "missing_dependencies", "dependency_requirements", "device_choices", "ModelChoice", "model_choices",
    "check_inputs", "TranslationOptions", "TranslationRequest", "read_request",
    "TranslatorCache", "TranslationRun", "translate_nodes",
    "ResultNodes", "result_name", "add_result_nodes", "metrics_summary", "difference_color_node",
    "uncertainty_color_node", "result_layout_xml", "result_view_assignments", "show_results",
    "SampleNodes", "add_phantom_case", "readable_error",
]

ATTRIBUTE_PREFIX = "MedTranslate."
SYNTHETIC_ATTRIBUTE = "MedTranslate.Synthetic"
ROLE_ATTRIBUTE = "MedTranslate.Role"
MODALITY_ATTRIBUTE = "MedTranslate.Modality"
DICOM_MODALITY_ATTRIBUTE = "DICOM.Modality"
BINARY_LABELMAP = "Binary labelmap"

#: Import name -> pip requirement of what the engine needs beyond Slicer's own Python
#: (Slicer ships numpy, SimpleITK and VTK). torch comes first: the others depend on it.
DEPENDENCIES: tuple[tuple[str, str], ...] = (
    ("torch", "torch>=2.4"),
    ("monai", "monai>=1.4"),
    ("safetensors", "safetensors>=0.4"),
    ("yaml", "pyyaml>=6"),
    ("scipy", "scipy>=1.11"),
)

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_METRIC_COLUMNS = (("MAE", "mae"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("RMSE", "rmse"))


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


def missing_dependencies(find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
    """pip requirements (``DEPENDENCIES``) whose module cannot be found (nothing is imported)."""
    missing = []
    for module, requirement in DEPENDENCIES:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    return missing


def dependency_requirements(missing: Sequence[str]) -> tuple[bool, list[str]]:
    """(torch is missing, the other missing requirements): torch is installed separately
    (PyTorchUtils picks the build for the GPU and driver)."""
    torch_missing = any(r.split(">")[0].split("=")[0].strip() == "torch" for r in missing)
    return torch_missing, [r for r in missing if r.split(">")[0].split("=")[0].strip() != "torch"]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def check_inputs(source_node: Any, *, model: ModelChoice | None = None, dependencies_missing: Sequence[str] = (),
                 liver: tuple[Any, str | None] | None = None, tumor: tuple[Any, str | None] | None = None,
                 reference_node: Any | None = None, roi_only: bool = False) -> tuple[bool, str]:
    """(Apply can run, one line for the user: what is missing, or what Apply will do)."""
    if source_node is None:
        return False, "Select a source volume (or click 'Load sample data')."
    if source_node.GetImageData() is None:
        return False, f"The source volume '{_name(source_node)}' has no image data."
    if reference_node is not None and reference_node.GetID() == source_node.GetID():
        return False, "The reference must be another volume than the source (or none)."
    rois = _roi_choices(liver, tumor, model)
    for role, choice in rois.items():
        if choice[0] is not None and not choice[1]:
            return False, f"Select the {role} segment of '{_name(choice[0])}' (or no {role} mask)."
    has_roi = any(c[0] is not None for c in rois.values())
    if roi_only and not has_roi:
        return False, "'Only slices with the ROI' needs a liver or tumor mask."
    if dependencies_missing:
        names = ", ".join(r.split(">")[0] for r in dependencies_missing)
        return True, f"Apply will first install the missing Python packages ({names}), then list the models."
    if model is None:
        modality = source_modality(source_node)
        which = f" for {modality_label(modality)} sources" if modality else ""
        return False, f"No model{which}: add a bundle with 'Add model…'."
    if model.error:
        return False, f"Model '{model.name}' cannot be used: {model.error}"
    return True, (f"Ready: {_name(source_node)} → synthetic {modality_label(model.target)} with {model.name}"
                  f"{' (metrics vs. the reference)' if reference_node is not None else ''}.")


# ---------------------------------------------------------------------------------------------
# running (the application layer does the work; this reads nodes and adds result nodes)
# ---------------------------------------------------------------------------------------------
def _roi_choices(liver: Any, tumor: Any, model: Any = None) -> dict[str, tuple[Any, str | None]]:
    """The panel's two mask selectors by the model's ROI names (its first two; liver and tumor
    by default): {roi name: (node, segment / label key)}."""
    names = tuple(getattr(model, "rois", None) or DEFAULT_ROIS)
    names = (names + DEFAULT_ROIS)[:2] if len(names) < 2 else names[:2]
    return {name: choice for name, choice in zip(names, (liver, tumor), strict=True)
            if choice is not None and choice[0] is not None}


def read_request(source_node: Any, options: TranslationOptions, *, liver: tuple[Any, str] | None = None,
                 tumor: tuple[Any, str] | None = None, reference_node: Any | None = None,
                 model: Any = None) -> TranslationRequest:
    """Read the source, the masks (``(node, key)``, on the source grid; named by the model's ROI
    names) and the reference (in the source's frame) from their nodes into an application
    ``TranslationRequest``. Nodes are only read."""
    from .cases import Case

    source = volume_from_node(source_node)
    masks = {}
    for role, (node, key) in _roi_choices(liver, tumor, model).items():
        if not key:
            raise ValueError(f"{_name(node)}: choose which segment is the {role}")
        masks[role] = mask_from_node(node, key, source, frame_node=source_node)
    if options.roi_only and not masks:
        raise UserError("'Only slices with the ROI' needs an ROI mask (e.g. the liver or tumor)")
    reference = None
    if reference_node is not None:
        reference = volume_from_node(reference_node, frame_node=source_node)
    return TranslationRequest(Case(_name(source_node), source, masks, reference), options)


class TranslationRun:
    """One translation: ``__init__`` reads the inputs (GUI thread), ``work`` translates (any
    thread, touches no node: ``app.run_translation``), ``finish`` adds the result nodes (GUI
    thread)."""

    def __init__(self, scene: Any, source_node: Any, options: TranslationOptions, *,
                 liver: tuple[Any, str] | None = None, tumor: tuple[Any, str] | None = None,
                 reference_node: Any | None = None, translators: ModelCache | None = None,
                 model: Any = None) -> None:
        if source_node is None:
            raise ValueError("select a source volume")
        self.scene = scene
        self.source_node = source_node
        self.reference_node = reference_node
        self.options = options
        self.request = read_request(source_node, options, liver=liver, tumor=tumor, reference_node=reference_node,
                                    model=model)
        self.translators = translators
        self.translator: Any = None

    def work(self, progress: Callable | None = None, cancel: Any = None,
             message: Callable[[str], None] | None = None) -> Any:
        """The engine's ``Result`` (``self.translator`` is the model it came from)."""
        outcome = run_translation(self.request, cache=self.translators, progress=progress, cancel=cancel,
                                  message=message)
        self.translator = outcome.translator
        return outcome.result

    def job(self) -> Any:
        """A ``worker.Job`` running ``work`` (start it, poll it, then call ``finish(job.result)``)."""
        from .engine import TranslationCancelled
        from .worker import Job

        job: Any = None

        def work(progress: Callable, cancelled: Callable[[], bool]) -> Any:
            return self.work(progress, cancelled, message=job.set_message)

        job = Job(work, name=f"MedTranslate: {self.request.source_name}",
                  cancelled_exceptions=(TranslationCancelled,))
        return job

    def finish(self, result: Any) -> ResultNodes:
        if self.translator is None:
            raise RuntimeError("TranslationRun.finish before work")
        meta = self.translator.bundle.meta
        return add_result_nodes(self.scene, self.source_node, result, method=meta.method,
                                model=self.translator.model_name, target=meta.target.modality,
                                reference_node=self.reference_node, options=self.options)


def translate_nodes(scene: Any, source_node: Any, options: TranslationOptions, *,
                    liver: tuple[Any, str] | None = None, tumor: tuple[Any, str] | None = None,
                    reference_node: Any | None = None, progress: Callable | None = None, cancel: Any = None,
                    translators: ModelCache | None = None, model: Any = None) -> ResultNodes:
    """The whole flow on the calling thread (Python console, tests)."""
    run = TranslationRun(scene, source_node, options, liver=liver, tumor=tumor, reference_node=reference_node,
                         translators=translators, model=model)
    return run.finish(run.work(progress, cancel))


# ---------------------------------------------------------------------------------------------
# results -> nodes
# ---------------------------------------------------------------------------------------------
@dataclass
class ResultNodes:
    """The nodes one run added (None where the method / inputs give no such result)."""

    synthetic: Any
    difference: Any
    reference_difference: Any = None
    uncertainty: Any = None
    metrics_table: Any = None
    confidence_table: Any = None
    metrics: dict[str, dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def units(self) -> str:
        """Units of the synthetic image and the metrics (HU for CT)."""
        return _unit(self.info)

    def nodes(self) -> list[Any]:
        return [n for n in (self.synthetic, self.difference, self.reference_difference, self.uncertainty,
                            self.metrics_table, self.confidence_table) if n is not None]


def result_name(source_name: str, target: str, method: str) -> str:
    """``"<source> – synthetic <target> (<method>)"``."""
    return f"{source_name} – synthetic {modality_label(target)} ({method})"


def _ramp(stops: Sequence[tuple[float, tuple[float, float, float]]], n: int = 256) -> np.ndarray:
    """(n, 3) RGB by linear interpolation between ``(position in [0, 1], rgb)`` stops."""
    pos = np.array([p for p, _ in stops])
    rgb = np.array([c for _, c in stops])
    x = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(x, pos, rgb[:, k]) for k in range(3)], axis=1)


_DIVERGING = ((0.0, (0.23, 0.30, 0.75)), (0.25, (0.55, 0.69, 0.99)), (0.5, (0.87, 0.87, 0.87)),
              (0.75, (0.96, 0.60, 0.48)), (1.0, (0.71, 0.02, 0.15)))  # cool-warm (blue, grey, red)
_HEAT = ((0.0, (0.0, 0.0, 0.0)), (0.35, (0.7, 0.0, 0.0)), (0.65, (1.0, 0.5, 0.0)), (0.85, (1.0, 0.9, 0.1)),
         (1.0, (1.0, 1.0, 1.0)))  # black, red, orange, yellow, white


def _color_node(scene: Any, tag: str, name: str, stops: Sequence, created: list) -> Any:
    node_id = f"vtkMRMLColorTableNode{tag}"
    node = scene.GetNodeByID(node_id)
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetSingletonTag(tag)
    node.SetName(name)
    colors = _ramp(stops)
    node.SetNumberOfColors(len(colors))
    node.GetLookupTable().SetTableRange(0, len(colors) - 1)
    for i, (r, g, b) in enumerate(colors):
        node.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "MedTranslate")
    node = scene.AddNode(node)
    created.append(node)
    return node


def difference_color_node(scene: Any, created: list | None = None) -> Any:
    """The diverging blue-grey-red colour table (shared by all difference maps)."""
    return _color_node(scene, "MedTranslateDifference", "MedTranslate difference (blue-red)", _DIVERGING,
                       created if created is not None else [])


def uncertainty_color_node(scene: Any, created: list | None = None) -> Any:
    """The heat (black-red-yellow-white) colour table of uncertainty maps."""
    return _color_node(scene, "MedTranslateUncertainty", "MedTranslate uncertainty (heat)", _HEAT,
                       created if created is not None else [])


def _display(node: Any, window: float, level: float, color_node: Any | None = None) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(float(max(window, 1e-6)), float(level))
    if color_node is not None:
        display.SetAndObserveColorNodeID(color_node.GetID())


def _tag(node: Any, role: str, attributes: dict[str, str]) -> None:
    node.SetAttribute(SYNTHETIC_ATTRIBUTE, "1")
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    for key, value in attributes.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, value)


def _target_window(info: dict[str, Any]) -> tuple[float, float] | None:
    """(window, level) of the synthetic image from the target preset the engine used."""
    cfg = info.get("target_preset")
    if not cfg:
        return None
    from .intensity import preset_from_config

    try:
        lo, hi = preset_from_config(cfg).physical_range
    except (ValueError, TypeError):
        return None
    return hi - lo, (hi + lo) / 2.0


def _slab_values(volume: mio.Volume, axis: int, slice_range: tuple[int, int]) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(*slice_range)
    return volume.array[tuple(index)]


def _unit(info: dict[str, Any]) -> str:
    """Units of the synthetic image, from the target preset the engine used (HU for CT)."""
    from .intensity import preset_from_config

    try:
        return preset_from_config(info["target_preset"]).UNITS
    except (KeyError, ValueError, TypeError):
        return ""


def _metrics_table(scene: Any, name: str, metrics: dict[str, dict[str, float]], unit: str) -> Any:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    regions = ordered_regions(metrics)
    column = vtk.vtkStringArray()
    column.SetName("Region")
    for region in regions:
        column.InsertNextValue(region)
    table.AddColumn(column)
    for title, key in _METRIC_COLUMNS:
        values = vtk.vtkDoubleArray()
        values.SetName(title)
        for region in regions:
            values.InsertNextValue(float(metrics[region].get(key, math.nan)))
        table.AddColumn(values)
    units = {"MAE": unit, "RMSE": unit, "PSNR": "dB", "SSIM": ""}
    descriptions = {"MAE": "mean absolute error", "PSNR": "peak signal-to-noise ratio",
                    "SSIM": "structural similarity", "RMSE": "root mean square error"}
    for title, _ in _METRIC_COLUMNS:
        table.SetColumnUnitLabel(title, units[title])
        table.SetColumnDescription(title, descriptions[title] + " of synthetic vs. reference")
    table.SetColumnDescription("Region", "whole volume, body, liver and tumor masks (translated slices)")
    return table


def _confidence_table(scene: Any, name: str, confidence: np.ndarray) -> Any | None:
    rows = [(i, float(c)) for i, c in enumerate(np.asarray(confidence, dtype=np.float64)) if np.isfinite(c)]
    if not rows:
        return None
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    index, value = vtk.vtkIntArray(), vtk.vtkDoubleArray()
    index.SetName("Slice")
    value.SetName("Confidence")
    for i, c in rows:
        index.InsertNextValue(i)
        value.InsertNextValue(c)
    table.AddColumn(index)
    table.AddColumn(value)
    table.SetColumnDescription("Confidence", "per-slice confidence reported by the method")
    return table


def _place_like_source(scene: Any, source_node: Any, nodes: Sequence[Any]) -> None:
    """Same parent transform as the source; same subject-hierarchy parent (its study) when the
    scene has a subject hierarchy (always in Slicer)."""
    transform_id = source_node.GetTransformNodeID()
    for node in nodes:
        if transform_id and node.IsA("vtkMRMLTransformableNode"):
            node.SetAndObserveTransformNodeID(transform_id)
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if sh is None:
        return
    source_item = sh.GetItemByDataNode(source_node)
    parent = sh.GetItemParent(source_item) if source_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


def _added_nodes(scene: Any, before: set[str]) -> list[Any]:
    nodes = scene.GetNodes()
    found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [n for n in found if n.GetID() not in before]


def _remove_nodes(scene: Any, nodes: Sequence[Any]) -> None:
    for node in reversed(list(nodes)):
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)


def add_result_nodes(scene: Any, source_node: Any, result: Any, *, method: str, model: str, target: str,
                     reference_node: Any | None = None, options: TranslationOptions | None = None) -> ResultNodes:
    """Add the engine's ``Result`` to ``scene`` as new nodes (see the module docstring).

    All or nothing: if anything fails, every node added here is removed again and the error is
    raised. Input nodes are only read."""
    before = {scene.GetNodes().GetItemAsObject(i).GetID() for i in range(scene.GetNumberOfNodes())}
    created: list[Any] = []
    try:
        return _add_result_nodes(scene, source_node, result, method, model, target, reference_node, options,
                                 created)
    except BaseException:
        _remove_nodes(scene, _added_nodes(scene, before))
        raise


def _add_result_nodes(scene, source_node, result, method, model, target, reference_node, options, created):
    info = dict(result.info or {})
    base = result_name(_name(source_node), target, method)
    attributes = {"Method": method, "Model": model, "Target": target, "Source": source_node.GetID(),
                  "Seed": str(info.get("seed", "")), "Device": str(info.get("device", "")),
                  "Slices": f"{result.slice_range[0]}:{result.slice_range[1]}", "Axis": str(result.axis)}
    if options is not None:
        attributes["Steps"] = "" if options.steps is None else str(options.steps)
        attributes["Samples"] = str(options.num_samples)
    if reference_node is not None:
        attributes["Reference"] = reference_node.GetID()
    note = (f"Synthetic image generated by MedTranslate ({method}, model {model}). NOT FOR DIAGNOSIS: it can "
            f"look plausible and still be wrong.")

    def volume_node(volume: mio.Volume, name: str, role: str) -> Any:
        node = add_volume_node(scene, volume, scene.GenerateUniqueName(name))
        _tag(node, role, attributes)
        node.SetDescription(note)
        return node

    synthetic = volume_node(result.synthetic, base, "synthetic")
    window = _target_window(info)
    if window is not None:
        _display(synthetic, *window)

    diverging = difference_color_node(scene, created)
    slab = (result.axis, result.slice_range)

    synthetic_values = _slab_values(result.synthetic, *slab)
    floor = None if window is None else window[1] - window[0] / 2.0  # lowest value of the target window

    def difference_node(volume: mio.Volume, name: str, role: str) -> Any:
        """Centred on 0; +-limit = 99th percentile of |difference| where the image the synthetic
        is compared with (reference, or the source mapped to target units) is above the target
        window's floor. Air is left out: the synthetic cannot go below the floor (e.g. -300 HU for
        a CTA window), so air vs. a -1000 HU reference would set the scale to the window edge."""
        node = volume_node(volume, name, role)
        values = _slab_values(volume, *slab)
        shown = values != 0
        if floor is not None:
            shown &= (synthetic_values - values) > floor + 1e-3 * window[0]
        limit = symmetric_limit(values[shown]) if np.any(shown) else 1.0
        _display(node, 2.0 * limit, 0.0, diverging)
        return node

    nodes = ResultNodes(synthetic=synthetic,
                        difference=difference_node(result.difference, f"{base} – difference vs. source",
                                                   "difference"),
                        metrics=result.metrics, info=info)
    if result.reference_difference is not None:
        nodes.reference_difference = difference_node(result.reference_difference,
                                                     f"{base} – difference vs. reference", "reference_difference")
    if result.uncertainty is not None:
        kind = result.uncertainty_kind or "std"
        nodes.uncertainty = volume_node(result.uncertainty, f"{base} – uncertainty ({kind})", "uncertainty")
        values = _slab_values(result.uncertainty, *slab)
        top = float(np.percentile(values, 99.0)) if values.size else 1.0
        top = top if top > 0 else 1.0
        _display(nodes.uncertainty, top, top / 2.0, uncertainty_color_node(scene, created))
    if result.metrics:
        nodes.metrics_table = _metrics_table(scene, scene.GenerateUniqueName(f"{base} – metrics"), result.metrics,
                                             _unit(info))
        _tag(nodes.metrics_table, "metrics", attributes)
    if result.confidence is not None:
        nodes.confidence_table = _confidence_table(scene, scene.GenerateUniqueName(f"{base} – confidence"),
                                                   result.confidence)
        if nodes.confidence_table is not None:
            _tag(nodes.confidence_table, "confidence", attributes)
    _place_like_source(scene, source_node, nodes.nodes())
    return nodes


def metrics_summary(metrics: dict[str, dict[str, float]] | None, unit: str = "") -> str:
    """One line per region: ``body: MAE 41.2 HU, PSNR 29.8 dB, SSIM 0.912, RMSE 60.3 HU``."""
    if not metrics:
        return ""
    lines = []
    suffix = f" {unit}" if unit else ""
    for region in ordered_regions(metrics):
        m = metrics[region]
        lines.append(f"{region}: MAE {m.get('mae', math.nan):.1f}{suffix}, PSNR {m.get('psnr', math.nan):.1f} dB, "
                     f"SSIM {m.get('ssim', math.nan):.3f}, RMSE {m.get('rmse', math.nan):.1f}{suffix}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# result layout
# ---------------------------------------------------------------------------------------------
#: Custom layout ID of the result layout (registered on the scene's layout node).
RESULT_LAYOUT_ID = 8701
#: View (slice node layout name) -> (label in the view bar, colour) of the result layout.
RESULT_VIEWS = {
    "MedTranslateSource": ("Src", "#808080"),
    "MedTranslateSynthetic": ("Syn", "#2E8B57"),
    "MedTranslateReference": ("Ref", "#4169E1"),
    "MedTranslateDifference": ("dSrc", "#C0392B"),
    "MedTranslateReferenceDifference": ("dRef", "#8E44AD"),
    "MedTranslateUncertainty": ("Unc", "#E67E22"),
}


def result_view_assignments(nodes: ResultNodes, source_node: Any, reference_node: Any | None = None
                            ) -> list[list[tuple[str, str, str | None, float]]]:
    """Rows of ``(view name, background node ID, foreground node ID, foreground opacity)``: source |
    synthetic | reference on top, the heatmaps below. The synthetic view has the source difference
    as a foreground overlay at opacity 0 (raise it with the view's opacity slider)."""
    top = [("MedTranslateSource", source_node.GetID(), None, 0.0),
           ("MedTranslateSynthetic", nodes.synthetic.GetID(), nodes.difference.GetID(), 0.0)]
    if reference_node is not None:
        top.append(("MedTranslateReference", reference_node.GetID(), None, 0.0))
    bottom = [("MedTranslateDifference", nodes.difference.GetID(), None, 0.0)]
    if nodes.reference_difference is not None:
        bottom.append(("MedTranslateReferenceDifference", nodes.reference_difference.GetID(), None, 0.0))
    if nodes.uncertainty is not None:
        bottom.append(("MedTranslateUncertainty", nodes.uncertainty.GetID(), None, 0.0))
    return [top, bottom]


def result_layout_xml(rows: Sequence[Sequence[str]], orientation: str = "Axial") -> str:
    """Slicer layout XML: one horizontal row of slice views per entry of ``rows`` (view names)."""
    parts = ['<layout type="vertical">']
    for row in rows:
        parts.append(' <item>\n  <layout type="horizontal">')
        for view in row:
            label, color = RESULT_VIEWS.get(view, (view[:4], "#808080"))
            q = saxutils.quoteattr
            parts.append(
                f'   <item>\n    <view class="vtkMRMLSliceNode" singletontag={q(view)}>\n'
                f'     <property name="orientation" action="default">{saxutils.escape(orientation)}</property>\n'
                f'     <property name="viewlabel" action="default">{saxutils.escape(label)}</property>\n'
                f'     <property name="viewcolor" action="default">{saxutils.escape(color)}</property>\n'
                f'    </view>\n   </item>')
        parts.append('  </layout>\n </item>')
    parts.append('</layout>')
    return "\n".join(parts)


def show_results(scene: Any, nodes: ResultNodes, source_node: Any, reference_node: Any | None = None) -> list[str]:
    """Switch the layout to the result layout and put the volumes in its views, all slice views
    linked. Returns the names of the views that were filled (their slice composite nodes exist:
    in Slicer the layout manager creates them when the layout is set). No layout node (plain
    MRML without one): nothing happens, [] is returned."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is None:
        return []
    rows = result_view_assignments(nodes, source_node, reference_node)
    xml = result_layout_xml([[view for view, *_ in row] for row in rows])
    if layout.IsLayoutDescription(RESULT_LAYOUT_ID):
        layout.SetLayoutDescription(RESULT_LAYOUT_ID, xml)  # also updates the views when it is shown
    else:
        layout.AddLayoutDescription(RESULT_LAYOUT_ID, xml)
    layout.SetViewArrangement(RESULT_LAYOUT_ID)
    wanted = {view: rest for row in rows for view, *rest in row}
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    filled = []
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        name = composite.GetLayoutName()
        if name not in wanted:
            continue
        background, foreground, opacity = wanted[name]
        composite.SetBackgroundVolumeID(background)
        composite.SetForegroundVolumeID(foreground)
        composite.SetForegroundOpacity(opacity)
        composite.SetLinkedControl(True)
        filled.append(name)
    return filled


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


def add_phantom_case(scene: Any, case: Any, *, source: str = "ct", reference: str | None = "cta_arterial",
                     prefix: str | None = None) -> SampleNodes:
    """Put a ``phantom.PhantomCase`` into the scene: the source and reference volumes (tagged
    with their modality) and a segmentation with "liver" and "tumor" segments, in one
    subject-hierarchy study. Nothing is downloaded."""
    prefix = prefix or f"Phantom {case.seed}"
    src = case.images[source]
    source_node = add_volume_node(scene, src, f"{prefix} {modality_label(source)}")
    source_node.SetAttribute(MODALITY_ATTRIBUTE, source)
    reference_node = None
    if reference:
        reference_node = add_volume_node(scene, case.images[reference], f"{prefix} {modality_label(reference)}")
        reference_node.SetAttribute(MODALITY_ATTRIBUTE, reference)
    _ensure_segmentation_converters()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{prefix} liver and tumor")
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
