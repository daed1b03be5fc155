"""The panel's flow on nodes: dependencies, input checks, reading a request from nodes, the
translation run (work by ``app.run_translation``) and its result nodes."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..app import (
    ModelCache,
    ModelChoice,
    TranslationOptions,
    TranslationRequest,
    UserError,
    run_translation,
)
from ..modality import modality_label
from ..regions import DEFAULT_ROIS
from .nodes import _name, mask_from_node, source_modality, volume_from_node
from .results import ResultNodes, add_result_nodes

#: Import name -> pip requirement of what the engine needs beyond Slicer's own Python
#: (Slicer ships numpy, SimpleITK and VTK). torch comes first: the others depend on it.
DEPENDENCIES: tuple[tuple[str, str], ...] = (
    ("torch", "torch>=2.4"),
    ("monai", "monai>=1.5"),
    ("safetensors", "safetensors>=0.4"),
    ("yaml", "pyyaml>=6"),
    ("scipy", "scipy>=1.11"),
)
#: Installed with ``--no-deps`` after torch: their own torch requirement could make pip replace the
#: build PyTorchUtils picked for this GPU and driver (SlicerTotalSegmentator does the same).
NO_DEPS = frozenset({"monai"})
#: What the phantom sample case needs (the sample loads before the first Apply).
SAMPLE_DEPENDENCIES = frozenset({"scipy"})


def _project(requirement: str) -> str:
    return requirement.split(">")[0].split("=")[0].split("<")[0].strip()


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


@dataclass(frozen=True)
class InstallPlan:
    """How the missing requirements are installed, in this order: ``torch`` (through
    PyTorchUtils when the PyTorch extension is there), then ``no_deps`` with ``pip --no-deps``,
    then ``others`` with their dependencies."""

    torch: str | None
    no_deps: tuple[str, ...]
    others: tuple[str, ...]


def install_plan(missing: Sequence[str]) -> InstallPlan:
    """The ``InstallPlan`` of the missing pip requirements (``missing_dependencies()``)."""
    torch = next((r for r in missing if _project(r) == "torch"), None)
    rest = [r for r in missing if _project(r) != "torch"]
    return InstallPlan(torch, tuple(r for r in rest if _project(r) in NO_DEPS),
                       tuple(r for r in rest if _project(r) not in NO_DEPS))


def sample_dependencies_missing(missing: Sequence[str]) -> list[str]:
    """The requirements among ``missing`` that the phantom sample needs."""
    return [r for r in missing if _project(r) in SAMPLE_DEPENDENCIES]


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
def roi_roles(model: Any = None) -> tuple[str, str]:
    """The ROI names of the panel's two mask selectors: the model's first two ROI names
    (``app.ModelChoice.rois``), filled up from ``regions.DEFAULT_ROIS``."""
    names = [*(getattr(model, "rois", None) or DEFAULT_ROIS)]
    names += [r for r in DEFAULT_ROIS if r not in names]
    return names[0], names[1]


def panel_select(model: Any, select: str) -> str:
    """The ``TranslationOptions.select`` of the panel's sample choice (one of
    ``runtime.SELECT_MODES``): ``select`` when the model scores every sample
    (``app.ModelChoice.scores_samples``), else "per_slice" (the choice is disabled then, and a
    value kept from another model must not make the engine refuse this one)."""
    return select if model is not None and getattr(model, "scores_samples", False) else "per_slice"


def _roi_choices(liver: Any, tumor: Any, model: Any = None) -> dict[str, tuple[Any, str | None]]:
    """The panel's two mask selectors by ``roi_roles(model)``: {roi name: (node, segment key)}."""
    return {name: choice for name, choice in zip(roi_roles(model), (liver, tumor), strict=True)
            if choice is not None and choice[0] is not None}


def read_request(source_node: Any, options: TranslationOptions, *, liver: tuple[Any, str] | None = None,
                 tumor: tuple[Any, str] | None = None, reference_node: Any | None = None,
                 model: Any = None) -> TranslationRequest:
    """Read the source, the masks (``(node, key)``, on the source grid; named by the model's ROI
    names) and the reference (in the source's frame) from their nodes into an application
    ``TranslationRequest``. Nodes are only read."""
    from ..cases import Case

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

    def job(self, *, process: bool = False, python: str | None = None) -> Any:
        """A job to start and poll, then ``finish(job.result)``: a ``worker.Job`` running ``work``
        on a thread, or with ``process`` a ``runner.TranslationProcess`` (its own Python process,
        ``python`` = ``PythonSlicer`` in Slicer: cannot starve under PythonQt, cancel kills it)."""
        if process:
            from ..runner import TranslationProcess

            return TranslationProcess(self.request, python=python, name=f"MedTranslate: {self.request.source_name}")
        from ..engine import TranslationCancelled
        from ..worker import Job

        job: Any = None

        def work(progress: Callable, cancelled: Callable[[], bool]) -> Any:
            return self.work(progress, cancelled, message=job.set_message)

        job = Job(work, name=f"MedTranslate: {self.request.source_name}",
                  cancelled_exceptions=(TranslationCancelled,))
        return job

    def finish(self, result: Any) -> ResultNodes:
        """Add ``result`` (the engine's, or a translation process's ``ProcessResult``) as nodes."""
        model = getattr(result, "model", None)
        if model:  # from a translation process: it names its model
            method, name, target = model["method"], model["name"], model["target"]
        elif self.translator is not None:
            meta = self.translator.bundle.meta
            method, name, target = meta.method, self.translator.model_name, meta.target.modality
        else:
            raise RuntimeError("TranslationRun.finish before work")
        return add_result_nodes(self.scene, self.source_node, result, method=method, model=name, target=target,
                                reference_node=self.reference_node, options=self.options)


def translate_nodes(scene: Any, source_node: Any, options: TranslationOptions, *,
                    liver: tuple[Any, str] | None = None, tumor: tuple[Any, str] | None = None,
                    reference_node: Any | None = None, progress: Callable | None = None, cancel: Any = None,
                    translators: ModelCache | None = None, model: Any = None) -> ResultNodes:
    """The whole flow on the calling thread (Python console, tests)."""
    run = TranslationRun(scene, source_node, options, liver=liver, tumor=tumor, reference_node=reference_node,
                         translators=translators, model=model)
    return run.finish(run.work(progress, cancel))
