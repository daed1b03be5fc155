"""What one browser session holds and does, without any UI: the case, the model list, a running
translation (``runner.TranslationProcess``, polled by the page) and its result. Everything goes through the
application layer (``MedTranslateLib.app``); the page (``server.py``) only shows what comes back.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from MedTranslateLib import app
from MedTranslateLib.regions import ordered_regions
from MedTranslateLib.runtime import first_line

#: The sample case: the demo's phantom (``make demo``: dataset seed 4, case 0; not in the demo
#: models' training data), CT as the source and the arterial CTA as the reference.
SAMPLE_DATASET_SEED = 4
SAMPLE_SOURCE, SAMPLE_REFERENCE = "ct", "cta_arterial"
#: Upload limits: one file, and what a DICOM zip may unpack to. Only single-file formats (a
#: .nhdr/.mhd header names a second file that an upload does not bring).
MAX_UPLOAD_BYTES = 1 << 30
MAX_ZIP_MEMBERS = 5000
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".zip")


@dataclass
class LoadedCase:
    """A case ready to translate: the app-layer ``Case``, its modality (None: unknown, every
    model is offered) and a label for the page."""

    case: Any
    modality: str | None
    label: str


def sample_case() -> LoadedCase:
    """The phantom sample case (generated, nothing downloaded)."""
    from MedTranslateLib import phantom

    seed = phantom.case_seed(SAMPLE_DATASET_SEED, 0)
    case = app.phantom_case(phantom.generate_case(seed), SAMPLE_SOURCE, SAMPLE_REFERENCE)
    return LoadedCase(case, SAMPLE_SOURCE, f"Phantom sample case (seed {seed}): CT, arterial CTA as reference")


def _safe_name(name: str) -> str:
    """The file's own name without any folder part (a browser may send a path)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name.strip()
    return base if base not in ("", ".", "..") else "upload"


def _extract_zip(path: Path, into: Path, shown: str) -> Path:
    """Unpack a DICOM zip (no member may leave ``into``; bounded size); returns ``into``."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise app.UserError(f"{shown}: the zip file is empty")
            if len(members) > MAX_ZIP_MEMBERS or sum(m.file_size for m in members) > 4 * MAX_UPLOAD_BYTES:
                raise app.UserError(f"{shown}: the zip file is too large to unpack here")
            root = into.resolve()
            for member in members:
                target = (into / member.filename).resolve()
                if root not in target.parents:
                    raise app.UserError(f"{shown}: the zip file has a member outside its folder ({member.filename})")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as exc:
        raise app.UserError(f"{shown}: not a readable zip file ({exc})") from None
    folders = {p.parent for p in into.rglob("*") if p.is_file()}
    if len(folders) != 1:
        raise app.UserError(f"{shown}: the zip file must hold one folder of DICOM slices, found {len(folders)} folders")
    return folders.pop()


def _dicom_modality(folder: Path) -> str | None:
    """The modality of a DICOM series folder from its Modality tag (None when unknown)."""
    import SimpleITK as sitk

    from MedTranslateLib.modality import from_dicom

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(min(p for p in folder.iterdir() if p.is_file())))
    try:
        reader.ReadImageInformation()
        code = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
    except RuntimeError:
        return None
    return from_dicom(code) if code else None


def read_upload(name: str, content: bytes) -> LoadedCase:
    """A case from an uploaded file (NIfTI, NRRD, MHA, or a zip of one DICOM series). Any
    problem is a ``UserError`` with the one line the CLI prints for the same file."""
    from MedTranslateLib import io as mio

    modality = None
    shown = _safe_name(name)
    if not shown.lower().endswith(VOLUME_SUFFIXES):
        raise app.UserError(f"{shown}: not a volume file (expected {', '.join(VOLUME_SUFFIXES)})")
    if len(content) > MAX_UPLOAD_BYTES:
        raise app.UserError(f"{shown}: the file is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
    folder = Path(tempfile.mkdtemp(prefix="medtranslate-web-"))
    try:
        path = folder / shown
        path.write_bytes(content)
        if shown.lower().endswith(".zip"):
            path = _extract_zip(path, folder / "dicom", shown)
            modality = _dicom_modality(path)
        try:
            volume = mio.read_volume(path)
        except (ValueError, OSError, RuntimeError, EOFError) as exc:
            # the CLI's line for a file given by its name (not the temporary folder it is in here)
            raise app.UserError(first_line(exc).replace(f"{folder}/", "")) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    from MedTranslateLib.cases import Case

    return LoadedCase(Case(shown, volume), modality, f"{shown}: {'×'.join(map(str, volume.shape))} voxels")


def model_items(modality: str | None) -> list[dict[str, Any]]:
    """The model list for the page: value, label, whether it samples (steps/samples apply) and a
    line of capabilities and warnings (``app.model_choices``: filtered by modality)."""
    items = []
    for choice in app.model_choices(modality):
        caps = choice.capabilities
        offers = [k for k in ("stochastic", "uncertainty", "confidence") if caps.get(k)]
        text = ", ".join(offers) if offers else "deterministic"
        if choice.units:
            text += f"; output in {choice.units}"
        if choice.error:
            text = choice.error
        items.append({"value": choice.name, "title": choice.label, "stochastic": choice.steps,
                      "caps": "; ".join([text, *choice.warnings]), "units": choice.units or "target units",
                      "disabled": bool(choice.error)})
    return items


def device_items(choices) -> list[dict[str, str]]:
    """The device list for the page from ``[(label, device spec)]`` (``runner.DeviceQuery``)."""
    return [{"title": label, "value": spec} for label, spec in choices]


def start(loaded: LoadedCase, options: app.TranslationOptions) -> Any:
    """A started translation in its own process (``runner.TranslationProcess``: ``app.run_translation``
    in a child Python, as the Slicer module runs it): the page polls it like a ``worker.Job``, the
    server's event loop never waits on the model, Cancel ends the process at once and a crash in
    it is one message. Its ``result`` is a ``runner.ProcessResult`` (the engine's fields + model)."""
    from MedTranslateLib.runner import TranslationProcess

    return TranslationProcess(app.TranslationRequest(loaded.case, options), name="MedTranslate web").start()


def _number(value: Any, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


METRIC_COLUMNS = (("mae", 2), ("psnr", 2), ("ssim", 4), ("rmse", 2))


def metrics_rows(result: Any) -> list[dict[str, str]]:
    """One row per region of a result (the engine's or a ``ProcessResult``): the model's
    MAE/PSNR/SSIM/RMSE and the identity baseline's MAE."""
    metrics = result.metrics or {}
    identity = result.baseline_metrics or {}
    rows = []
    for region in ordered_regions(metrics):
        row = {"region": region}
        for key, digits in METRIC_COLUMNS:
            row[key] = _number(metrics[region].get(key), digits)
        row["identity_mae"] = _number(identity.get(region, {}).get("mae"), 2)
        rows.append(row)
    return rows


def confidence_rows(result: Any) -> list[dict[str, str]]:
    """Per-slice confidence (methods that give one), in slice order."""
    conf = result.confidence
    if conf is None:
        return []
    first = result.slice_range[0]
    return [{"slice": str(first + i), "confidence": _number(float(c), 3)} for i, c in enumerate(conf)]


def result_file_name(result: Any) -> str:
    """``synthetic_<target>_<model>.nii.gz`` for a ``ProcessResult``."""
    return _safe_name(f"synthetic_{result.model.get('target', 'image')}_{result.model.get('name', 'model')}.nii.gz")


def result_nifti(result: Any, folder: Path) -> Path:
    """The synthetic volume as NIfTI in ``folder`` (``io.write_volume``: all or nothing)."""
    from MedTranslateLib import io as mio

    path = folder / result_file_name(result)
    mio.write_volume(result.synthetic, path)
    return path
