"""Slicer MRML nodes <-> the application layer: everything the Slicer module does that touches MRML but not Qt.

Runs inside Slicer and, for the tests, in plain Python with the ``slicer-core`` package (real
MRML, no application): it uses only MRML, VTK and numpy (+ the library). torch is imported only
by the functions that run the engine (``device_choices`` too; the panel asks ``DeviceQuery``).

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

Files: ``nodes`` (volumes, masks, attributes), ``run`` (dependencies, input checks, the run),
``results`` (result nodes), ``layout`` (the result layout), ``sample`` (the phantom sample case).

Results: ``"<source> – synthetic <target> (<method>)"`` scalar volume tagged with node attributes
``MedTranslate.Synthetic = 1`` (+ role, method, model, seed, ...), difference heatmaps (vs.
source; vs. reference) with a diverging colour table centred on 0, uncertainty with a heat
colour table, a metrics table (MAE/PSNR/SSIM/RMSE per region) and a per-slice confidence table
where the method gives them; placed in the source's subject-hierarchy study and parent transform.
"""

from __future__ import annotations

from ..app import (
    ModelCache,
    ModelChoice,
    TranslationOptions,
    TranslationRequest,
    model_choices,
    readable_error,
)
from ..modality import modality_family, modality_label, model_fits
from ..runner import DEFAULT_DEVICE_CHOICES, DeviceQuery, ImportQuery
from ..runtime import SELECT_MODES, device_choices
from .layout import RESULT_LAYOUT_ID, RESULT_VIEWS, result_layout_xml, result_view_assignments, show_results
from .nodes import (
    ATTRIBUTE_PREFIX,
    BINARY_LABELMAP,
    DICOM_MODALITY_ATTRIBUTE,
    MODALITY_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    SYNTHETIC_ATTRIBUTE,
    add_volume_node,
    default_mask_choice,
    mask_choices,
    mask_from_node,
    source_modality,
    update_node_from_volume,
    volume_from_node,
)
from .nodes import (
    _ensure_segmentation_converters as _ensure_segmentation_converters,
)
from .nodes import (
    _image_array as _image_array,
)
from .nodes import (
    _to_numpy as _to_numpy,
)
from .nodes import (
    _to_vtk as _to_vtk,
)
from .results import (
    ResultNodes,
    add_result_nodes,
    difference_color_node,
    metrics_summary,
    result_name,
    uncertainty_color_node,
)
from .results import _metrics_table as _metrics_table
from .run import (
    DEPENDENCIES,
    NO_DEPS,
    SAMPLE_DEPENDENCIES,
    InstallPlan,
    TranslationRun,
    check_inputs,
    install_plan,
    missing_dependencies,
    panel_select,
    read_request,
    roi_roles,
    sample_dependencies_missing,
    translate_nodes,
)
from .sample import SampleNodes, add_phantom_case, sample_node_names
from .sample import _oriented_image as _oriented_image

#: The model cache of the previous name (kept importable).
TranslatorCache = ModelCache

__all__ = [
    "ATTRIBUTE_PREFIX", "SYNTHETIC_ATTRIBUTE", "MODALITY_ATTRIBUTE", "ROLE_ATTRIBUTE", "DICOM_MODALITY_ATTRIBUTE",
    "BINARY_LABELMAP", "DEPENDENCIES", "RESULT_LAYOUT_ID", "RESULT_VIEWS",
    "volume_from_node", "update_node_from_volume", "add_volume_node",
    "mask_choices", "default_mask_choice", "mask_from_node",
    "source_modality", "modality_family", "modality_label", "model_fits",
    "missing_dependencies", "NO_DEPS", "SAMPLE_DEPENDENCIES", "InstallPlan", "install_plan",
    "sample_dependencies_missing", "device_choices", "DeviceQuery", "ImportQuery", "DEFAULT_DEVICE_CHOICES", "ModelChoice", "model_choices",
    "check_inputs", "roi_roles", "SELECT_MODES", "panel_select", "TranslationOptions", "TranslationRequest", "read_request",
    "TranslatorCache", "TranslationRun", "translate_nodes",
    "ResultNodes", "result_name", "add_result_nodes", "metrics_summary", "difference_color_node",
    "uncertainty_color_node", "result_layout_xml", "result_view_assignments", "show_results",
    "SampleNodes", "add_phantom_case", "sample_node_names", "readable_error",
]
