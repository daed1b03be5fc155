"""Modality names: families, readable labels, DICOM codes, and which model fits which volume.

Modality names are the case-folder stems of the data (``ct``, ``cta_arterial``, ``t1_post``,
``pet``, ...). Their physical units belong to the intensity presets (``IntensityPreset.UNITS``,
``DICOM_MODALITY``); this module only knows names. Leaf module.
"""

from __future__ import annotations

__all__ = ["DICOM_TO_MODALITY", "modality_family", "modality_label", "model_fits", "from_dicom"]

#: DICOM Modality (0008,0060) -> our modality family.
DICOM_TO_MODALITY = {"CT": "ct", "MR": "mr", "PT": "pet", "NM": "pet"}

_LABELS = {
    "ct": "CT", "cta": "CTA", "cta_arterial": "CTA (arterial)", "cta_portal": "CT (portal venous)",
    "mr": "MR", "t1": "T1", "t1_post": "T1 post-contrast", "t2": "T2", "pet": "PET", "cbct": "CBCT",
}


def from_dicom(code: str) -> str:
    """A DICOM Modality code -> modality name (unknown codes lower-cased)."""
    code = code.strip()
    return DICOM_TO_MODALITY.get(code.upper(), code.lower())


def modality_family(modality: str | None) -> str | None:
    """``ct``/``cta_*`` -> ct, ``mr*``/``t1*``/``t2*``/``flair`` -> mr, ``pet``/``pt`` -> pet."""
    if not modality:
        return None
    m = modality.strip().lower()
    if m.startswith("cbct"):
        return "cbct"
    if m.startswith("ct"):
        return "ct"
    if m.startswith(("mr", "t1", "t2", "flair", "dwi", "pd")):
        return "mr"
    if m in ("pet", "pt") or m.startswith("pet"):
        return "pet"
    return m


def modality_label(modality: str | None) -> str:
    """Readable name: ``cta_arterial`` -> ``CTA (arterial)``; unknown names are returned as is."""
    if not modality:
        return "?"
    return _LABELS.get(modality.lower(), modality)


def model_fits(model_source: str | None, volume_modality: str | None) -> bool:
    """Can a model trained on ``model_source`` images take a ``volume_modality`` volume? True when
    either is unknown."""
    a, b = modality_family(model_source), modality_family(volume_modality)
    return a is None or b is None or a in ("?", "unknown") or a == b
