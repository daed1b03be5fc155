"""Vectorised geometry for the phantom: coordinate grid, smooth random fields, shapes, tubes.

Points are (x, y, z) in *model millimetres*: LPS directions (x to the patient's left, y
posterior, z superior), origin at the centre of the volume, scaled so that the reference
anatomy fits the field of view (see :class:`Grid`). Arrays are (z, y, x).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Box = tuple[slice, slice, slice]


class Grid:
    """Voxel centres of a (z, y, x) volume in model millimetres.

    ``scale_xy`` / ``scale_z``: physical mm per model mm (<= 1 shrinks the anatomy into a small
    field of view). ``x``, ``y``, ``z``: 1-D float32 coordinates of the voxel centres.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 scale_xy: float, scale_z: float) -> None:
        nz, ny, nx = shape
        sx, sy, sz = spacing
        self.shape = (int(nz), int(ny), int(nx))
        self.spacing = (float(sx), float(sy), float(sz))
        self.scale_xy = float(scale_xy)
        self.scale_z = float(scale_z)
        self.step = np.array([sx / scale_xy, sy / scale_xy, sz / scale_z])  # model mm, (x, y, z)
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * self.step[0]).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * self.step[1]).astype(np.float32)
        self.z = ((np.arange(nz) - (nz - 1) / 2.0) * self.step[2]).astype(np.float32)
        self.axes = (self.x, self.y, self.z)

    @property
    def full(self) -> Box:
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    def box(self, lo, hi) -> Box | None:
        """Voxels whose centres lie in the model-mm box [lo, hi] (x, y, z); None when empty."""
        out = []
        for k in range(3):  # x, y, z
            coords = self.axes[k]
            c0, st = float(coords[0]), float(self.step[k])
            i0 = max(0, int(np.ceil((float(lo[k]) - c0) / st - 1e-6)))
            i1 = min(len(coords), int(np.floor((float(hi[k]) - c0) / st + 1e-6)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[2], out[1], out[0])

    def coords(self, box: Box | None = None):
        """Broadcastable (Z, Y, X) coordinate arrays of a box (default: the whole grid)."""
        box = box or self.full
        return (self.z[box[0]][:, None, None], self.y[box[1]][None, :, None],
                self.x[box[2]][None, None, :])

    def to_index(self, point) -> np.ndarray:
        """Model point (x, y, z) -> continuous voxel index (z, y, x)."""
        p = np.asarray(point, dtype=np.float64)
        return np.array([(p[2] - self.z[0]) / self.step[2], (p[1] - self.y[0]) / self.step[1],
                         (p[0] - self.x[0]) / self.step[0]])

    def points(self, box: Box, mask: np.ndarray) -> np.ndarray:
        """Model (x, y, z) of the voxels of ``mask`` (shaped like ``box``): (N, 3) float64."""
        iz, iy, ix = np.nonzero(mask)
        return np.stack([self.x[box[2]][ix], self.y[box[1]][iy], self.z[box[0]][iz]], axis=1
                        ).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# smooth Gaussian random fields
# ---------------------------------------------------------------------------------------------
def _step(coords) -> float:
    coords = np.asarray(coords, dtype=np.float64)
    return float(abs(coords[1] - coords[0])) if len(coords) > 1 else np.inf


def _kernel(coords: np.ndarray, corr: float) -> np.ndarray:
    """Rows: Gaussian bumps of width ``corr`` centred on a lattice covering ``coords``,
    normalised so that the field has unit variance at every point."""
    coords = np.asarray(coords, dtype=np.float64)
    step = 0.75 * corr
    lo = coords.min() - 2.5 * corr
    n = int(np.ceil((coords.max() + 2.5 * corr - lo) / step)) + 1
    centres = lo + step * np.arange(n)
    k = np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / corr) ** 2)
    k /= np.sqrt((k * k).sum(axis=1, keepdims=True))
    return k.astype(np.float32)


def grf(rng: np.random.Generator, z, y, x, corr) -> np.ndarray:
    """Smooth zero-mean unit-variance random field on the tensor grid of 1-D coordinates
    ``z``, ``y``, ``x`` (any unit), Gaussian correlation of width ``corr`` (scalar or (cz, cy,
    cx)). A sum of Gaussian bumps with random weights, evaluated separably: cheap even on
    the full grid. Returns (len(z), len(y), len(x)) float32."""
    cz, cy, cx = (corr, corr, corr) if np.isscalar(corr) else corr
    sigmas = [c / _step(a) for c, a in zip((cz, cy, cx), (z, y, x), strict=True)]
    if max(sigmas) < 2.0:
        # fine texture: Gaussian-filtered white noise is cheaper than a dense lattice of bumps
        # (same covariance; ndimage is single-threaded, so still bit-reproducible)
        w = rng.standard_normal((len(z), len(y), len(x)), dtype=np.float32)
        t = ndimage.gaussian_filter(w, sigmas, mode="wrap")
        norm = 1.0
        for s in sigmas:
            delta = np.zeros(2 * int(4 * s + 1) + 1)
            delta[len(delta) // 2] = 1.0
            norm *= float(np.sqrt((ndimage.gaussian_filter1d(delta, s) ** 2).sum()))
        return t / np.float32(norm)
    kz, ky, kx = _kernel(z, cz), _kernel(y, cy), _kernel(x, cx)
    w = rng.standard_normal((kz.shape[1], ky.shape[1], kx.shape[1]), dtype=np.float32)
    # numpy's own einsum loops, not BLAS: multithreaded BLAS sums in a thread-count dependent
    # order, which would make the phantom depend on OPENBLAS_NUM_THREADS at the last bit.
    t = np.einsum("abc,xc->abx", w, kx, optimize=False)
    t = np.einsum("abx,yb->ayx", t, ky, optimize=False)
    t = np.einsum("ayx,za->zyx", t, kz, optimize=False)
    return np.ascontiguousarray(t, dtype=np.float32)


def grf_box(rng: np.random.Generator, grid: Grid, box: Box, corr) -> np.ndarray:
    """:func:`grf` in model mm on a box of the grid."""
    return grf(rng, grid.z[box[0]], grid.y[box[1]], grid.x[box[2]], corr)


def grf1d(rng: np.random.Generator, coords, corr: float) -> np.ndarray:
    k = _kernel(coords, corr)
    return np.einsum("nm,m->n", k, rng.standard_normal(k.shape[1]).astype(np.float32), optimize=False)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """3x3 rotation (x, y, z), angles in degrees, applied x first then y then z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def local(grid: Grid, box: Box, centre, rot: np.ndarray | None = None, mirror_x: bool = False):
    """Coordinates (u, v, w) of the box voxels in a local frame: origin ``centre``, axes the
    columns of ``rot`` (model xyz). ``mirror_x`` flips x first (left/right symmetric organs)."""
    Z, Y, X = grid.coords(box)
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    if mirror_x:
        dx = -dx
    if rot is None:
        return np.broadcast_arrays(dx, dy, dz)
    r = rot.astype(np.float32)
    u = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
    v = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
    w = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
    return u, v, w


def ellipsoid(u, v, w, radii, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipsoid in local coordinates."""
    return (((u - offset[0]) / radii[0]) ** 2 + ((v - offset[1]) / radii[1]) ** 2
            + ((w - offset[2]) / radii[2]) ** 2)


def ellipsoid_depth(u, v, w, radii) -> np.ndarray:
    """Approximate depth (mm) below the surface of the ellipsoid (negative outside):
    first-order distance ``(1 - rho^2) / |grad rho^2|``."""
    r2 = ellipsoid(u, v, w, radii)
    gu, gv, gw = u / radii[0] ** 2, v / radii[1] ** 2, w / radii[2] ** 2
    grad = 2.0 * np.sqrt(gu * gu + gv * gv + gw * gw) + 1e-6
    return (1.0 - r2) / grad


def smooth_min(values, k: float = 0.08) -> np.ndarray:
    """Soft minimum of arrays (smooth union of implicit shapes)."""
    stack = np.stack(values)
    m = stack.min(axis=0)
    return m - k * np.log(np.exp(-(stack - m) / k).sum(axis=0))


def box_around(grid: Grid, centre, half) -> Box | None:
    c = np.asarray(centre, dtype=np.float64)
    h = np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
    return grid.box(c - h, c + h)


# ---------------------------------------------------------------------------------------------
# curves and tubes
# ---------------------------------------------------------------------------------------------
def spline(points, step: float = 3.0) -> np.ndarray:
    """Catmull-Rom curve through control points (K, 3), resampled about every ``step`` mm."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 2:
        return p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = [p[:1]]
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = np.linspace(0.0, 1.0, n + 1)[1:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    return np.vstack(out)


def tube_mask(grid: Grid, a, b, ra: float, rb: float):
    """(box, mask) of the voxels within a cone-capped segment a->b, radius ra->rb."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    r = max(ra, rb)
    box = grid.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
    if box is None:
        return None, None
    Z, Y, X = grid.coords(box)
    ab = b - a
    l2 = float(ab @ ab) or 1e-9
    ax, ay, az = (np.float32(v) for v in a)
    bx, by, bz = (np.float32(v / l2) for v in ab)
    t = np.clip((X - ax) * bx + (Y - ay) * by + (Z - az) * bz, 0.0, 1.0)
    dx = X - ax - t * np.float32(ab[0])
    dy = Y - ay - t * np.float32(ab[1])
    dz = Z - az - t * np.float32(ab[2])
    rr = np.float32(ra) + t * np.float32(rb - ra)
    return box, (dx * dx + dy * dy + dz * dz) <= rr * rr


def draw_tube(tissue: np.ndarray, grid: Grid, points, radii, value: int,
              allowed: np.ndarray | None = None, region: np.ndarray | None = None) -> None:
    """Paint ``value`` along a polyline of (x, y, z) ``points`` with per-point ``radii``,
    only where ``allowed[tissue]`` (a per-tissue boolean table) and ``region`` hold."""
    pts = np.asarray(points, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    for i in range(len(pts) - 1):
        box, m = tube_mask(grid, pts[i], pts[i + 1], rad[i], rad[i + 1])
        if box is None or not m.any():
            continue
        view = tissue[box]
        m = np.broadcast_to(m, view.shape)
        if allowed is not None:
            m = m & allowed[view]
        if region is not None:
            m = m & region[box]
        view[m] = value
