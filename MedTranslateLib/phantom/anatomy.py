"""Random upper-abdominal anatomy painted as a tissue map.

Frame: model millimetres (see :mod:`._geometry`), x to the patient's LEFT, y POSTERIOR, z
SUPERIOR (LPS), origin at the volume centre. The liver is on the patient's right, i.e. at
negative x (small x indices); the spine is posterior (large y indices). The reference anatomy
spans about 330 x 330 mm in-plane and 160 mm along z (from above the liver dome, with the lung
bases in the posterior recesses, to the lower poles of the kidneys); a smaller field of view
shrinks it to fit (``scale_xy``, ``scale_z``), a larger one shows more air around it and, along
z, more body wall, spine, great vessels and bowel.

Painting order matters: each organ is painted only over the tissues listed as ``allowed`` for
it (mostly the contents of the abdominal cavity: visceral fat, bowel, fluid, gas), so organs
conform to one another and to the abdominal wall instead of overlapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import _geometry as geo
from .tissues import TISSUE_LABEL, TISSUES, tissue_index

__all__ = ["Anatomy", "build_anatomy", "make_grid", "REFERENCE_FOV_MM"]

#: Field of view (x/y, z) in mm that the reference anatomy fills at scale 1.
REFERENCE_FOV_MM = (330.0, 160.0)

AIR, FAT, RETRO_FAT, MUSCLE, CORTICAL, BONE_MIXED, MARROW, DISC, CSF = (
    tissue_index(n) for n in ("air", "fat", "perirenal_fat", "muscle", "cortical_bone", "bone_mixed",
                              "marrow", "disc", "csf"))
LIVER, T_HYPER, T_RIM, T_HYPO, T_NECROTIC = (
    tissue_index(n) for n in ("liver", "tumor_hypervascular", "tumor_rim", "tumor_hypovascular",
                              "tumor_necrotic"))
ARTERY, IVC, PORTAL, HEPATIC = (
    tissue_index(n) for n in ("arterial_blood", "ivc_blood", "portal_blood", "hepatic_blood"))
CORTEX, MEDULLA, SPLEEN, BOWEL, PANCREAS, BILE, FLUID, GAS, LUNG = (
    tissue_index(n) for n in ("kidney_cortex", "kidney_medulla", "spleen", "bowel", "pancreas",
                              "bile", "fluid", "gas", "lung"))

CAVITY = (FAT, BOWEL, FLUID, GAS)
TUMOR_TISSUES = (T_HYPER, T_RIM, T_HYPO, T_NECROTIC)
#: Tumor types: (name, tissue of the viable part). "rim_enhancing": hypervascular rim around
#: hypo-enhancing viable tissue; "necrotic": enhancing rim, viable layer, necrotic core.
TUMOR_TYPES = ("hypervascular", "rim_enhancing", "necrotic", "hypovascular")


def _allowed(*tissues: int) -> np.ndarray:
    table = np.zeros(len(TISSUES), dtype=bool)
    table[list(tissues)] = True
    return table


A_CAVITY = _allowed(*CAVITY)
A_VESSEL = _allowed(*CAVITY, PANCREAS, LUNG)


@dataclass
class Anatomy:
    """``tissue``: (z, y, x) uint8 tissue indices; ``liver``/``tumor``: (z, y, x) bool;
    ``info``: organ positions (model mm) and the tumors (model mm; converted by the caller)."""

    tissue: np.ndarray
    liver: np.ndarray
    tumor: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return TISSUE_LABEL[self.tissue]


def make_grid(shape, spacing) -> geo.Grid:
    """The model grid of a volume: the anatomy is shrunk when the field of view is smaller
    than :data:`REFERENCE_FOV_MM`, never enlarged."""
    nz, ny, nx = shape
    sx, sy, sz = spacing
    fov_xy, fov_z = REFERENCE_FOV_MM
    scale_xy = min(1.0, nx * sx / fov_xy, ny * sy / fov_xy)
    scale_z = min(1.0, nz * sz / fov_z)
    return geo.Grid(shape, spacing, scale_xy, scale_z)


def _paint(tissue, box, mask, value, allowed=None, region=None) -> np.ndarray:
    """Paint ``value`` where ``mask`` (shaped like the box) and the constraints hold; returns
    the painted mask."""
    view = tissue[box]
    m = np.broadcast_to(mask, view.shape)
    if allowed is not None:
        m = m & allowed[view]
    if region is not None:
        m = m & region[box]
    view[m] = value
    return m


def _superellipse(X, Y, cx, a, b_ant, b_post, n_ant=2.2, n_post=2.8):
    """Sum whose level set 1 is the body-like outline of each axial slice (per-slice axes
    ``a`` (nz,1,1) etc.); y < 0 (anterior) uses ``b_ant``/``n_ant``, y >= 0 the posterior."""
    xs = np.abs(X - cx) / a
    ant = Y < 0
    tx_ant, tx_post = xs ** n_ant, xs ** n_post
    ty = np.where(ant, (np.abs(Y) / b_ant) ** n_ant, (np.abs(Y) / b_post) ** n_post)
    return np.where(ant, tx_ant, tx_post) + ty


# ---------------------------------------------------------------------------------------------
# body wall, cavity, ribs, diaphragm, lungs
# ---------------------------------------------------------------------------------------------
def _body(rng, grid, tissue, info) -> dict:
    Z, Y, X = grid.coords()
    z = grid.z[:, None, None]
    h = rng.uniform(0.0, 1.0)  # habitus: thin (0) .. obese (1)
    t_fat = 8.0 + 22.0 * h
    g = [geo.grf1d(rng, grid.z, 50.0)[:, None, None] for _ in range(5)]
    belly = rng.uniform(0.0, 0.07)
    a = (115.0 + t_fat) * (1 + 0.03 * g[0] + rng.uniform(-0.04, 0.04) * z / 80.0)
    b_ant = (92.0 + 1.1 * t_fat) * (1 + 0.035 * g[1] - belly * z / 80.0)
    b_post = (97.0 + 0.8 * t_fat) * (1 + 0.012 * g[2])
    cx = 2.0 * g[3]
    t_lat = t_fat * (1.0 + 0.15 * g[4])
    t_ant, t_post = 1.15 * t_fat, 0.8 * t_fat
    m_lat, m_ant, m_post = rng.uniform(11, 15), rng.uniform(9, 12), rng.uniform(13, 17)

    coarse = geo.grf(rng, grid.z, grid.y, grid.x, 40.0)
    body = _superellipse(X, Y, cx, a, b_ant, b_post) <= 1.0
    tissue[body] = FAT
    wall_in = (_superellipse(X, Y, cx, a - t_lat, b_ant - t_ant, b_post - t_post) <= 1.0 + 0.06 * coarse) & body
    tissue[wall_in] = MUSCLE
    cav_sum = _superellipse(X, Y, cx, a - t_lat - m_lat, b_ant - t_ant - m_ant, b_post - t_post - m_post)
    cavity = (cav_sum <= 1.0 + 0.04 * coarse) & wall_in

    # Cavity contents: visceral fat and a tubular network of bowel loops (|(g1, g2)| < w is a
    # tube around the intersection of two random surfaces), some fluid- or gas-filled.
    g1 = geo.grf(rng, grid.z, grid.y, grid.x, 9.0)
    g2 = geo.grf(rng, grid.z, grid.y, grid.x, 9.0)
    region = geo.grf(rng, grid.z, grid.y, grid.x, 35.0)
    filling = geo.grf(rng, grid.z, grid.y, grid.x, 30.0)
    r2 = g1 * g1 + g2 * g2
    w = np.clip(1.65 - 0.5 * h + 0.35 * region, 0.6, 2.2)
    bowel = r2 < w * w
    lumen = r2 < (0.5 * w) ** 2
    tissue[cavity] = FAT
    tissue[cavity & bowel] = BOWEL
    tissue[cavity & lumen & (filling > 0.4)] = FLUID
    tissue[cavity & lumen & (filling < -1.3)] = GAS

    # Ribs: oblique bands in the outer part of the wall, descending anteriorly, above the
    # costal margin (low posteriorly, high anteriorly), none at the back and front midline.
    ring = (_superellipse(X, Y, cx, a - t_lat - 1.5, b_ant - t_ant - 1.5, b_post - t_post - 1.5) <= 1.0) & ~(
        _superellipse(X, Y, cx, a - t_lat - 8.5, b_ant - t_ant - 8.5, b_post - t_post - 8.5) <= 1.0)
    phi = np.arctan2(np.abs(X), Y)  # 0 posterior midline .. pi anterior midline, (1, ny, nx)
    period, slope = rng.uniform(26.0, 31.0), rng.uniform(36.0, 46.0)
    phase = ((Z + slope * phi) / period + rng.uniform(0, 1)) % 1.0
    zone = (Z > -20.0 + 55.0 * (phi / np.pi) ** 2) & (phi > 0.55) & (phi < 2.65)
    tissue[ring & zone & (phase < 9.0 / period)] = BONE_MIXED

    # Diaphragm and lung bases: two domes (the right one higher) falling off laterally and,
    # most steeply, posteriorly into the costophrenic recesses.
    z_dome = rng.uniform(80.0, 92.0)
    q = (np.maximum(np.abs(X) - 35.0, 0.0) / 75.0) ** 2 + np.where(Y > 0, (Y / 70.0) ** 2, (Y / 130.0) ** 2)
    z_d = z_dome + np.where(X < 0, 5.0, 0.0) - 60.0 * q
    above = Z > z_d
    tissue[cavity & above] = MUSCLE
    tissue[cavity & (Z > z_d + 4.0)] = LUNG
    abd = cavity & ~above
    info["body"] = {"habitus": float(h), "subcutaneous_fat_mm": float(t_fat), "dome_z": float(z_dome)}
    return {"cavity": cavity, "abd": abd, "wall_in": wall_in, "z_d": z_d}


# ---------------------------------------------------------------------------------------------
# spine and back muscles
# ---------------------------------------------------------------------------------------------
def _spine(rng, grid, tissue, body) -> dict:
    yv = (40.0 + 3.0 * geo.grf1d(rng, grid.z, 80.0)).astype(np.float32)
    xv = (1.5 * geo.grf1d(rng, grid.z, 80.0)).astype(np.float32)
    box = grid.box((-75.0, float(yv.min()) - 40.0, grid.z[0] - 1), (75.0, float(yv.max()) + 80.0, grid.z[-1] + 1))
    Z, Y, X = grid.coords(box)
    zsl = box[0]
    dx = X - xv[zsl, None, None]
    dy = Y - yv[zsl, None, None]
    grow = 1.0 - 0.08 * Z / 80.0
    period = rng.uniform(32.0, 36.0)
    phase = ((Z / period) + rng.uniform(0, 1)) % 1.0
    disc_frac = rng.uniform(7.0, 9.0) / period
    wall_in = body["wall_in"][box]

    # paraspinal (erector spinae) muscles and psoas
    para = ((np.abs(dx) - 27.0) / 22.0) ** 2 + ((dy - 46.0) / 18.0) ** 2 <= 1.0
    _paint(tissue, box, para & wall_in, MUSCLE)
    rp = 21.0 * np.clip((25.0 - Z) / 70.0, 0.0, 1.0) ** 0.6 + 1e-3
    psoas = ((np.abs(dx) - (24.0 + 0.5 * rp)) / rp) ** 2 + ((dy - 4.0) / (0.9 * rp)) ** 2 <= 1.0
    _paint(tissue, box, psoas & (rp > 2.0), MUSCLE, _allowed(*CAVITY, MUSCLE, LUNG))

    # vertebral body: cortical shell and endplates around cancellous bone; discs
    vb = (dx / (21.0 * grow)) ** 2 + (dy / (16.0 * grow)) ** 2
    disc = phase < disc_frac
    endplate = (phase < disc_frac + 0.035) | (phase > 1.0 - 0.035)  # ~1 mm, so mixed with marrow
    _paint(tissue, box, (vb <= 1.0) & ~disc, MARROW)
    _paint(tissue, box, (vb <= 1.0) & endplate & ~disc, BONE_MIXED)
    _paint(tissue, box, (vb <= 1.0) & (vb > 0.72) & ~disc, CORTICAL)
    _paint(tissue, box, (vb <= 1.0) & disc, DISC)
    # neural arch, canal, spinous and transverse processes
    arch = ((dx / 18.0) ** 2 + ((dy - 27.0) / 16.0) ** 2 <= 1.0) & (dy > 14.0)
    canal = (dx / 11.0) ** 2 + ((dy - 27.0) / 8.5) ** 2 <= 1.0
    spinous = (np.abs(dx) < 4.0) & (dy > 38.0) & (dy < 68.0) & (phase > 0.25) & (phase < 0.9)
    transverse = ((np.abs(dx) > 15.0) & (np.abs(dx) < 42.0) & (np.abs(dy - 22.0) < 4.5)
                  & (phase > 0.45) & (phase < 0.75))
    _paint(tissue, box, arch | spinous, BONE_MIXED)
    _paint(tissue, box, transverse, BONE_MIXED, _allowed(MUSCLE, FAT))
    _paint(tissue, box, canal, CSF)
    return {"yv": yv, "xv": xv}


# ---------------------------------------------------------------------------------------------
# solid organs
# ---------------------------------------------------------------------------------------------
def _kidney(rng, grid, tissue, abd, side: int, zc: float, yv: float, info) -> np.ndarray | None:
    """side +1 left, -1 right. Returns the hilum point (model xyz)."""
    c = np.array([side * (72.0 + rng.uniform(-5, 5)), yv + 10.0 + rng.uniform(-4, 4), zc])
    radii = np.array([25.0, 21.0, 52.0]) * rng.uniform(0.88, 1.12)
    rot = geo.rotation(-10.0 + rng.uniform(-5, 5), -12.0 + rng.uniform(-5, 5), 30.0 + rng.uniform(-8, 8))
    box = geo.box_around(grid, c, 1.5 * radii.max())
    if box is None:
        return None
    mirror = side < 0
    u, v, w = geo.local(grid, box, c, rot, mirror_x=mirror)
    ru, rv, rw = radii
    r2 = geo.ellipsoid(u, v, w, radii)
    # perirenal fat, reaching further laterally and posteriorly (Gerota's space): liver and
    # spleen lie in front of and above the kidney, never around it
    fat = geo.ellipsoid(u, v, w, 1.45 * radii, (0.2 * ru, 0.25 * rv, 0.0)) < 1.0
    _paint(tissue, box, fat, RETRO_FAT, A_CAVITY, abd)
    noise = 0.05 * geo.grf_box(rng, grid, box, 15.0)
    notch = geo.ellipsoid(u, v, w, (0.5 * ru, 0.42 * rv, 0.38 * rw), (-0.95 * ru, 0, 0)) < 1.0
    kidney = (r2 < 1.0 + noise) & ~notch
    depth = geo.ellipsoid_depth(u, v, w, radii)
    sinus = geo.ellipsoid(u, v, w, (0.4 * ru, 0.32 * rv, 0.45 * rw), (-0.6 * ru, 0, 0)) < 1.0
    pelvis = geo.ellipsoid(u, v, w, (0.25 * ru, 0.18 * rv, 0.22 * rw), (-0.7 * ru, 0, 0)) < 1.0
    psi = np.arctan2(w / rw, (u + 0.5 * ru) / ru)
    psi2 = np.arctan2(v / rv, (u + 0.5 * ru) / ru)
    pyramids = (np.cos(7.0 * psi + rng.uniform(0, 2 * np.pi)) > -0.35) & (np.cos(3.0 * psi2) > -0.5)
    cortex_t = rng.uniform(5.0, 7.0)
    medulla = kidney & ~sinus & (depth > cortex_t) & (depth < cortex_t + 13.0) & pyramids
    allowed = _allowed(*CAVITY, RETRO_FAT)
    painted = _paint(tissue, box, kidney & ~sinus, CORTEX, allowed, abd)
    view = tissue[box]
    view[painted & medulla] = MEDULLA
    _paint(tissue, box, (sinus | notch) & (r2 < 1.0), RETRO_FAT, _allowed(*CAVITY, RETRO_FAT, CORTEX), abd)
    _paint(tissue, box, pelvis & (r2 < 1.0), FLUID, _allowed(RETRO_FAT, CORTEX), abd)
    hilum_local = np.array([-0.85 * ru, 0.0, 0.0])
    off = rot @ hilum_local
    if mirror:
        off[0] = -off[0]
    name = "kidney_left" if side > 0 else "kidney_right"
    info[name] = {"centre": c.tolist(), "radii": radii.tolist()}
    return c + off


def _spleen(rng, grid, tissue, abd, yv, info) -> np.ndarray | None:
    c = np.array([76.0 + rng.uniform(-5, 5), yv - 2.0 + rng.uniform(-5, 5), 22.0 + rng.uniform(-6, 6)])
    radii = np.array([26.0, 55.0, 50.0]) * rng.uniform(0.85, 1.15)
    rot = geo.rotation(rng.uniform(-10, 10), rng.uniform(-10, 10), 45.0 + rng.uniform(-10, 10))
    box = geo.box_around(grid, c, 1.2 * radii.max())
    if box is None:
        return None
    u, v, w = geo.local(grid, box, c, rot)
    ru, rv, rw = radii
    noise = 0.08 * geo.grf_box(rng, grid, box, 20.0)
    spleen = (geo.ellipsoid(u, v, w, radii) < 1.0 + noise) & ~(
        geo.ellipsoid(u, v, w, (1.2 * ru, 0.75 * rv, 0.8 * rw), (-1.85 * ru, 0, 0)) < 1.0)
    _paint(tissue, box, spleen, SPLEEN, _allowed(*CAVITY, RETRO_FAT), abd)
    info["spleen"] = {"centre": c.tolist(), "radii": radii.tolist()}
    return c + rot @ np.array([-0.6 * ru, 0.0, 0.0])


def _liver(rng, grid, tissue, abd, info) -> tuple[np.ndarray, tuple]:
    z_l = 20.0 + rng.uniform(-6, 6)
    size = rng.uniform(0.9, 1.1)
    lobes = [  # centre, radii, rotation (deg about x, y, z)
        ((-58.0, -2.0, z_l), (80.0, 88.0, 72.0), (0.0, 15.0, 0.0)),       # right lobe
        ((12.0, -44.0, z_l + 28.0), (52.0, 28.0, 32.0), (0.0, 0.0, -15.0)),  # left lobe
        ((-12.0, 8.0, z_l + 15.0), (18.0, 18.0, 30.0), (0.0, 0.0, 0.0)),     # caudate
    ]
    box = grid.box((-160.0, -130.0, z_l - 95.0), (110.0, 110.0, z_l + 110.0))
    rhos = []
    for centre, radii, angles in lobes:
        c = np.asarray(centre) + rng.uniform(-5, 5, 3)
        r = np.asarray(radii) * size * rng.uniform(0.9, 1.1, 3)
        rot = geo.rotation(*(np.asarray(angles) + rng.uniform(-6, 6, 3)))
        u, v, w = geo.local(grid, box, c, rot)
        rhos.append(np.sqrt(geo.ellipsoid(u, v, w, r)))
    f = geo.smooth_min(rhos, 0.12)
    f = f - 0.10 * geo.grf_box(rng, grid, box, 35.0) - 0.025 * geo.grf_box(rng, grid, box, 10.0)
    _paint(tissue, box, f < 1.0, LIVER, A_CAVITY, abd)
    info["liver"] = {"z": float(z_l), "size": float(size)}
    return box, (z_l,)


def _stomach(rng, grid, tissue, abd, info) -> None:
    c = np.array([48.0 + rng.uniform(-6, 6), -30.0 + rng.uniform(-6, 6), 48.0 + rng.uniform(-8, 8)])
    radii = np.array([40.0, 34.0, 40.0]) * rng.uniform(0.7, 1.1)
    rot = geo.rotation(0.0, rng.uniform(-15, 15), 20.0 + rng.uniform(-10, 10))
    box = geo.box_around(grid, c, 1.1 * radii.max())
    if box is None:
        return
    u, v, w = geo.local(grid, box, c, rot)
    noise = 0.05 * geo.grf_box(rng, grid, box, 20.0)
    r2 = geo.ellipsoid(u, v, w, radii) - noise
    depth = geo.ellipsoid_depth(u, v, w, radii)
    painted = _paint(tissue, box, r2 < 1.0, BOWEL, A_CAVITY, abd)
    Z, Y, X = grid.coords(box)
    level = c[1] - rng.uniform(0.0, 0.6) * radii[1]  # air-fluid level (supine: gas anterior)
    lumen = painted & (depth > 4.0)
    view = tissue[box]
    view[lumen & np.broadcast_to(Y >= level, lumen.shape)] = FLUID
    view[lumen & np.broadcast_to(Y < level, lumen.shape)] = GAS
    info["stomach"] = {"centre": c.tolist(), "radii": radii.tolist()}


def _gallbladder(rng, grid, tissue, abd, z_l, info) -> None:
    if rng.uniform() > 0.85:
        info["gallbladder"] = None
        return
    c = np.array([-32.0 + rng.uniform(-6, 6), -48.0 + rng.uniform(-5, 5), z_l - 32.0 + rng.uniform(-6, 6)])
    radii = np.array([13.0, 13.0, 30.0]) * rng.uniform(0.7, 1.2)
    rot = geo.rotation(-40.0 + rng.uniform(-10, 10), rng.uniform(-15, 15), 0.0)
    box = geo.box_around(grid, c, radii.max())
    if box is None:
        return
    u, v, w = geo.local(grid, box, c, rot)
    _paint(tissue, box, geo.ellipsoid(u, v, w, radii) < 1.0, BILE, _allowed(*CAVITY, LIVER), abd)
    info["gallbladder"] = {"centre": c.tolist(), "radii": radii.tolist()}


def _pancreas(rng, grid, tissue, abd, zp, info) -> None:
    j = lambda s: rng.uniform(-s, s, 3)  # noqa: E731
    ctrl = np.array([
        (-30.0, -24.0, zp - 12.0), (-16.0, -34.0, zp - 4.0), (-2.0, -38.0, zp), (28.0, -30.0, zp + 4.0),
        (56.0, -12.0, zp + 9.0), (70.0, 4.0, zp + 13.0)]) + np.stack([j(3) for _ in range(6)])
    radii = np.array([14.0, 10.0, 8.5, 10.0, 9.0, 7.0]) * rng.uniform(0.85, 1.15, 6)
    pts = geo.spline(ctrl, 3.0)
    rad = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, len(radii)), radii)
    geo.draw_tube(tissue, grid, pts, rad, PANCREAS, A_CAVITY, abd)
    info["pancreas"] = {"z": float(zp)}


# ---------------------------------------------------------------------------------------------
# vessels
# ---------------------------------------------------------------------------------------------
def _great_vessels(rng, grid, tissue, yv, info) -> dict:
    z = grid.z
    r_a = 10.5 * rng.uniform(0.85, 1.15) * (1.0 + 0.06 * z / 80.0)
    xa = 14.0 + 2.5 * geo.grf1d(rng, z, 60.0)
    ya = yv - 16.0 - r_a - 2.0 + 1.5 * geo.grf1d(rng, z, 60.0)
    ri = np.array([13.0, 9.5]) * rng.uniform(0.9, 1.1)
    xi = -24.0 + 2.5 * geo.grf1d(rng, z, 60.0)
    yi = 12.0 + 2.0 * geo.grf1d(rng, z, 60.0) - 8.0 * np.clip((z - 30.0) / 40.0, 0, 1)
    box = grid.box((-60.0, -40.0, z[0] - 1), (50.0, float(yv.max()), z[-1] + 1))
    Z, Y, X = grid.coords(box)
    s = box[0]
    ivc = ((X - xi[s, None, None]) / ri[0]) ** 2 + ((Y - yi[s, None, None]) / ri[1]) ** 2 <= 1.0
    _paint(tissue, box, ivc, IVC, _allowed(*CAVITY, RETRO_FAT, MUSCLE, LIVER, PANCREAS, LUNG, CORTEX, MEDULLA))
    aorta = (X - xa[s, None, None]) ** 2 + (Y - ya[s, None, None]) ** 2 <= (r_a[s, None, None]) ** 2
    _paint(tissue, box, aorta, ARTERY, _allowed(*CAVITY, RETRO_FAT, MUSCLE, LIVER, PANCREAS, LUNG))
    info["aorta"] = {"radius": float(np.median(r_a))}
    return {"xa": xa, "ya": ya, "ra": r_a, "xi": xi, "yi": yi, "ri": ri}


def _at(grid, arr, zc) -> float:
    """Value of a per-slice array at model height zc (clamped)."""
    return float(np.interp(zc, grid.z, arr))


def _sample(rng, pts, n):
    if len(pts) <= n:
        return pts
    return pts[rng.choice(len(pts), n, replace=False)]


def _pick(rng, pts, p, d, length, max_angle, min_angle=0.0, avoid=None):
    v = pts - p
    dist = np.linalg.norm(v, axis=1) + 1e-9
    cos = (v @ d) / dist
    ok = (dist > 0.6 * length) & (dist < 1.4 * length) & (cos >= np.cos(np.deg2rad(max_angle)))
    ok &= cos <= np.cos(np.deg2rad(min_angle))
    if avoid is not None:
        ok &= (v @ avoid) / dist < np.cos(np.deg2rad(35.0))
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    return pts[idx[rng.integers(idx.size)]]


def _tree(rng, pts, start, direction, r0, length, r_min, max_segments=60):
    """Random branching vessel tree through the candidate points ``pts`` (N, 3): each segment
    ends at a random point ahead of it and forks into two thinner children at diverging angles,
    sometimes with a side branch. Returns [(polyline (K, 3), radii (K,)), ...]."""
    out = []
    d0 = np.asarray(direction, dtype=np.float64)
    stack = [(np.asarray(start, dtype=np.float64), d0 / np.linalg.norm(d0), r0, length, 35.0)]
    while stack and len(out) < max_segments:
        p, d, r, L, cone = stack.pop()
        q = _pick(rng, pts, p, d, L, cone)
        if q is None:
            continue
        seg = q - p
        n = np.linalg.norm(seg)
        perp = np.cross(seg, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        mid = p + 0.5 * seg + perp * rng.uniform(-0.15, 0.15) * n
        line = geo.spline([p, mid, q], 3.5)
        out.append((line, np.linspace(r, 0.92 * r, len(line))))
        dn = seg / n
        rc = 0.76 * r
        if rc < r_min:
            continue
        first = _pick(rng, pts, q, dn, 0.8 * L, 60.0, 12.0)
        if first is not None:
            d1 = (first - q) / np.linalg.norm(first - q)
            second = _pick(rng, pts, q, dn, 0.8 * L, 70.0, 12.0, avoid=d1)
            stack.append((q, d1, rc, 0.8 * L, 25.0))
            if second is not None:
                stack.append((q, (second - q) / np.linalg.norm(second - q), rc, 0.8 * L, 25.0))
        if rng.uniform() < 0.4 and 0.55 * r >= r_min:
            side = _pick(rng, pts, mid, perp if rng.uniform() < 0.5 else -perp, 0.6 * L, 50.0)
            if side is not None:
                ds = (side - mid) / np.linalg.norm(side - mid)
                stack.append((mid, ds, 0.55 * r, 0.6 * L, 20.0))
    return out


def _draw_segments(tissue, grid, segments, value, allowed, region=None) -> None:
    for line, radii in segments:
        geo.draw_tube(tissue, grid, line, radii, value, allowed, region)


def _vessels(rng, grid, tissue, abd, gv, liver_box, z_l, zp, hila, spleen_hilum, info) -> None:
    liver_mask = tissue[liver_box] == LIVER
    pts = _sample(rng, grid.points(liver_box, liver_mask), 6000) if liver_mask.any() else None
    xa, ya, ra, xi, yi = gv["xa"], gv["ya"], gv["ra"], gv["xi"], gv["yi"]
    a_art = _allowed(*CAVITY, PANCREAS)

    # portal venous system: SMV -> confluence -> main portal vein -> intrahepatic tree
    conf = np.array([-6.0, -22.0, zp - 2.0]) + rng.uniform(-3, 3, 3)
    smv = geo.spline([conf, conf + (-4.0, -4.0, -28.0), (-12.0, -30.0, grid.z[0] - 10.0)], 3.0)
    geo.draw_tube(tissue, grid, smv, 5.0, PORTAL, A_VESSEL, abd)
    if spleen_hilum is not None:
        sv = geo.spline([spleen_hilum, (58.0, 0.0, zp + 12.0), (30.0, -17.0, zp + 6.0), conf], 3.0)
        geo.draw_tube(tissue, grid, sv, 4.5, PORTAL, A_VESSEL, abd)
    if pts is not None and len(pts) > 20:
        nominal = np.array([-32.0, -8.0, z_l - 2.0])
        hilum = pts[np.argmin(np.linalg.norm(pts - nominal, axis=1))]
        trunk = geo.spline([conf, (-18.0, -14.0, zp + 12.0), hilum], 3.0)
        geo.draw_tube(tissue, grid, trunk, 6.5, PORTAL, _allowed(*CAVITY, PANCREAS, LIVER), abd)
        in_liver = _allowed(LIVER)
        segs = []
        for direction, r0 in (((-1.0, 0.3, 0.25), 5.5), ((0.8, -0.6, 0.35), 5.0)):
            segs += _tree(rng, pts, hilum, direction, r0, 32.0, 1.4)
        _draw_segments(tissue, grid, segs, PORTAL, in_liver)
        # hepatic veins: three trunks from the IVC under the dome, running anterior-inferior
        top = pts[:, 2].max()
        z_hv = min(top - 12.0, z_l + 55.0)
        ivc_top = np.array([_at(grid, xi, z_hv), _at(grid, yi, z_hv), z_hv])
        segs = []
        for direction in ((-1.0, -0.25, -0.45), (-0.2, -1.0, -0.5), (0.75, -0.8, -0.3)):
            segs += _tree(rng, pts, ivc_top, direction, 5.0, 34.0, 1.4, max_segments=40)
        _draw_segments(tissue, grid, segs, HEPATIC, in_liver)
        hepatic_hilum = hilum + np.array([5.0, -6.0, -4.0])
    else:
        hepatic_hilum = None
        info["portal_tree"] = None

    # arteries: celiac trunk (common hepatic + splenic), SMA, renal arteries
    def aorta_point(zc, dy=0.0):
        return np.array([_at(grid, xa, zc), _at(grid, ya, zc) - _at(grid, ra, zc) + 2.0 + dy, zc])

    zc = zp + 16.0
    cel0 = aorta_point(zc)
    cel1 = cel0 + (-2.0, -14.0, 2.0)
    if hepatic_hilum is not None:
        ha = geo.spline([cel1, (-10.0, cel1[1] - 3.0, zc) + rng.uniform(-3, 3, 3),
                         (-25.0, -22.0, zc + 4.0) + rng.uniform(-3, 3, 3), hepatic_hilum], 2.5)
        geo.draw_tube(tissue, grid, np.vstack([cel0[None], ha]), 2.8, ARTERY, _allowed(*CAVITY, PANCREAS, LIVER), abd)
    if spleen_hilum is not None:
        sa = geo.spline([cel1, (30.0, -14.0, zc + 2.0) + rng.uniform(-4, 4, 3),
                         (55.0, 0.0, zc) + rng.uniform(-4, 4, 3), spleen_hilum], 2.5)
        geo.draw_tube(tissue, grid, sa, 2.8, ARTERY, a_art, abd)
    zs = zp + 6.0
    s0 = aorta_point(zs)
    sma = geo.spline([s0, s0 + (-2.0, -12.0, -8.0), s0 + (-5.0, -16.0, -35.0),
                      (s0[0] - 7.0, s0[1] - 18.0, grid.z[0] - 10.0)], 3.0)
    geo.draw_tube(tissue, grid, sma, 3.5, ARTERY, a_art, abd)
    for side, hilum in hila.items():
        if hilum is None:
            continue
        zk = hilum[2]
        a0 = np.array([_at(grid, xa, zk + 5.0) + side * 0.8 * _at(grid, ra, zk + 5.0), _at(grid, ya, zk + 5.0), zk + 5.0])
        vi = np.array([_at(grid, xi, zk), _at(grid, yi, zk), zk])
        if side < 0:  # right renal artery passes behind the IVC
            art = [a0, (vi[0], vi[1] + 13.0, zk + 3.0), hilum + (0, 3.0, 2.0)]
            vein = [hilum, vi]
        else:  # left renal vein crosses in front of the aorta, under the SMA
            art = [a0, hilum + (0, 3.0, 2.0)]
            vein = [hilum, (_at(grid, xa, zk), _at(grid, ya, zk) - _at(grid, ra, zk) - 4.0, zk), vi]
        a_renal = _allowed(*CAVITY, RETRO_FAT)
        geo.draw_tube(tissue, grid, geo.spline(vein, 3.0), 4.5, IVC, a_renal, abd)
        geo.draw_tube(tissue, grid, geo.spline(art, 3.0), 3.0, ARTERY, a_renal, abd)


# ---------------------------------------------------------------------------------------------
# tumors
# ---------------------------------------------------------------------------------------------
def _tumors(rng, grid, tissue, liver_pre, liver_box, count, types=TUMOR_TYPES) -> list[dict]:
    n = int(rng.integers(count[0], count[1] + 1))
    if n == 0:
        return []
    region_tissues = _allowed(LIVER, PORTAL, HEPATIC)
    region = liver_pre[liver_box] & region_tissues[tissue[liver_box]]
    if not region.any():
        return []
    step = grid.step[::-1]  # (z, y, x)
    dist = ndimage.distance_transform_edt(np.pad(region, 1), sampling=step)[1:-1, 1:-1, 1:-1]
    margin = 2.0 * float(grid.step.max())
    placed: list[dict] = []
    for _ in range(n):
        kind = types[int(rng.integers(len(types)))]
        r = rng.uniform(6.0, 22.0)
        centre = None
        for _attempt in range(4):
            radii = r * rng.uniform(0.8, 1.2, 3)
            extent = 1.25 * radii.max()
            cand = dist >= extent + margin
            if cand.any():
                cpts = grid.points(liver_box, cand)
                for t in placed:
                    far = np.linalg.norm(cpts - t["centre"], axis=1) > t["extent"] + extent + margin
                    cpts = cpts[far]
                if len(cpts):
                    centre = cpts[rng.integers(len(cpts))]
                    break
            r *= 0.75
            if r < 4.0:
                break
        if centre is None:
            continue
        rot = geo.rotation(*rng.uniform(-90, 90, 3))
        box = geo.box_around(grid, centre, extent + grid.step.max())
        u, v, w = geo.local(grid, box, centre, rot)
        rho = np.sqrt(geo.ellipsoid(u, v, w, radii))
        edge = 1.0 + np.clip(0.12 * geo.grf_box(rng, grid, box, max(3.0, 0.5 * r)), -0.25, 0.25)
        inside = rho < edge
        depth = (edge - rho) * float(radii.mean())
        rim_t = rng.uniform(2.0, 4.0)
        core = rho < rng.uniform(0.4, 0.65) * edge
        body = T_HYPER if kind == "hypervascular" else T_HYPO
        parts = np.full(inside.shape, body, dtype=np.uint8)
        if kind in ("rim_enhancing", "necrotic"):
            parts[depth < rim_t] = T_RIM
        if kind == "necrotic":
            parts[core] = T_NECROTIC
        view = tissue[box]
        m = inside & liver_pre[box] & region_tissues[view]
        view[m] = parts[m]
        placed.append({"type": kind, "centre": centre, "radii": radii, "extent": extent,
                       "rim_mm": float(rim_t) if kind in ("rim_enhancing", "necrotic") else 0.0,
                       "box": box, "mask": m})
    return placed


# ---------------------------------------------------------------------------------------------
def build_anatomy(rng: np.random.Generator, grid: geo.Grid, tumor_count=(0, 3),
                  tumor_types=TUMOR_TYPES) -> Anatomy:
    """Paint one random abdomen on ``grid`` with ``tumor_count`` (inclusive range) liver tumors
    of types drawn uniformly from ``tumor_types``."""
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    info: dict = {}
    body = _body(rng, grid, tissue, info)
    abd = body["abd"]
    spine = _spine(rng, grid, tissue, body)
    yv_mid = float(np.median(spine["yv"]))
    zk_left = -10.0 + rng.uniform(-8, 8)
    hila = {+1: _kidney(rng, grid, tissue, abd, +1, zk_left, yv_mid, info),
            -1: _kidney(rng, grid, tissue, abd, -1, zk_left - rng.uniform(8, 20), yv_mid, info)}
    spleen_hilum = _spleen(rng, grid, tissue, abd, yv_mid, info)
    _stomach(rng, grid, tissue, abd, info)
    liver_box, (z_l,) = _liver(rng, grid, tissue, abd, info)
    zp = zk_left + 18.0 + rng.uniform(-4, 4)
    _pancreas(rng, grid, tissue, abd, zp, info)
    _gallbladder(rng, grid, tissue, abd, z_l, info)
    liver_pre = tissue == LIVER
    gv = _great_vessels(rng, grid, tissue, spine["yv"], info)
    _vessels(rng, grid, tissue, abd, gv, liver_box, z_l, zp, hila, spleen_hilum, info)
    tumors = _tumors(rng, grid, tissue, liver_pre, liver_box, tumor_count, tuple(tumor_types))
    liver = liver_pre & _allowed(LIVER, PORTAL, HEPATIC, *TUMOR_TISSUES)[tissue]
    tumor = _allowed(*TUMOR_TISSUES)[tissue]
    info["tumors"] = tumors
    return Anatomy(tissue=tissue, liver=liver, tumor=tumor, info=info)
