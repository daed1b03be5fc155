"""Tissue tables of the phantom: one row per tissue, every modality of the same anatomy.

The anatomy is painted as a *tissue map* (uint8, one index per row of :data:`TISSUES`). A tissue
is finer than a label: e.g. the enhancing rim and the hypovascular interior of a tumor are two
tissues with the one label ``tumor_viable``. ``labels.nii.gz`` is ``TISSUE_LABEL[tissue_map]``.

CT (HU, three phases of one contrast injection)
    ``hu = (non-contrast, late arterial ~35 s, portal venous ~70 s)``. Typical adult values from
    routine multiphase abdominal CT: unenhanced blood 40-45 HU; aorta ~300-400 HU (arterial) and
    ~150-180 HU (portal); liver ~55 -> ~70 -> ~110 HU; pancreas peaks in the late arterial
    ("pancreatic") phase; kidneys corticomedullary (cortex >> medulla) in the arterial phase and
    nephrographic-like (both ~150-170 HU) by the portal phase; spleen 45 -> heterogeneous
    "zebra" ~120 -> homogeneous ~120 HU; hypervascular tumor (HCC-like) arterial hyperenhancement
    with portal "washout" below liver; hypovascular metastasis-like tumor below liver in every
    phase; necrosis ~20 HU, non-enhancing; fat ~-100; muscle ~50; cortical bone ~1100 (a thin
    shell: partial volume brings it to ~700-900 HU at 2.5 mm); ribs and posterior vertebral
    elements (cortex and marrow mixed at this resolution) ~450; vertebral cancellous bone ~220;
    disc ~85; CSF/cord ~20; bile and bowel fluid ~10;
    gas / air -1000 HU; aerated lung ~-850 HU.

MR (spin echo, relaxation times in ms at 1.5 T and 3.0 T, relative proton density PD)
    ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)``. In vivo relaxation times of liver, spleen,
    pancreas, renal cortex/medulla, paravertebral muscle, vertebral marrow and subcutaneous fat
    at 1.5 T and 3.0 T from de Bazelaire et al., Radiology 2004;230:652-659. Blood at 1.5 T from
    Stanisz et al., MRM 2005;54:507-512 (T1 1441 ms, T2 290 ms; 3 T: 1932/275); venous blood a
    shorter T2 (deoxyhaemoglobin). CSF T1 ~4000 ms, T2 ~2000 ms. Tumors: longer T1 and T2 than
    liver (T2 ~80-100 ms for HCC / metastases; necrosis and fluid much longer), bile, bowel fluid
    and urine close to water. Cortical bone has T2* far below any TE used here (no signal); gas
    and air have no protons. PD values are relative to water (1.0). Values without a measured
    3 T figure take T1 x 1.21 and T2 x 0.92 (the average 1.5 -> 3 T changes reported by de
    Bazelaire et al.: T1 21 % longer, T2 8 % shorter).

Contrast (gadolinium, post-contrast MR)
    Iodinated and gadolinium agents are both extracellular, so the local concentration of either
    follows the same perfusion pattern. The post-contrast T1 uses the portal-venous phase: its
    gadolinium concentration (mM) is the portal-phase CT enhancement divided by
    :data:`HU_PER_MM_GD` (aorta +125 HU -> ~0.8 mM, liver +55 HU -> ~0.34 mM, necrosis 0),
    and shortens ``1/T1 += r1 * C`` and ``1/T2 += r2 * C``.

Texture and flow
    ``texture``: strength of the smooth intra-organ heterogeneity (shared by every modality,
    so the same microstructure shows in CT and MR). ``perfusion``: relative heterogeneity of the
    contrast enhancement. ``flow``: fraction of the blood signal lost to the spin-echo flow void
    on T2 (fast flow in the aorta/IVC, slower in portal and hepatic veins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..regions import AORTA, KIDNEY

__all__ = ["LABELS", "REGION_LABELS", "TISSUES", "Tissue", "HU_PER_MM_GD", "tissue_index", "lookup",
           "region_table"]

#: Label map values of ``labels.nii.gz`` (0 = outside the body).
LABELS: dict[str, int] = {
    "background": 0,
    "fat": 1,             # subcutaneous, visceral, perirenal and renal-sinus fat
    "muscle": 2,          # abdominal wall, paraspinal and psoas muscles
    "bone": 3,            # cortical bone: vertebral shell, posterior elements, ribs
    "spinal_canal": 4,    # CSF and cord
    "liver": 5,           # liver parenchyma
    "tumor_viable": 6,    # viable tumor (enhancing rim, hyper- or hypovascular tissue)
    "tumor_necrotic": 7,  # non-enhancing necrotic core
    "aorta": 8,           # aorta and its branches (celiac, hepatic, splenic, SMA, renal)
    "ivc": 9,             # inferior vena cava and renal veins
    "portal_vessel": 10,  # portal vein and its intrahepatic branches, splenic vein, SMV
    "hepatic_vessel": 11,  # hepatic veins
    "kidney_cortex": 12,
    "kidney_medulla": 13,
    "spleen": 14,
    "bowel": 15,          # bowel and stomach wall / collapsed loops (soft tissue)
    "bone_marrow": 16,    # cancellous bone of the vertebral bodies
    "disc": 17,           # intervertebral discs
    "pancreas": 18,
    "gallbladder": 19,
    "fluid": 20,          # bowel / stomach fluid, renal pelvis urine
    "gas": 21,            # bowel and stomach gas (inside the body, so not background)
    "lung": 22,           # lung bases in the posterior costophrenic recesses, above the dome
}

#: Label regions (``regions.LABEL_REGIONS``) -> the labels that form them: where the arterial
#: phase enhances (aorta +308 HU, renal cortex +158 HU; the liver only +15 HU).
REGION_LABELS: dict[str, tuple[str, ...]] = {
    AORTA: ("aorta",),
    KIDNEY: ("kidney_cortex", "kidney_medulla"),
}

#: CT enhancement (HU) per mM of gadolinium for the post-contrast MR concentration.
HU_PER_MM_GD = 160.0


@dataclass(frozen=True)
class Tissue:
    name: str
    label: str
    hu: tuple[float, float, float]          # non-contrast, arterial, portal venous
    mr15: tuple[float, float, float]        # T1 ms, T2 ms, PD at 1.5 T
    mr30: tuple[float, float] | None = None  # T1 ms, T2 ms at 3.0 T (None: derived)
    texture: float = 1.0
    perfusion: float = 0.06
    flow: float = 0.0


# Order = tissue index in the tissue map. Keep "air" first (index 0).
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", "background", (-1000, -1000, -1000), (1000, 1, 0.0), (1000, 1), 0.0, 0.0),
    Tissue("fat", "fat", (-100, -98, -95), (343, 58, 0.90), (382, 68), 0.5, 0.05),
    # perirenal (retroperitoneal) fat: the same tissue, a separate index only so that liver
    # and spleen are not painted around the kidneys
    Tissue("perirenal_fat", "fat", (-100, -98, -95), (343, 58, 0.90), (382, 68), 0.5, 0.05),
    Tissue("muscle", "muscle", (50, 58, 65), (856, 27, 0.72), (898, 29), 1.0, 0.06),
    Tissue("cortical_bone", "bone", (1100, 1105, 1110), (250, 0.5, 0.05), (300, 0.5), 1.5, 0.0),
    Tissue("bone_mixed", "bone", (450, 455, 460), (450, 30, 0.35), (520, 28), 2.0, 0.0),
    Tissue("marrow", "bone_marrow", (220, 228, 235), (549, 49, 0.80), (586, 49), 3.0, 0.06),
    Tissue("disc", "disc", (85, 88, 92), (1100, 110, 0.80), None, 1.0, 0.04),
    Tissue("csf", "spinal_canal", (20, 20, 20), (4000, 2000, 1.00), (4200, 1800), 0.3, 0.0),
    Tissue("liver", "liver", (55, 70, 110), (586, 46, 0.70), (809, 34), 1.0, 0.06),
    Tissue("tumor_hypervascular", "tumor_viable", (45, 125, 85), (1100, 85, 0.80), None, 2.0, 0.12),
    Tissue("tumor_rim", "tumor_viable", (45, 140, 115), (1000, 80, 0.80), None, 1.5, 0.10),
    Tissue("tumor_hypovascular", "tumor_viable", (40, 55, 75), (1200, 90, 0.82), None, 2.0, 0.10),
    Tissue("tumor_necrotic", "tumor_necrotic", (20, 20, 21), (2500, 250, 0.92), None, 1.5, 0.0),
    Tissue("arterial_blood", "aorta", (42, 350, 165), (1441, 290, 0.85), (1932, 275), 0.0, 0.0, 0.9),
    Tissue("ivc_blood", "ivc", (42, 85, 150), (1441, 200, 0.85), (1932, 180), 0.0, 0.0, 0.85),
    Tissue("portal_blood", "portal_vessel", (42, 110, 180), (1441, 200, 0.85), (1932, 180), 0.0, 0.0, 0.7),
    Tissue("hepatic_blood", "hepatic_vessel", (42, 55, 165), (1441, 200, 0.85), (1932, 180), 0.0, 0.0, 0.7),
    Tissue("kidney_cortex", "kidney_cortex", (32, 190, 170), (966, 87, 0.80), (1142, 76), 0.8, 0.06),
    Tissue("kidney_medulla", "kidney_medulla", (30, 80, 150), (1412, 85, 0.85), (1545, 81), 0.8, 0.08),
    Tissue("spleen", "spleen", (45, 120, 120), (1057, 79, 0.78), (1328, 61), 1.0, 0.06),
    Tissue("bowel", "bowel", (35, 70, 90), (900, 50, 0.75), None, 1.5, 0.10),
    Tissue("pancreas", "pancreas", (40, 125, 100), (584, 46, 0.72), (725, 43), 2.0, 0.08),
    Tissue("bile", "gallbladder", (10, 10, 10), (2500, 700, 0.95), None, 0.2, 0.0),
    Tissue("fluid", "fluid", (8, 8, 8), (3000, 1000, 0.97), None, 0.2, 0.0),
    Tissue("gas", "gas", (-1000, -1000, -1000), (1000, 1, 0.0), (1000, 1), 0.0, 0.0),
    Tissue("lung", "lung", (-850, -845, -840), (1200, 40, 0.15), (1400, 30), 0.5, 0.0),
)

_INDEX = {t.name: i for i, t in enumerate(TISSUES)}

#: tissue index -> label value
TISSUE_LABEL = np.array([LABELS[t.label] for t in TISSUES], dtype=np.uint8)


def region_table() -> dict[str, list[int]]:
    """Label region name -> its values in ``labels.nii.gz`` (``cases.read_region_table``'s format)."""
    return {region: [LABELS[label] for label in labels] for region, labels in REGION_LABELS.items()}


def tissue_index(name: str) -> int:
    return _INDEX[name]


def lookup(values, tissue_map: np.ndarray) -> np.ndarray:
    """Per-voxel value from a per-tissue table: float32 array shaped like ``tissue_map``."""
    return np.asarray(values, dtype=np.float32)[tissue_map]


def ct_table(phase: int) -> np.ndarray:
    """HU per tissue; phase 0 non-contrast, 1 arterial, 2 portal venous."""
    return np.array([t.hu[phase] for t in TISSUES], dtype=np.float32)


def mr_table(field_strength_t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 s, T2 s, PD) per tissue at 1.5 T or 3.0 T."""
    t1, t2, pd = [], [], []
    for t in TISSUES:
        a1, a2, p = t.mr15
        if field_strength_t >= 2.25:
            a1, a2 = t.mr30 if t.mr30 is not None else (a1 * 1.21, a2 * 0.92)
        t1.append(a1 / 1000.0)
        t2.append(a2 / 1000.0)
        pd.append(p)
    return (np.array(t1, np.float32), np.array(t2, np.float32), np.array(pd, np.float32))


def gd_portal_mm() -> np.ndarray:
    """Gadolinium concentration (mM) per tissue in the portal-venous phase."""
    return np.array([max(0.0, t.hu[2] - t.hu[0]) / HU_PER_MM_GD if t.hu[0] > -500 else 0.0
                     for t in TISSUES], dtype=np.float32)


def column(attr: str) -> np.ndarray:
    return np.array([getattr(t, attr) for t in TISSUES], dtype=np.float32)
