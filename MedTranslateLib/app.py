"""The application layer: what the Slicer module, the CLI, evaluation and a web front end call.

- Models: ``model_choices`` (the user's and the bundled models, each with its capabilities, ROI
  names, units and warnings, filtered by the source modality), ``load_model`` (a name or a path
  to a loaded ``Bundle``) and ``ModelCache`` (the last loaded translator, kept on its device).
- A translation: ``TranslationOptions`` (model, device, steps, samples, seed, which slices) and a
  ``TranslationRequest`` (a ``cases.Case`` + options); ``run_translation`` runs one on any thread
  with progress and cancel and returns a ``TranslationOutcome`` (the engine's ``Result`` and the
  model it came from).
- Outputs: ``output_files`` / ``write_outputs`` (a case's result files, all or nothing) and
  ``metrics_document``.
- Errors: ``UserError`` (a message meant for the user as it is) and ``readable_error`` (one line
  for any exception).

Front ends only convert their inputs to these objects and show what comes back; they keep no
list of method names, regions or units of their own. torch is imported only when a model is
loaded, so a GUI can list models without it.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .maps import confidence_summary
from .modality import modality_label, model_fits
from .regions import DEFAULT_ROIS
from .runtime import SELECT_MODES, first_line

if TYPE_CHECKING:
    from .cases import Case

__all__ = ["UserError", "readable_error", "ModelChoice", "model_choices", "model_choice", "load_model",
           "bundled_models", "phantom_case", "ModelCache", "TranslationOptions", "TranslationRequest", "TranslationOutcome",
           "ALL_ROIS", "METRICS_FILE", "run_translation", "output_files", "write_json", "write_outputs",
           "write_case_folder", "metrics_document", "confidence_document"]

#: ``TranslationOptions.slices`` value: the slices holding any ROI mask of the case (+- margin).
ALL_ROIS = "rois"


class UserError(ValueError):
    """An error whose message is meant for the user as it is (one line)."""


def readable_error(error: BaseException) -> str:
    """One line for the user (the traceback goes to the log)."""
    name = type(error).__name__
    text = first_line(error) if str(error).strip() else ""
    if name == "TranslationCancelled":
        return "Cancelled: nothing was added to the scene."
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return ("Out of GPU memory. Close other GPU programs, or choose the CPU (or another GPU) as the "
                "device and apply again.")
    if isinstance(error, MemoryError):
        return "Out of memory: the volume is too large for this computer; try 'Only slices with the ROI'."
    if isinstance(error, ImportError):
        missing = getattr(error, "name", None) or text
        return f"A Python package is missing or broken ({missing}); apply again to install the dependencies."
    if isinstance(error, ValueError):
        return text or name
    return f"Translation failed ({name}): {text}" if text else f"Translation failed ({name})."


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """One entry of the model list, with what the model offers (``methods.Capabilities`` as a
    dict: stochastic, steps, uncertainty, confidence, ...), its ROI names, target units and
    warnings (e.g. a window that cannot represent bone)."""

    name: str
    label: str
    method: str = "?"
    source: str = "?"
    target: str = "?"
    origin: str = "bundled"
    path: str = ""
    fits: bool = True
    error: str | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    rois: tuple[str, ...] = DEFAULT_ROIS
    units: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def steps(self) -> bool:
        """Sampling steps / several samples apply (the method is stochastic)."""
        return bool(self.capabilities.get("stochastic"))

    @property
    def scores_samples(self) -> bool:
        """The method scores every sample (``sample_confidence``): ``select="per_volume"`` applies."""
        return bool(self.capabilities.get("sample_confidence"))


def _capabilities(method: str, meta: Any) -> dict[str, Any]:
    """What the model offers: the copy its bundle stored when it was saved (no torch needed: the
    Slicer panel lists models on its GUI thread), else the method class's capabilities with the
    bundle's architecture ({} when the method library cannot be imported yet, e.g. before the
    Slicer module installed torch). ValueError for an unknown method or a bad architecture."""
    stored = getattr(meta, "capabilities", None)
    if isinstance(stored, dict):
        return dict(stored)
    try:
        from .methods import capabilities_of
    except ImportError:
        return {}
    return capabilities_of(method, getattr(meta, "architecture", None)).to_dict()


def model_choice(info: Any) -> ModelChoice:
    """A ``ModelChoice`` from a ``model_store.ModelInfo`` (its metadata only; no weights)."""
    if info.error:
        return ModelChoice(info.name, f"{info.name} (cannot be read)", origin=info.origin, path=str(info.path),
                           error=info.error)
    meta = info.meta
    try:
        caps = _capabilities(info.method, meta)
    except ValueError as exc:
        return ModelChoice(info.name, f"{info.name} (cannot be used)", info.method, info.source, info.target,
                           info.origin, str(info.path), error=first_line(exc))
    units, warnings, rois = "", [], DEFAULT_ROIS
    if getattr(meta, "target", None) is not None:
        from .bundle import BundleError, meta_rois, represent_warnings, side_preset

        rois, warnings = meta_rois(meta), represent_warnings(meta)
        try:
            units = side_preset(meta, "target").UNITS
        except BundleError as exc:
            warnings.append(first_line(exc))
    label = (f"{info.name} — {info.method}, {modality_label(info.source)} → {modality_label(info.target)}"
             f"{' (user)' if info.origin == 'user' else ''}")
    return ModelChoice(info.name, label, info.method, info.source, info.target, info.origin, str(info.path),
                       True, None, caps, rois, units, warnings)


def model_choices(volume_modality: str | None = None, models: Sequence[Any] | None = None) -> list[ModelChoice]:
    """Models of ``model_store.list_models()`` (user first, then bundled) that fit the source
    modality (all of them when it is unknown); broken bundles are listed with their error."""
    if models is None:
        from .model_store import list_models

        models = list_models()
    out = []
    for info in models:
        if not info.error and not model_fits(info.source, volume_modality):
            continue
        out.append(model_choice(info))
    return out


def bundled_models() -> list[Path]:
    """The bundled demo model bundles (``Resources/Models``), sorted by name."""
    from .bundle import is_bundle
    from .model_store import bundled_models_dir

    folder = bundled_models_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_bundle(p))


def load_model(model: Any, *, map_location: str = "cpu") -> Any:
    """A loaded ``bundle.Bundle`` from a model name (``model_store``), a bundle path, or a Bundle."""
    from .bundle import Bundle, load_bundle
    from .model_store import find_model

    if isinstance(model, Bundle):
        return model
    return load_bundle(find_model(model), map_location=map_location)


class ModelCache:
    """Keeps the last loaded ``engine.VolumeTranslator`` (model load + transfer to the GPU happen
    once); a changed bundle on disk, device, precision or batch size loads it again, the per-run
    settings (shared noise, extent margin) are set on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._translator: Any = None

    def get(self, options: TranslationOptions) -> Any:
        from .engine import VolumeTranslator
        from .model_store import find_model

        margin = options.extent_margin
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise UserError(f"extent margin must be an integer >= 0, got {margin!r}")
        path = Path(find_model(options.model)).resolve()
        try:
            stamp = max(p.stat().st_mtime_ns for p in ([path] + (list(path.iterdir()) if path.is_dir() else [])))
        except OSError:
            stamp = 0
        key = (str(path), stamp, options.device, options.precision, options.batch_size, options.backend)
        with self._lock:
            if self._key != key:
                self._translator = None  # release the previous model first (GPU memory)
                self._translator = VolumeTranslator(load_model(path), device=options.device,
                                                    precision=options.precision, batch_size=options.batch_size,
                                                    baseline_metrics=True, backend=options.backend)
                self._key = key
            # per-run settings: no reason to load the model again for them
            self._translator.shared_noise = bool(options.shared_noise)
            self._translator.extent_margin = margin
            return self._translator

    def clear(self) -> None:
        with self._lock:
            self._key, self._translator = None, None


_DEFAULT_CACHE = ModelCache()


# ---------------------------------------------------------------------------------------------
# a translation
# ---------------------------------------------------------------------------------------------
#: Seeds are 63-bit: the engine derives every slice's generator from (seed, slice index).
MAX_SEED = 2**63 - 1


@dataclass
class TranslationOptions:
    """What to run: model (name or bundle path), device ("auto" | "cpu" | "cuda:N"), sampling
    steps (None = the method's default) and samples, seed (None = random), which slices (None =
    all, ``(first, last)``, a mask name = that mask's extent, ``ALL_ROIS`` = every ROI mask's),
    ``extent_margin`` slices around a mask's extent."""

    model: str
    device: str = "auto"
    steps: int | None = None
    num_samples: int = 1
    seed: int | None = None
    slices: tuple[int, int] | str | None = None
    extent_margin: int = 4
    batch_size: int | str = "auto"
    precision: str = "auto"
    shared_noise: bool = False
    #: which of ``engine.OPTIONAL_OUTPUTS`` to compute (None: all of them)
    outputs: frozenset[str] | None = None
    #: CPU threads for torch: a positive int, "auto" (``runtime.default_threads``) or None (as set)
    threads: int | str | None = None
    #: "auto": ONNX Runtime for the method's networks on CPU when installed and checked against
    #: PyTorch on the first batch (faster there: issue 14), else PyTorch; "pytorch": PyTorch only
    backend: str = "auto"
    #: "per_slice" (the method's own choice per slice) or "per_volume" (one sample index for the
    #: whole volume, for methods that score their samples: ``engine.SELECT_MODES``)
    select: str = "per_slice"

    def __post_init__(self) -> None:
        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.seed is not None and not (whole(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise UserError(f"seed must be an integer in 0..{MAX_SEED} (or none for a random one), got {self.seed!r}")
        if not (whole(self.num_samples) and 1 <= self.num_samples <= 1024):
            raise UserError(f"the number of samples must be an integer in 1..1024, got {self.num_samples!r}")
        if self.steps is not None and not (whole(self.steps) and self.steps >= 1):
            raise UserError(f"sampling steps must be a positive integer, got {self.steps!r}")
        if self.threads not in (None, "auto") and not (whole(self.threads) and self.threads >= 1):
            raise UserError(f"threads must be a positive integer or 'auto', got {self.threads!r}")
        if self.backend not in ("auto", "pytorch"):
            raise UserError(f"backend must be 'auto' or 'pytorch', got {self.backend!r}")
        if self.select not in SELECT_MODES:
            raise UserError(f"select must be {' or '.join(map(repr, SELECT_MODES))}, got {self.select!r}")

    @property
    def roi_only(self) -> bool:
        return self.slices == ALL_ROIS


@dataclass
class TranslationRequest:
    """The inputs: plain data only (safe to hand to a worker thread)."""

    case: Case
    options: TranslationOptions

    @property
    def source_name(self) -> str:
        return self.case.name

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return self.case.masks


@dataclass
class TranslationOutcome:
    """A finished translation: the engine's ``Result`` and the translator (model) it came from."""

    result: Any
    translator: Any

    @property
    def meta(self) -> Any:
        return self.translator.bundle.meta

    @property
    def model_name(self) -> str:
        return self.translator.model_name


def phantom_case(phantom_case: Any, source: str, target: str | None = None) -> Case:
    """A ``cases.Case`` from a generated ``phantom.PhantomCase``: its ``source`` image, its ROI
    masks (liver, tumor), the body and the label regions (aorta, kidney) from its label map, and
    its ``target`` image as the reference
    (the demo, the Slicer sample data, a web front end's sample case). KeyError names a modality
    the phantom does not render."""
    from .cases import BODY_LABELS, Case, label_region_masks
    from .regions import BODY

    if source not in phantom_case.images:
        raise KeyError(f"the phantom has no {source!r} image")
    masks = {name: m.array > 0 for name, m in phantom_case.masks.items() if name != BODY_LABELS}
    labels = phantom_case.masks[BODY_LABELS].array
    masks[BODY] = labels > 0
    masks.update(label_region_masks(labels, phantom_case.info.get("regions", {})))
    reference = phantom_case.images.get(target) if target else None
    return Case(f"phantom seed {phantom_case.seed}", phantom_case.images[source], masks, reference)


def _slice_range(request: TranslationRequest, translator: Any) -> tuple[int, int] | str | None:
    from .engine import mask_slice_range
    from .regions import BODY, LABEL_REGIONS

    slices = request.options.slices
    if slices != ALL_ROIS:
        return slices
    # the model's ROIs, not the evaluation regions a case's label map gives (the whole aorta)
    rois = [m for name, m in request.case.masks.items()
            if name != BODY and (name not in LABEL_REGIONS or name in translator.roi_names)]
    if not rois:
        raise UserError(f"{request.source_name}: 'only the ROI slices' needs an ROI mask "
                        f"({', '.join(translator.roi_names)})")
    union = np.logical_or.reduce(rois)
    rng = mask_slice_range(union, translator.axis, translator.extent_margin)
    if rng is None:
        raise UserError(f"{request.source_name}: the ROI masks are empty: no ROI slices to translate")
    return rng


def run_translation(request: TranslationRequest, *, cache: ModelCache | None = None,
                    progress: Callable | None = None, cancel: Any = None,
                    message: Callable[[str], None] | None = None) -> TranslationOutcome:
    """Load (or reuse) the model and translate the request's case (any thread; touches no GUI).
    Raises ``engine.TranslationCancelled`` when ``cancel`` fired."""
    from .engine import TranslationCancelled
    from .runtime import set_threads

    opts = request.options
    if opts.threads is not None:
        set_threads(opts.threads)
    if message:
        message("Loading model")
    translator = (cache if cache is not None else _DEFAULT_CACHE).get(opts)
    if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
        raise TranslationCancelled("translation cancelled")
    if message:
        message("Translating")
    case = request.case
    result = translator.translate(case.source, masks=case.masks or None, reference=case.reference,
                                  steps=opts.steps or None, num_samples=int(opts.num_samples), seed=opts.seed,
                                  slice_range=_slice_range(request, translator), progress=progress, cancel=cancel,
                                  outputs=opts.outputs, select=opts.select)
    return TranslationOutcome(result, translator)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
#: Result volumes written per case, as ``Result`` attribute -> file name ({target}: its modality).
_CASE_FILES = {"synthetic": "{target}_synthetic.nii.gz", "difference": "difference.nii.gz",
               "reference_difference": "reference_difference.nii.gz", "uncertainty": "uncertainty.nii.gz"}
METRICS_FILE = "metrics.json"


def output_files(outcome: TranslationOutcome, *, synthetic_name: str | None = None) -> dict[str, str]:
    """Result attribute -> file name of the outputs one case folder holds (those the result has)."""
    target = outcome.meta.target.modality
    names = {key: name.format(target=target) for key, name in _CASE_FILES.items()
             if getattr(outcome.result, key) is not None}
    if synthetic_name is not None:
        names["synthetic"] = synthetic_name
    return names


def metrics_document(outcome: TranslationOutcome, case: Any = None) -> dict:
    """The metrics JSON of one translation (model, case, metrics beside the identity baseline)."""
    meta, result = outcome.meta, outcome.result
    return {"model": str(outcome.translator.bundle.path), "method": meta.method,
            "source": meta.source.modality, "target": meta.target.modality,
            "case": getattr(case, "name", None), "input": str(getattr(case, "source", "")) or None,
            "metrics": result.metrics, "identity": result.baseline_metrics,
            "consistency": result.consistency, "slice_range": list(result.slice_range),
            "confidence": confidence_document(result.confidence), "info": result.info}


def confidence_document(confidence: Any) -> dict | None:
    """The ``confidence`` entry of the metrics JSON: ``per_slice`` (one value per slice along the
    axis, null where not translated) and ``summary`` (``maps.confidence_summary``); None when the
    method gives no confidence."""
    summary = confidence_summary(confidence)
    if summary is None:
        return None
    per_slice = [float(c) if np.isfinite(c) else None for c in np.asarray(confidence, dtype=np.float64)]
    return {"per_slice": per_slice, "summary": summary}


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as JSON atomically (a temporary file renamed into place)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_outputs(items: Sequence[tuple[Any, Path]], modality: str, *, level: int | None = None) -> list[Path]:
    """Write volumes / JSON documents all or nothing (``io.OutputSet``): each is staged next to its
    target and all are moved into place at the end; a failure (or an interrupt) leaves the
    previous outputs as they were. ``level``: compression level of compressed formats (1..9)."""
    from . import io

    with io.OutputSet() as outputs:
        for obj, path in items:
            if isinstance(obj, io.Volume):
                outputs.add_volume(obj, path, modality=modality, level=level)
            else:
                outputs.add_file(lambda staged, obj=obj: write_json(obj, staged), path)
        return outputs.commit()


def write_case_folder(outcome: TranslationOutcome, folder: Path, case: Any = None, *,
                      level: int | None = None) -> list[Path]:
    """Every output of one case, and ``metrics.json``, into ``folder`` at once: written into a
    temporary sibling folder that then replaces ``folder`` (``io.replace_dir``: the previous
    outputs come back if the swap fails). A ``folder`` holding other files is refused."""
    from .io import private_temp_dir, replace_dir

    names = output_files(outcome)
    if folder.exists():
        allowed = {*(n.format(target=outcome.meta.target.modality) for n in _CASE_FILES.values()), METRICS_FILE}
        if not folder.is_dir() or any(p.name not in allowed for p in folder.iterdir()):
            raise UserError(f"{folder}: exists and holds other files; not replacing it")
    tmp = private_temp_dir(folder.parent, folder.name)
    try:
        items = [(getattr(outcome.result, key), tmp / name) for key, name in names.items()]
        items.append((metrics_document(outcome, case), tmp / METRICS_FILE))
        write_outputs(items, outcome.translator.target_preset.DICOM_MODALITY, level=level)
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [folder / name for name in (*names.values(), METRICS_FILE)]
