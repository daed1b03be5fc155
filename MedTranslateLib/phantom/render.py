"""Every modality of one tissue map, with the acquisition effects.

Order of operations per modality (as in a scanner):
1. tissue properties from the tables of :mod:`.tissues` plus smooth intra-organ texture (one
   heterogeneity field shared by all modalities, so CT and MR show the same microstructure) and,
   for contrast phases, smooth perfusion heterogeneity (one field per phase, shared by the
   portal-venous CT and the post-contrast MR, which is taken in the portal-venous phase);
2. the noise-free image: HU, or the spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` with
   gadolinium shortening for T1 post-contrast and the flow void of fast blood on T2;
3. partial-volume blur (Gaussian, ``partial_volume_sigma`` voxels);
4. for the target modalities only, the optional rigid misregistration (the patient moved
   between the source and the target acquisition: resampling of the noise-free image);
5. MR: a smooth multiplicative bias field (a shared coil profile plus a per-sequence part);
6. noise in the scanner frame: CT Gaussian (slightly correlated in-plane, like filtered back
   projection), MR Rician (magnitude of the signal plus complex Gaussian noise).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import _geometry as geo
from . import tissues as T

__all__ = ["render_images", "SOURCE_MODALITIES", "TARGET_MODALITIES", "CT_PHASES"]

CT_PHASES = {"ct": 0, "cta_arterial": 1, "cta_portal": 2}
SOURCE_MODALITIES = ("ct", "t1")
TARGET_MODALITIES = ("cta_arterial", "cta_portal", "t1_post", "t2")

_CT_TEXTURE_HU = 6.0        # HU per unit texture strength and unit field
_MR_TEXTURE = (0.05, 0.04, 0.02)  # relative T1, T2, PD change per unit texture and field
_SPLEEN_ZEBRA = 0.35        # relative amplitude of the arciform arterial-phase spleen pattern


def _phys_axes(grid: geo.Grid):
    """1-D physical coordinates (mm, relative to the centre) of the (z, y, x) voxel centres."""
    return (grid.z * grid.scale_z, grid.y * grid.scale_xy, grid.x * grid.scale_xy)


def _ct_noise(rng, shape, sd: float) -> np.ndarray:
    """Gaussian noise with standard deviation ``sd``, lightly correlated in-plane."""
    n = rng.standard_normal(shape, dtype=np.float32)
    sigma = 0.6
    n = ndimage.gaussian_filter(n, (0.0, sigma, sigma))
    delta = np.zeros(15)
    delta[7] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma)
    n *= np.float32(sd / (k * k).sum())
    return n


def _rician(rng, signal: np.ndarray, sd: float) -> np.ndarray:
    re = signal + sd * rng.standard_normal(signal.shape, dtype=np.float32)
    im = sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def _rigid(rng, max_mm: float, max_deg: float) -> dict:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * max_mm * rng.uniform(0.5, 1.0)
    angles = rng.uniform(-1.0, 1.0, 3) * max_deg
    return {"translation_mm": [float(v) for v in shift], "rotation_deg": [float(v) for v in angles]}


def _apply_rigid(image: np.ndarray, spacing, transform: dict) -> np.ndarray:
    """``out(p) = image(R (p - c) + c + t)`` with p in physical mm (x, y, z), c the volume
    centre, R the rotation (x, y, z angles, x first) and t the translation."""
    r_xyz = geo.rotation(*transform["rotation_deg"])
    t_xyz = np.asarray(transform["translation_mm"], dtype=np.float64)
    perm = [2, 1, 0]  # (x, y, z) -> (z, y, x)
    r = r_xyz[np.ix_(perm, perm)]
    t = t_xyz[perm]
    s = np.asarray(spacing, dtype=np.float64)[perm]
    m = r * s[None, :] / s[:, None]                 # S^-1 R S
    c = (np.asarray(image.shape, dtype=np.float64) - 1.0) / 2.0
    offset = c - m @ c + t / s
    return ndimage.affine_transform(image, m, offset=offset, order=1, mode="nearest")


def render_images(tissue: np.ndarray, grid: geo.Grid, config, rngs: dict) -> tuple[dict, dict]:
    """(images, misregistration): float32 (z, y, x) arrays for every modality (CT in HU, MR in
    arbitrary units ~0..1000) and the rigid transform applied to each target modality."""
    pz, py, px = _phys_axes(grid)
    shape = tissue.shape
    rt = rngs["texture"]
    tex_strength = config.texture
    delta = 0.6 * geo.grf(rt, pz, py, px, 3.5) + 0.8 * geo.grf(rt, pz, py, px, 15.0)
    perf = {1: geo.grf(rt, pz, py, px, 10.0), 2: geo.grf(rt, pz, py, px, 12.0)}
    zebra = np.sin(2.4 * np.pi * geo.grf(rt, pz, py, px, 12.0))

    tex = T.lookup(T.column("texture"), tissue) * np.float32(tex_strength)
    tex_delta = tex * delta
    perf_amp = T.column("perfusion") * np.float32(tex_strength)
    spleen = tissue == T.tissue_index("spleen")
    spleen_enh = T.TISSUES[T.tissue_index("spleen")].hu

    clean: dict[str, np.ndarray] = {}
    for name, phase in CT_PHASES.items():
        table = T.ct_table(phase)
        hu = T.lookup(table, tissue) + np.float32(_CT_TEXTURE_HU) * tex_delta
        if phase:
            enh = table - T.ct_table(0)
            hu += T.lookup(enh * perf_amp, tissue) * perf[phase]
            if phase == 1:
                amp = _SPLEEN_ZEBRA * tex_strength * (spleen_enh[1] - spleen_enh[0])
                hu[spleen] += np.float32(amp) * zebra[spleen]
        clean[name] = hu

    t1_tab, t2_tab, pd_tab = T.mr_table(config.field_strength_t)
    k1, k2, kp = (np.float32(k) for k in _MR_TEXTURE)
    r1 = 1.0 / (T.lookup(t1_tab, tissue) * (1.0 - k1 * tex_delta))
    r2 = 1.0 / (T.lookup(t2_tab, tissue) * (1.0 - k2 * tex_delta))
    pd = T.lookup(pd_tab, tissue) * (1.0 - kp * tex_delta)
    gd = T.lookup(T.gd_portal_mm(), tissue) * np.maximum(0.0, 1.0 + T.lookup(perf_amp, tissue) * perf[2])
    tr1, te1 = config.t1_tr_ms / 1000.0, config.t1_te_ms / 1000.0
    tr2, te2 = config.t2_tr_ms / 1000.0, config.t2_te_ms / 1000.0
    gain = np.float32(config.mr_scale)
    clean["t1"] = gain * pd * (1.0 - np.exp(-tr1 * r1)) * np.exp(-te1 * r2)
    r1p = r1 + np.float32(config.gd_r1) * gd
    r2p = r2 + np.float32(config.gd_r2) * gd
    clean["t1_post"] = gain * pd * (1.0 - np.exp(-tr1 * r1p)) * np.exp(-te1 * r2p)
    t2 = gain * pd * (1.0 - np.exp(-tr2 * r1)) * np.exp(-te2 * r2)
    if config.t2_flow_void:
        t2 *= 1.0 - T.lookup(T.column("flow"), tissue)
    clean["t2"] = t2
    del r1, r2, pd, gd, r1p, r2p, tex_delta, delta

    if config.partial_volume_sigma > 0:
        for name in clean:
            clean[name] = ndimage.gaussian_filter(clean[name], config.partial_volume_sigma, mode="nearest")

    misregistration: dict[str, dict] = {}
    if config.misregistration_mm > 0:
        rm = rngs["misregistration"]
        max_deg = min(3.0, 0.5 * config.misregistration_mm)
        for name in TARGET_MODALITIES:
            transform = _rigid(rm, config.misregistration_mm, max_deg)
            clean[name] = _apply_rigid(clean[name], grid.spacing, transform)
            misregistration[name] = transform

    images: dict[str, np.ndarray] = {}
    rn = rngs["noise"]
    for name in ("ct", "cta_arterial", "cta_portal"):
        img = clean.pop(name)
        if config.ct_noise_hu > 0:
            img += _ct_noise(rn, shape, config.ct_noise_hu)
        images[name] = np.clip(img, -1024.0, 3071.0).astype(np.float32)

    rb = rngs["bias"]
    coil = None
    if config.mr_bias > 0:
        shared = geo.grf(rb, pz, py, px, 120.0)
        radial = (px[None, None, :] / 160.0) ** 2 + (py[None, :, None] / 130.0) ** 2
        coil = 0.8 * shared + 1.5 * (radial - 0.3)
    for name in ("t1", "t1_post", "t2"):
        img = clean.pop(name)
        if coil is not None:
            own = geo.grf(rb, pz, py, px, 100.0)
            img *= np.exp(np.float32(config.mr_bias) * (coil + 0.6 * own))
        if config.mr_noise > 0:
            img = _rician(rn, img, config.mr_noise)
        images[name] = np.maximum(img, 0.0).astype(np.float32)
    return images, misregistration
