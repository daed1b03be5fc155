"""Volume I/O: NIfTI, NRRD, MetaImage and DICOM series through SimpleITK.

A :class:`Volume` is a 3-D float32 array in (z, y, x) order plus its geometry in SimpleITK/ITK
conventions: ``spacing`` and ``origin`` in (x, y, z) millimetres (LPS), ``direction`` as the nine
values of the row-major 3x3 direction matrix (columns are the x, y, z axes).

``read_volume`` / ``write_volume`` round-trip geometry exactly for NRRD and MetaImage, to float32
precision for NIfTI (the format stores float32) and to 1e-3 mm / integer HU for DICOM.
Every problem with a user's file is a ``ValueError`` whose message names the file.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable
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
#: Pixel spacing a volume may have, in mm (0.1 µm .. 100 m): outside it a header is damaged.
SPACING_RANGE = (1e-4, 1e5)
#: How far a direction matrix may be from orthonormal (float32 headers store it to ~1e-7).
ORTHONORMAL_TOL = 1e-3


def _check_orthonormal(matrix: np.ndarray, source: str) -> None:
    """A direction matrix must be a rotation (or reflection): a sheared or scaled one cannot be
    kept by ITK, which would orthogonalise it, so it is refused instead of changed."""
    error = float(np.abs(matrix.T @ matrix - np.eye(3)).max())
    if not error <= ORTHONORMAL_TOL:
        raise ValueError(f"{source}: the direction matrix is not orthonormal (sheared or scaled axes, "
                         f"deviation {error:.3g}); resample the image onto an orthogonal grid first")


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
        # min and max propagate NaN and hold any Inf: two reductions, no bool volume
        if not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{src}: the image has non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
        self.array = arr
        self.spacing = _as_float_tuple(self.spacing, 3, "spacing", src)
        if min(self.spacing) <= 0:
            raise ValueError(f"{src}: spacing must be positive, got {self.spacing}")
        if min(self.spacing) < SPACING_RANGE[0] or max(self.spacing) > SPACING_RANGE[1]:
            raise ValueError(f"{src}: spacing {self.spacing} mm is outside {SPACING_RANGE[0]:g}..{SPACING_RANGE[1]:g} mm "
                             f"(a damaged header?)")
        self.origin = _as_float_tuple(self.origin, 3, "origin", src)
        self.direction = _as_float_tuple(self.direction, 9, "direction", src)
        if abs(np.linalg.det(np.asarray(self.direction).reshape(3, 3))) < 1e-6:
            raise ValueError(f"{src}: direction matrix is singular: {self.direction}")
        _check_orthonormal(np.asarray(self.direction).reshape(3, 3), src)

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
    try:  # (read_volume keeps ITK's "No Series were found" off stderr)
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot scan folder for DICOM series: {_sitk_error(exc)}") from exc
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
        _check_header_memory(Path(files[0]))
        return _read_dicom_file(Path(files[0]))
    _series_geometry(files, str(path))
    first = _image_information(Path(files[0]))
    _check_memory(str(path), int(np.prod(first.GetSize()[:2], dtype=np.int64)) * len(files), _bytes_per_voxel(first))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


@contextlib.contextmanager
def _native_output():
    """Capture what C/C++ code writes to file descriptor 2 while reading (ITK warnings, the NIfTI
    library, MetaIO): a user sees one line, never the libraries' noise. Yields the list that
    receives the captured lines when the block ends. Also puts back the C locale, which GDCM
    (DICOM) sets to "C": Python's default text encoding would become ASCII for the whole process."""
    lines: list[str] = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    with _NATIVE_OUTPUT_LOCK, _locale_kept():
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no file descriptor 2 (embedded, closed)
            saved = None
        try:
            with tempfile.TemporaryFile() as sink:
                if saved is not None:
                    os.dup2(sink.fileno(), 2)
                try:
                    yield lines
                finally:
                    if saved is not None:
                        os.dup2(saved, 2)
                        os.close(saved)
                    sink.seek(0)
                    lines.extend(ln.strip() for ln in sink.read(1 << 16).decode("utf-8", "replace").splitlines()
                                 if ln.strip())
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warn)


_NATIVE_OUTPUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _locale_kept():
    import locale

    try:
        saved = locale.setlocale(locale.LC_ALL)
    except locale.Error:
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(locale.Error):
                locale.setlocale(locale.LC_ALL, saved)


def _native_reason(lines: list[str]) -> str | None:
    """The informative part of what a library printed when it failed, on one line."""
    for i, line in enumerate(lines):
        if "not read completely" in line:  # MetaIO: "... data not read completely" / "ideal = N : actual = M"
            detail = lines[i + 1] if i + 1 < len(lines) else ""
            return f"the voxel data is truncated ({detail})" if detail else "the voxel data is truncated"
    return None


def _check_memory(source: str, voxels: int, bytes_per_voxel: float) -> None:
    """Refuse, from the header, an image that cannot fit in memory: the reader's buffer plus the
    float32 array (a 1 MiB gzip can declare 1024^3 voxels)."""
    from .runtime import available_memory

    need = voxels * (bytes_per_voxel + 4)
    available = available_memory()
    if available is not None and need > available:
        raise ValueError(f"{source}: the header declares {voxels:,} voxels, which need {need / 2**30:.1f} GiB to "
                         f"read; only {available / 2**30:.1f} GiB of memory is available")


# NIfTI float datatypes (nifti1.h): code -> numpy dtype character.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_header(head: bytes, source: str) -> dict | None:
    """The fields of a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header that decide what ITK
    reads; None when ``head`` is no NIfTI header (ITK then decides)."""
    for endian in "<>":
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
            break
    else:
        return None
    size = struct.unpack(endian + "i", head[:4])[0]
    if len(head) < size:
        raise ValueError(f"{source}: the NIfTI header is truncated ({len(head)} of {size} bytes)")
    if size == 348:
        dims = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
        pixdim = struct.unpack(endian + "8f", head[76:108])
        offset = struct.unpack(endian + "f", head[108:112])[0]
        sform_code = struct.unpack(endian + "h", head[254:256])[0]
        srow = struct.unpack(endian + "12f", head[280:328])
    else:
        datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
        dims = struct.unpack(endian + "8q", head[16:80])
        pixdim = struct.unpack(endian + "8d", head[104:168])
        offset = struct.unpack(endian + "q", head[168:176])[0]
        sform_code = struct.unpack(endian + "i", head[348:352])[0]
        srow = struct.unpack(endian + "12d", head[400:496])
    return {"endian": endian, "size": size, "dims": dims, "datatype": datatype, "bitpix": bitpix,
            "pixdim": pixdim, "offset": offset, "sform_code": sform_code,
            "srow": np.asarray(srow, dtype=np.float64).reshape(3, 4)}


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size (mod 2^32) a gzip file's trailer states: a truncated stream has no
    trailer, so its last four bytes match the expected size only by a 2^-32 chance."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            return struct.unpack("<I", fh.read(4))[0]
    except (OSError, struct.error):
        return None


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader does not say: a header whose data the file does not hold (header
    only, cut short, ``vox_offset`` past the end, a truncated gzip stream: ITK reads zeros; for
    a .gz of integer voxels the gzip trailer's length is checked instead of inflating twice), a
    pixel spacing of 0 or NaN (ITK makes it 1 mm), a sheared or scaled sform (ITK orthogonalises
    it), an image too large for memory, and NaN/Inf voxels (ITK turns NaN into 0). One pass over
    the file; every problem is a ValueError naming it."""
    source = str(path)
    gz = path.name.lower().endswith(".gz")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            header = _nifti_header(f.read(540), source)
            if header is None:
                return
            ndim = header["dims"][0]
            if not 1 <= ndim <= 7:
                return  # ITK refuses it with its own message
            dims = [int(d) for d in header["dims"][1:ndim + 1]]
            if min(dims) < 1:
                raise ValueError(f"{source}: the image is empty (dimensions {dims})")
            bitpix = int(header["bitpix"])
            if bitpix <= 0 or bitpix % 8:
                raise ValueError(f"{source}: the NIfTI header has an invalid bitpix {bitpix}")
            for axis in range(min(ndim, 3)):
                spacing = float(header["pixdim"][axis + 1])
                if not (math.isfinite(spacing) and spacing > 0):
                    raise ValueError(f"{source}: pixel spacing pixdim[{axis + 1}] = {spacing} is not a positive "
                                     f"number (a damaged header; ITK would silently use 1 mm)")
            if header["sform_code"] > 0 and ndim >= 3:
                columns = header["srow"][:, :3]
                norms = np.linalg.norm(columns, axis=0)
                if not (np.all(np.isfinite(columns)) and np.all(norms > 0)):
                    raise ValueError(f"{source}: the sform matrix is singular or not finite")
                _check_orthonormal(columns / norms, source)
                pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
                if np.abs(norms - pixdim).max() > 1e-3 * pixdim.max():
                    raise ValueError(f"{source}: the sform scales {tuple(np.round(norms, 6))} disagree with the pixel "
                                     f"spacing pixdim {tuple(np.round(pixdim, 6))}")
            voxels = int(np.prod(dims, dtype=np.int64))
            _check_memory(source, voxels, bitpix / 8)
            offset = header["offset"]
            if not (math.isfinite(offset) and offset >= header["size"]):
                raise ValueError(f"{source}: vox_offset {offset} is not a valid data offset")
            offset, nbytes = int(offset), voxels * bitpix // 8
            if not gz:
                have = path.stat().st_size - offset
                if have < nbytes:
                    raise ValueError(f"{source}: the file is truncated: the header declares {nbytes:,} bytes of voxel "
                                     f"data at offset {offset}, the file holds {max(have, 0):,}")
            dtype = (np.dtype(header["endian"] + _NIFTI_FLOAT_TYPES[header["datatype"]])
                     if header["datatype"] in _NIFTI_FLOAT_TYPES else None)
            if gz and dtype is None and _gzip_size(path) == (offset + nbytes) % 2**32:
                return  # integer voxels (finite) and the stream's own length agrees: no second pass
            f.seek(offset)
            n_nan = n_inf = 0
            left, chunk = nbytes, 1 << 24
            while left > 0:
                block = f.read(min(left, chunk))
                if not block:
                    break
                left -= len(block)
                if dtype is not None:
                    values = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype=dtype)
                    n_nan += int(np.isnan(values).sum())
                    n_inf += int(np.isinf(values).sum())
                elif not gz:
                    break  # integer data is finite; the size was checked from the file size
            if gz and left > 0:
                raise ValueError(f"{source}: the file is truncated: the header declares {nbytes:,} bytes of voxel "
                                 f"data, the compressed stream holds {nbytes - left:,}")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{source}: the gzip stream is truncated or corrupt ({exc})") from None
    except struct.error:
        raise ValueError(f"{source}: the NIfTI header is truncated") from None
    if n_nan or n_inf:
        raise ValueError(f"{source}: the image has non-finite voxels ({n_nan} NaN, {n_inf} Inf)")


def _image_information(path: Path) -> sitk.ImageFileReader:
    """A reader that has read ``path``'s header only (size, pixel type), for the memory check."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _bytes_per_voxel(reader: sitk.ImageFileReader) -> int:
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return int(probe.GetSizeOfPixelComponent()) * int(reader.GetNumberOfComponents())


def _check_header_memory(path: Path) -> None:
    reader = _image_information(path)
    _check_memory(str(path), int(np.prod(reader.GetSize(), dtype=np.int64)), _bytes_per_voxel(reader))


def _series_geometry(files: list[str], source: str) -> None:
    """Refuse a DICOM series that ITK would stack on a wrong uniform grid: a slice in another
    orientation, two slices at one position, missing slices or non-uniform spacing (ITK only
    warns). Reads the headers only."""
    positions, orientation = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(name)
        reader.ReadImageInformation()
        try:
            iop = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            ipp = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        except (RuntimeError, ValueError):
            raise ValueError(f"{source}: {Path(name).name} has no valid Image Position/Orientation (Patient); "
                             f"the slices cannot be placed") from None
        if iop.shape != (6,) or ipp.shape != (3,):
            raise ValueError(f"{source}: {Path(name).name} has an invalid Image Position/Orientation (Patient)")
        if orientation is None:
            orientation = iop
        elif np.abs(iop - orientation).max() > 1e-4:
            raise ValueError(f"{source}: {Path(name).name} has another orientation than the other slices "
                             f"({', '.join(f'{v:g}' for v in iop)}); refusing to stack them")
        positions.append(ipp)
    normal = np.cross(orientation[:3], orientation[3:])
    depth = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(depth)
    if gaps.size == 0:
        return
    if gaps.min() < 1e-3:
        raise ValueError(f"{source}: two slices share the position {depth[int(np.argmin(gaps))]:.3f} mm along the "
                         f"slice normal (duplicated slices?)")
    step = float(np.median(gaps))
    worst = float(np.abs(gaps - step).max())
    if worst > max(0.01, 0.01 * step):
        missing = int(np.sum(np.rint(gaps / step) - 1))
        what = f"{missing} missing slice(s)" if missing > 0 and np.allclose(gaps / step, np.rint(gaps / step),
                                                                            atol=0.01) else "non-uniform spacing"
        raise ValueError(f"{source}: the slices are not evenly spaced ({what}: gaps {gaps.min():.3f} to "
                         f"{gaps.max():.3f} mm, median {step:.3f} mm); refusing to stack them on a uniform grid")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D scalar image as a float32 :class:`Volume`.

    ``path``: a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd file, a single DICOM file (.dcm, or any file
    with the DICOM preamble), or a folder holding a DICOM series (the largest series when there
    are several, with a warning). DICOM rescale slope/intercept is applied (HU for CT).
    Raises ValueError naming the file for anything unreadable or not a finite 3-D scalar image:
    also for what ITK would read silently wrong (a truncated file, a spacing of 0 or NaN, a
    sheared direction matrix, a DICOM series with missing, duplicated or tilted slices) and for
    an image the header says cannot fit in memory. The libraries' own messages never reach
    stderr. The file is only read, never modified.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ValueError(f"{source}: file not found")
    captured: list[str] = []
    try:
        with _native_output() as captured:
            if path.is_dir():
                image = _read_dicom_folder(path)
            else:
                ext = _extension(path)
                if path.stat().st_size == 0:
                    raise ValueError(f"{source}: the file is empty (0 bytes)")
                if ext in DICOM_EXTENSIONS or (ext not in FILE_EXTENSIONS and _looks_like_dicom(path)):
                    _check_header_memory(path)
                    image = _read_dicom_file(path)
                elif ext in FILE_EXTENSIONS:
                    if ext in (".nii", ".nii.gz"):
                        _check_nifti(path)  # the memory check from its header too
                    else:
                        _check_header_memory(path)
                    image = sitk.ReadImage(str(path))
                else:
                    raise ValueError(f"{source}: unsupported file type {ext or '(no extension)'!r}; "
                                     f"expected one of {', '.join(FILE_EXTENSIONS + DICOM_EXTENSIONS)} "
                                     f"or a DICOM series folder")
    except RuntimeError as exc:
        what = "DICOM data" if path.is_dir() else f"{_extension(path) or 'image'} file"
        reason = _native_reason(captured) or _sitk_error(exc)
        raise ValueError(f"{source}: cannot read image (corrupt or not a valid {what}): {reason}") from exc
    except MemoryError:
        raise ValueError(f"{source}: not enough memory to read this image") from None
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


# ---------------------------------------------------------------------------------------------
# which files a read touches and a write replaces (a command never overwrites its own inputs)
# ---------------------------------------------------------------------------------------------
def _header_data_file(path: Path) -> Path | None:
    """The separate data file a .mhd / .nhdr header names (None: the data is in the header file,
    or the header lists several files, which are then all in its folder)."""
    ext = _extension(path)
    if ext not in (".mhd", ".nhdr"):
        return None
    try:
        with open(path, "rb") as fh:
            text = fh.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=" if ext == ".mhd" else ":")
        if sep and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
            value = value.strip()
            if not value or value.upper() in ("LOCAL", "LIST") or "%" in value or " " in value:
                return None
            return (path.parent / value).resolve()
    return None


def files_read(path: str | os.PathLike) -> set[Path]:
    """The files (resolved) that reading ``path`` touches: the file, the data file its header
    names (.mhd, .nhdr), or every file of a folder (a DICOM series, a model bundle)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return {path, *(p.resolve() for p in path.rglob("*"))}
    data = _header_data_file(path)
    return {path} | ({data} if data is not None else set())


def files_written(path: str | os.PathLike, *, compress: bool = True) -> set[Path]:
    """The files (resolved) that ``write_volume(..., path)`` creates or replaces: the file and
    the data file of a .mhd / .nhdr header; for a DICOM series the folder (replaced whole)."""
    path = Path(path).expanduser().resolve()
    ext = _extension(path)
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    data = {".mhd": f"{stem}.zraw" if compress else f"{stem}.raw",
            ".nhdr": f"{stem}.raw.gz" if compress else f"{stem}.raw"}.get(ext)
    return {path} | ({path.parent / data} if data else set())


def check_outputs_spare_inputs(outputs: dict[str, str | os.PathLike], inputs: set[Path]) -> None:
    """ValueError (one line) when writing any of ``outputs`` ({what: path}) would replace or
    change a file of ``inputs`` (``files_read`` of every input): the same file, a data file a
    header shares, a DICOM output folder holding an input, an output inside an input's folder."""
    inputs = {Path(p).resolve() for p in inputs}
    for what, out in outputs.items():
        for target in files_written(out):
            clash = next((i for i in sorted(inputs) if i == target or target in i.parents
                          or (i.is_dir() and i in target.parents)), None)
            if clash is not None:
                raise ValueError(f"{what} {out}: writing it would overwrite or change the input {clash}; "
                                 f"choose another output path")


# ---------------------------------------------------------------------------------------------
# all-or-nothing writing
# ---------------------------------------------------------------------------------------------
_TMP_TAG = ".medtranslate-"
_TMP_RE = re.compile(r"^\..*\.medtranslate-(\d+)-[^/]*\.tmp$")


def private_temp_dir(parent: Path, name: str) -> Path:
    """A hidden temporary folder next to an output: ``.<name>.medtranslate-<pid>-<random>.tmp``.
    Temporaries left by a killed run (its pid is gone) are cleaned up first (``clean_stale``)."""
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_TAG}{os.getpid()}-", suffix=".tmp", dir=parent))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(parent: Path) -> None:
    """Remove the temporary folders of runs that were killed (SIGKILL, power loss) in ``parent``;
    a previous output that such a run had moved aside, and that is missing now, is put back."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if not match or not entry.is_dir() or _alive(int(match.group(1))):
            continue
        for old in entry.glob(".old-*"):
            final = parent / old.name[len(".old-"):]
            if not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, final)
        shutil.rmtree(entry, ignore_errors=True)


class OutputSet:
    """Several outputs written all or nothing: each is written into a private temporary folder
    next to its target (``add_volume``, ``add_file``); ``commit`` then moves the previous outputs
    aside and the new ones into place, and puts everything back if any move fails (or the run is
    interrupted), so a failed run leaves the previous outputs as they were. ``discard`` (or an
    exception inside ``with``) removes what was staged."""

    def __init__(self) -> None:
        # (temporary folder, staged path, final path, an output named by the caller, not a data file)
        self._staged: list[tuple[Path, Path, Path, bool]] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.discard()

    def _tmp(self, path: Path) -> Path:
        return private_temp_dir(path.parent, path.name)

    def add_volume(self, volume: Volume, path: str | os.PathLike, *, modality: str = "CT",
                   compress: bool = True, level: int | None = None) -> None:
        """Stage ``volume`` for ``path`` (see ``write_volume``); ``level``: the compression level
        (1 fastest .. 9 smallest; None: the writer's default) of .nrrd / .mha / .mhd / .nhdr (ITK's
        NIfTI writer has one level of its own; a .nii is the fast choice)."""
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
        tmp = self._tmp(path)
        if dicom:
            staged = tmp / path.name
            staged.mkdir()
            self._staged.append((tmp, staged, path, True))
            try:
                with _native_output():
                    _write_dicom_series(volume, staged, modality)
            except RuntimeError as exc:
                raise ValueError(f"{path}: cannot write DICOM series: {_sitk_error(exc)}") from exc
            return
        staged = tmp / path.name
        self._staged.append((tmp, staged, path, True))
        try:
            with _native_output():
                sitk.WriteImage(volume.to_sitk(), str(staged), useCompression=compress,
                                compressionLevel=-1 if level is None else int(level))
        except RuntimeError as exc:
            raise ValueError(f"{path}: cannot write image: {_sitk_error(exc)}") from exc
        # Header+data formats (.mhd/.nhdr) write a data file beside the header: it moves too.
        for extra in sorted(p for p in tmp.iterdir() if p.name != path.name):
            self._staged.append((tmp, extra, path.parent / extra.name, False))

    def add_file(self, write: Callable[[Path], object], path: str | os.PathLike) -> None:
        """Stage a file that ``write(staged_path)`` writes (e.g. JSON)."""
        path = Path(path)
        tmp = self._tmp(path)
        staged = tmp / path.name
        self._staged.append((tmp, staged, path, True))
        write(staged)

    def commit(self) -> list[Path]:
        """Move every staged output into place at once; returns the final paths (without the
        data files of .mhd / .nhdr headers)."""
        done: list[tuple[Path, Path | None]] = []  # (final path, its previous version moved aside)
        named = [final for _, _, final, primary in self._staged if primary]
        try:
            for tmp, staged, final, _ in self._staged:
                backup = None
                if final.exists() or final.is_symlink():
                    backup = tmp / f".old-{final.name}"
                    os.replace(final, backup)
                done.append((final, backup))
                os.replace(staged, final)
        except BaseException:
            for final, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if final.is_dir() and not final.is_symlink():
                        shutil.rmtree(final)
                    elif final.exists() or final.is_symlink():
                        final.unlink()
                    if backup is not None:
                        os.replace(backup, final)
            raise
        finally:
            self.discard()
        return named

    def discard(self) -> None:
        for tmp in {entry[0] for entry in self._staged}:
            shutil.rmtree(tmp, ignore_errors=True)
        self._staged = []


def write_volume(volume: Volume, path: str | os.PathLike, *, modality: str = "CT",
                 compress: bool = True, level: int | None = None) -> Path:
    """Write ``volume`` and return the written path.

    A path ending in .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd is written as that format (float32); an
    existing folder or a path without extension becomes a DICOM series folder (int16 with rescale
    slope/intercept, one file per slice, ``modality`` in the Modality tag). Parent folders are
    created. The write is atomic (``OutputSet``): everything is written in a temporary folder next
    to the target and moved into place at the end, so a failure never leaves a partial output and
    keeps the previous one. An existing DICOM output folder is replaced only if it holds nothing
    but .dcm files.

    DICOM limits: values are stored as int16 (integer-valued data in range exactly, anything else
    through a rescale slope, error <= slope / 2); a left-handed direction (det < 0) cannot be
    expressed in DICOM, so such a volume is written with its slices reversed and reads back as
    the same physical image with a right-handed direction.
    """
    with OutputSet() as outputs:
        outputs.add_volume(volume, path, modality=modality, compress=compress, level=level)
        outputs.commit()
    return Path(path)
