"""Volume I/O: NIfTI, NRRD, MetaImage and DICOM series through SimpleITK.

A :class:`Volume` is a 3-D float32 array in (z, y, x) order plus its geometry in SimpleITK/ITK
conventions: ``spacing`` and ``origin`` in (x, y, z) millimetres (LPS), ``direction`` as the nine
values of the row-major 3x3 direction matrix (columns are the x, y, z axes).

``read_volume`` / ``write_volume`` round-trip geometry exactly for NRRD and MetaImage, to float32
precision for NIfTI (the format stores float32) and to 1e-3 mm / integer HU for DICOM.
Every problem with a user's file is a ``ValueError`` whose message names the file.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Volume",
    "read_volume",
    "write_volume",
    "read_mask",
    "resample_like",
    "FILE_EXTENSIONS",
    "DICOM_EXTENSIONS",
]

#: Single-file (or header+data) image formats, by extension (lower case, longest first matters).
FILE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Extensions read as a single DICOM file (a 1-slice volume, or a multi-frame one).
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _as_float_tuple(values, n: int, what: str, source: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {what} must be {n} numbers, got {values!r}") from exc
    if len(out) != n:
        raise ValueError(f"{source}: {what} must be {n} numbers, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{source}: {what} must be finite, got {out}")
    return out


@dataclass(eq=False)
class Volume:
    """A 3-D scalar image with geometry.

    ``array``: (z, y, x) float32, C-contiguous (converted on construction).
    ``spacing``: (x, y, z) mm, positive. ``origin``: (x, y, z) mm, LPS (the centre of voxel 0).
    ``direction``: 9 floats, row-major 3x3 (SimpleITK ``GetDirection()`` order).
    ``source``: where the data came from; used in error messages only.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = _IDENTITY
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"{src}: a volume must be 3-D (z, y, x), got a {arr.ndim}-D array "
                             f"of shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{src}: the image is empty (shape {arr.shape}, 0 voxels)")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"{src}: voxel type {arr.dtype} is not numeric")
        if np.iscomplexobj(arr):
            raise ValueError(f"{src}: complex voxel values are not supported")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{src}: the image has non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
        self.array = arr
        self.spacing = _as_float_tuple(self.spacing, 3, "spacing", src)
        if min(self.spacing) <= 0:
            raise ValueError(f"{src}: spacing must be positive, got {self.spacing}")
        self.origin = _as_float_tuple(self.origin, 3, "origin", src)
        self.direction = _as_float_tuple(self.direction, 9, "direction", src)
        if abs(np.linalg.det(np.asarray(self.direction).reshape(3, 3))) < 1e-6:
            raise ValueError(f"{src}: direction matrix is singular: {self.direction}")

    # -- basic properties -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 direction matrix; column i is the physical direction of image axis i (x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, index_xyz) -> np.ndarray:
        """Continuous voxel index (x, y, z) -> physical point (x, y, z) in mm (LPS)."""
        idx = np.asarray(index_xyz, dtype=np.float64)
        return np.asarray(self.origin) + self.direction_matrix @ (np.asarray(self.spacing) * idx)

    # -- SimpleITK ----------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """A float32 SimpleITK image with this geometry (copies the data)."""
        image = sitk.GetImageFromArray(self.array, isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, *, source: str = "<memory>") -> Volume:
        """Volume from a 3-D scalar SimpleITK image; 4-D images with a trailing size-1 axis are
        squeezed. 2-D, 4-D, multi-component, empty or non-finite images raise ValueError."""
        ncomp = image.GetNumberOfComponentsPerPixel()
        if ncomp != 1:
            raise ValueError(f"{source}: multi-component images ({ncomp} components per voxel, "
                             f"e.g. RGB or vector) are not supported; expected a scalar 3-D image")
        dim = image.GetDimension()
        size = image.GetSize()
        if dim == 4 and size[3] == 1:
            image = sitk.Extract(image, size=(*size[:3], 0), index=(0, 0, 0, 0))
            dim, size = 3, image.GetSize()
        if dim == 2:
            raise ValueError(f"{source}: the image is 2-D (size {size}); expected a 3-D volume")
        if dim != 3:
            raise ValueError(f"{source}: the image is {dim}-D (size {size}); expected a 3-D volume "
                             f"(time series / multi-volume images are not supported)")
        if 0 in size:
            raise ValueError(f"{source}: the image is empty (size {size}, 0 voxels)")
        array = sitk.GetArrayViewFromImage(image)
        return cls(np.array(array, dtype=np.float32, order="C"), image.GetSpacing(),
                   image.GetOrigin(), image.GetDirection(), source=source)

    # -- helpers ------------------------------------------------------------------------------
    def with_array(self, array) -> Volume:
        """Same geometry (and source), new data of the same (z, y, x) shape."""
        arr = np.asarray(array)
        if arr.shape != self.array.shape:
            raise ValueError(f"{self.source}: new array shape {arr.shape} does not match the "
                             f"volume shape {self.array.shape}")
        return Volume(arr, self.spacing, self.origin, self.direction, source=self.source)

    def same_geometry(self, other: Volume, *, atol: float = 1e-4) -> bool:
        """True when shape is equal and spacing/origin/direction agree within ``atol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    def copy(self) -> Volume:
        return Volume(self.array.copy(), self.spacing, self.origin, self.direction, source=self.source)

    def __repr__(self) -> str:
        return (f"Volume(shape={self.shape}, spacing={self.spacing}, origin={self.origin}, "
                f"direction={self.direction}, source={self.source!r})")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in FILE_EXTENSIONS + DICOM_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _sitk_error(exc: Exception) -> str:
    """The informative part of an ITK exception message, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _single_dicom_slice_spacing(image: sitk.Image, reader_meta) -> sitk.Image:
    """ITK gives a 1-slice DICOM a z spacing of 1 unless told; use Spacing Between Slices or
    Slice Thickness when the file has them."""
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        return image
    for tag in ("0018|0088", "0018|0050"):
        if reader_meta.HasMetaDataKey(tag):
            try:
                value = float(reader_meta.GetMetaData(tag).strip().split("\\")[0])
            except ValueError:
                continue
            if value > 0 and math.isfinite(value):
                sp = image.GetSpacing()
                image.SetSpacing((sp[0], sp[1], value))
                break
    return image


def _read_dicom_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    image = reader.Execute()
    return _single_dicom_slice_spacing(image, reader)


def _read_dicom_folder(path: Path) -> sitk.Image:
    quiet = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK prints "No Series were found"
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot scan folder for DICOM series: {_sitk_error(exc)}") from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(quiet)
    series = []
    for sid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), sid)
        if files:
            series.append((sid, list(files)))
    if not series:
        raise ValueError(f"{path}: folder has no DICOM series (expected a folder of DICOM slices "
                         f"or an image file: {', '.join(FILE_EXTENSIONS)})")
    series.sort(key=lambda s: (-len(s[1]), s[0]))
    sid, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"{s} ({len(f)} files)" for s, f in series[1:])
        warnings.warn(f"{path}: {len(series)} DICOM series found; reading {sid} ({len(files)} files), "
                      f"ignoring {others}", stacklevel=3)
    if len(files) == 1:
        return _read_dicom_file(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


# NIfTI float datatypes (nifti1.h): code -> numpy dtype character.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN voxels into 0, so read the raw float voxels of
    NIfTI-1/NIfTI-2 files (gzipped or not) and refuse non-finite ones. Integer data is finite."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        for endian in "<>":
            (size,) = struct.unpack(endian + "i", head[:4])
            if size in (348, 540):
                break
        else:
            return  # not a NIfTI header we know; ITK already accepted the file
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            (datatype,) = struct.unpack(endian + "h", head[70:72])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        else:
            (datatype,) = struct.unpack(endian + "h", head[12:14])
            dims = struct.unpack(endian + "8q", head[16:80])
            (offset,) = struct.unpack(endian + "q", head[168:176])
        if datatype not in _NIFTI_FLOAT_TYPES:
            return
        dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
        count = int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]]))
        f.seek(max(offset, size))
        n_nan = n_inf = 0
        chunk = 1 << 22
        while count > 0:
            block = np.frombuffer(f.read(min(count, chunk) * dtype.itemsize), dtype=dtype)
            if block.size == 0:
                break
            n_nan += int(np.isnan(block).sum())
            n_inf += int(np.isinf(block).sum())
            count -= block.size
    if n_nan or n_inf:
        raise ValueError(f"{path}: the image has non-finite voxels ({n_nan} NaN, {n_inf} Inf)")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D scalar image as a float32 :class:`Volume`.

    ``path``: a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd file, a single DICOM file (.dcm, or any file
    with the DICOM preamble), or a folder holding a DICOM series (the largest series when there
    are several, with a warning). DICOM rescale slope/intercept is applied (HU for CT).
    Raises ValueError naming the file for anything unreadable or not a finite 3-D scalar image.
    The file is only read, never modified.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ValueError(f"{source}: file not found")
    try:
        if path.is_dir():
            image = _read_dicom_folder(path)
        else:
            ext = _extension(path)
            if path.stat().st_size == 0:
                raise ValueError(f"{source}: the file is empty (0 bytes)")
            if ext in DICOM_EXTENSIONS or (ext not in FILE_EXTENSIONS and _looks_like_dicom(path)):
                image = _read_dicom_file(path)
            elif ext in FILE_EXTENSIONS:
                image = sitk.ReadImage(str(path))
                if ext in (".nii", ".nii.gz"):
                    _check_nifti_finite(path)
            else:
                raise ValueError(f"{source}: unsupported file type {ext or '(no extension)'!r}; "
                                 f"expected one of {', '.join(FILE_EXTENSIONS + DICOM_EXTENSIONS)} "
                                 f"or a DICOM series folder")
    except RuntimeError as exc:
        what = "DICOM data" if path.is_dir() else f"{_extension(path) or 'image'} file"
        raise ValueError(f"{source}: cannot read image (corrupt or not a valid {what}): "
                         f"{_sitk_error(exc)}") from exc
    return Volume.from_sitk(image, source=source)


def read_mask(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read a label map; values are integer labels stored as float32.

    When ``like`` is given and the geometry differs, the mask is resampled (nearest neighbour)
    onto ``like``'s grid; voxels outside the mask's extent get label 0. Raises ValueError when
    the two physical extents do not overlap at all.
    """
    mask = read_volume(path)
    mask = mask.with_array(np.rint(mask.array))
    if like is None or mask.same_geometry(like, atol=1e-4):
        return mask
    return resample_mask_like(mask, like)


def _physical_corners(vol: Volume) -> np.ndarray:
    z, y, x = vol.shape
    corners = [(i, j, k) for i in (-0.5, x - 0.5) for j in (-0.5, y - 0.5) for k in (-0.5, z - 0.5)]
    return np.stack([vol.index_to_physical(c) for c in corners])


def _extents_overlap(a: Volume, b: Volume) -> bool:
    """Do the physical extents (voxel edges) of ``a`` and ``b`` overlap?

    ``b``'s corners are mapped into ``a``'s continuous index space and their bounding box is
    intersected with ``a``'s; for oblique pairs this is a (slightly generous) approximation."""
    inv = np.linalg.inv(a.direction_matrix) / np.asarray(a.spacing)[:, None]
    idx = (_physical_corners(b) - np.asarray(a.origin)) @ inv.T
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    size = np.asarray(a.shape[::-1], dtype=np.float64)
    return bool(np.all(hi >= -0.5) and np.all(lo <= size - 0.5))


def resample_like(volume: Volume, like: Volume, *, interpolation: str = "linear",
                  default: float = 0.0) -> Volume:
    """Resample ``volume`` onto ``like``'s grid (identity transform, physical space).

    ``interpolation``: "linear", "nearest" or "bspline"; voxels outside ``volume`` get
    ``default``. Raises ValueError when the two physical extents do not overlap at all."""
    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                     "bspline": sitk.sitkBSpline}
    if interpolation not in interpolators:
        raise ValueError(f"interpolation must be one of {', '.join(interpolators)}, got {interpolation!r}")
    if not _extents_overlap(volume, like):
        raise ValueError(f"{volume.source}: does not overlap the reference volume {like.source} "
                         f"(origin {volume.origin} vs {like.origin}, size {volume.shape} vs "
                         f"{like.shape}); they are not in the same physical space")
    ref = sitk.Image(like.shape[2], like.shape[1], like.shape[0], sitk.sitkUInt8)
    ref.SetSpacing(like.spacing)
    ref.SetOrigin(like.origin)
    ref.SetDirection(like.direction)
    out = sitk.Resample(volume.to_sitk(), ref, sitk.Transform(), interpolators[interpolation],
                        float(default), sitk.sitkFloat32)
    return Volume(sitk.GetArrayFromImage(out), like.spacing, like.origin, like.direction,
                  source=volume.source)


def resample_mask_like(mask: Volume, like: Volume) -> Volume:
    """Nearest-neighbour resampling of a label volume onto ``like``'s grid (0 outside)."""
    return resample_like(mask, like, interpolation="nearest", default=0.0)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    if abs(value) < 1e-9:
        value = 0.0
    for digits in (10, 9, 8, 7, 6):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.5g}"


def _dicom_rescale(array: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that ``round((array - intercept) / slope)`` fits in int16.

    Integer-valued data in the int16 range (CT in HU) is stored as is (slope 1, intercept 0)."""
    lo, hi = float(array.min()), float(array.max())
    if lo >= -32768 and hi <= 32767 and np.array_equal(array, np.rint(array)):
        return 1.0, 0.0
    intercept = float(_ds((lo + hi) / 2.0))
    span = max(hi - intercept, intercept - lo, 1e-12)
    slope = float(_ds(span / 32000.0))
    if slope <= 0:
        slope = 1.0
    return slope, intercept


def _write_dicom_series(volume: Volume, folder: Path, modality: str) -> None:
    vol = volume
    mat = vol.direction_matrix
    # DICOM stores only the row/column directions; the slice normal is their cross product.
    # A left-handed volume is written with its slices reversed so that it reads back the same
    # physical image (with a right-handed direction).
    if np.linalg.det(mat) < 0:
        new_dir = mat.copy()
        new_dir[:, 2] *= -1
        new_origin = vol.index_to_physical((0, 0, vol.shape[0] - 1))
        vol = Volume(vol.array[::-1], vol.spacing, new_origin, new_dir.ravel(), source=vol.source)
        mat = new_dir
    slope, intercept = _dicom_rescale(vol.array)
    stored = np.clip(np.rint((vol.array.astype(np.float64) - intercept) / slope), -32768, 32767)
    # GDCM converts float pixels to the stored int16 itself (rounding) using the rescale tags;
    # handing it values already on the int16 grid makes that conversion exact.
    quantised = stored * slope + intercept

    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    study_uid = f"2.25.{uuid.uuid4().int}"
    series_uid = f"2.25.{uuid.uuid4().int}"
    frame_uid = f"2.25.{uuid.uuid4().int}"
    iop = "\\".join(_ds(v) for v in (mat[0, 0], mat[1, 0], mat[2, 0], mat[0, 1], mat[1, 1], mat[2, 1]))
    common = [
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0008|0020", now_date), ("0008|0030", now_time),
        ("0008|0021", now_date), ("0008|0031", now_time),
        ("0008|0060", modality),
        ("0008|103e", "MedTranslate"),
        ("0010|0010", "Anonymous"), ("0010|0020", "MedTranslate"),
        ("0020|000d", study_uid), ("0020|000e", series_uid), ("0020|0052", frame_uid),
        ("0020|0011", "1"),
        ("0020|0037", iop),
        ("0018|0050", _ds(vol.spacing[2])),
        ("0018|0088", _ds(vol.spacing[2])),
        ("0028|1052", _ds(intercept)),
        ("0028|1053", _ds(slope)),
        ("0028|1054", "HU" if modality == "CT" else "US"),
        ("0028|0100", "16"), ("0028|0101", "16"), ("0028|0102", "15"), ("0028|0103", "1"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = vol.shape[0]
    width = max(4, len(str(n)))
    for k in range(n):
        sl = sitk.GetImageFromArray(quantised[k:k + 1])
        sl.SetSpacing(vol.spacing)
        pos = vol.index_to_physical((0, 0, k))
        sl.SetOrigin(tuple(float(v) for v in pos))
        sl.SetDirection(tuple(float(v) for v in mat.ravel()))
        for tag, value in common:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(_ds(v) for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|1041", _ds(float(np.dot(pos, np.cross(mat[:, 0], mat[:, 1])))))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        sl.SetMetaData("0008|0012", now_date)
        sl.SetMetaData("0008|0013", now_time)
        writer.SetFileName(str(folder / f"slice_{k:0{width}d}.dcm"))
        writer.Execute(sl)


def _is_dicom_target(path: Path) -> bool:
    ext = _extension(path)
    if ext in FILE_EXTENSIONS:
        return False
    if path.is_dir() or ext == "":
        return True
    raise ValueError(f"{path}: unsupported output extension {ext!r}; use one of "
                     f"{', '.join(FILE_EXTENSIONS)} or a folder path (no extension) for a DICOM series")


def replace_dir(new: Path, path: Path, *, backup: Path | None = None) -> None:
    """Rename folder ``new`` to ``path``. An existing ``path`` is first moved to ``backup`` (default:
    a hidden sibling), restored if the rename fails, and deleted after it succeeds."""
    if not path.exists():
        os.replace(new, path)
        return
    if backup is None:
        backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        backup.rmdir()
    os.replace(path, backup)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_volume(volume: Volume, path: str | os.PathLike, *, modality: str = "CT",
                 compress: bool = True) -> Path:
    """Write ``volume`` and return the written path.

    A path ending in .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd is written as that format (float32); an
    existing folder or a path without extension becomes a DICOM series folder (int16 with rescale
    slope/intercept, one file per slice, ``modality`` in the Modality tag). Parent folders are
    created. The write is atomic: everything is written in a temporary folder next to the target
    and moved into place at the end, so a failure never leaves a partial output. An existing DICOM
    output folder is replaced only if it holds nothing but .dcm files.

    DICOM limits: values are stored as int16 (integer-valued data in range exactly, anything else
    through a rescale slope, error <= slope / 2); a left-handed direction (det < 0) cannot be
    expressed in DICOM, so such a volume is written with its slices reversed and reads back as
    the same physical image with a right-handed direction.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"write_volume expects a Volume, got {type(volume).__name__}")
    path = Path(path)
    dicom = _is_dicom_target(path)
    if dicom and path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: exists and is not a folder; cannot write a DICOM series there")
        foreign = [p.name for p in path.iterdir() if p.suffix.lower() != ".dcm" or p.is_dir()]
        if foreign:
            raise ValueError(f"{path}: folder exists and holds non-DICOM entries "
                             f"({', '.join(sorted(foreign)[:5])}); refusing to overwrite it")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        if dicom:
            staged = tmp / "series"
            staged.mkdir()
            try:
                _write_dicom_series(volume, staged, modality)
            except RuntimeError as exc:
                raise ValueError(f"{path}: cannot write DICOM series: {_sitk_error(exc)}") from exc
            replace_dir(staged, path, backup=tmp / "previous")
        else:
            staged = tmp / path.name
            try:
                sitk.WriteImage(volume.to_sitk(), str(staged), useCompression=compress)
            except RuntimeError as exc:
                raise ValueError(f"{path}: cannot write image: {_sitk_error(exc)}") from exc
            # Header+data formats (.mhd/.nhdr) produce several files: move data files first,
            # the header (the file the user named) last.
            others = [p for p in tmp.iterdir() if p.name != path.name]
            for p in others:
                os.replace(p, parent / p.name)
            os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
