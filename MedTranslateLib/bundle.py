"""Model bundles: a folder (or a .zip of one) with ``model.safetensors`` + ``medtranslate.yaml``.

``model.safetensors`` holds the method's inference ``state_dict`` only (no discriminators, no
optimiser state). ``medtranslate.yaml``::

    format_version: 1
    library_version: 0.1.0
    method: pix2pix
    architecture: {...}          # to_dict(method.config)
    source: {modality: ct, preset: ct_abdomen}
    target: {modality: cta_arterial, preset: ct_angio}
    slice: {size: 128, axis: 0, margin: 0.05, roi: null, roi_margin: 4, min_foreground: 0.0}
    rois: [liver, tumor]         # ROI mask names the model was trained with
    training: {...}              # free-form: data, cases, steps, command, config
    metrics: {...}               # free-form evaluation table

Nothing is ever unpickled: weights are read with safetensors, metadata with ``config.parse_yaml``
(safe loading: tags stay inert; no aliases; bounded nesting).
A .zip may hold the two files at its root or inside one top folder; it is read in memory, never
extracted, and refused outright if any member has an absolute path or a '..' component.
What is read is capped from the declared sizes, before reading: ``MAX_META_BYTES`` of metadata,
``MAX_WEIGHTS_BYTES`` of weights, a safetensors header of ``MAX_HEADER_BYTES`` whose tensors lie
within the file, zip members that inflate at most ``MAX_INFLATION`` times (the reasons are
given where they are defined).
Every problem raises ``BundleError``: one line that names the file and what is wrong, including
a damaged zip (bad CRC, bad deflate data, truncated) and a file that cannot be read.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import dump_yaml, from_dict, parse_yaml, to_dict
from .intensity import IntensityPreset, preset_from_config
from .io import replace_dir
from .regions import roi_names_from_training
from .slicing import SliceSpec

if TYPE_CHECKING:  # torch, safetensors and the methods are imported by the functions that need them:
    # reading metadata (model lists, capabilities) needs no torch (the Slicer panel's GUI thread)
    import torch

    from .methods import Capabilities, TranslationMethod

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "META_NAME", "BundleError", "BundleMeta", "ModalitySpec",
           "SliceSpec", "Bundle", "save_bundle", "load_bundle", "read_bundle_meta", "read_bundle_files",
           "is_bundle", "meta_summary", "meta_capabilities", "meta_rois", "side_preset", "represent_warnings",
           "MAX_META_BYTES", "MAX_WEIGHTS_BYTES", "MAX_HEADER_BYTES", "MAX_INFLATION"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "medtranslate.yaml"
_MAX_LISTED = 5


class BundleError(ValueError):
    """A bundle cannot be read, saved or used; the message is one line naming the file."""


@dataclass
class ModalitySpec:
    """A side of the translation: modality name and the intensity preset (a preset name such as
    ``ct_abdomen`` or a preset config mapping for ``intensity.preset_from_config``)."""

    modality: str = "unknown"
    preset: str | dict[str, Any] | None = None


@dataclass
class BundleMeta:
    """Contents of ``medtranslate.yaml``. ``method`` and ``architecture`` are filled from the
    method by ``save_bundle``."""

    method: str = ""
    architecture: dict[str, Any] = field(default_factory=dict)
    source: ModalitySpec = field(default_factory=ModalitySpec)
    target: ModalitySpec = field(default_factory=ModalitySpec)
    #: the whole slicing spec of training (``data.SliceSpec``: size, axis, in-plane box margin,
    #: ROI slice selection); the engine slices volumes with the same one.
    slice: SliceSpec = field(default_factory=SliceSpec)
    #: ROI mask names the model was trained with (None: the training record's data.masks, else
    #: ``regions.DEFAULT_ROIS``); see ``meta_rois``.
    rois: list[str] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: what the method class declared for this architecture when the bundle was saved
    #: (``methods.Capabilities.to_dict()``): front ends read it without importing torch. None in
    #: bundles written before it existed; ``meta_capabilities`` always asks the method class.
    capabilities: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    library_version: str = __version__


@dataclass
class Bundle:
    """A loaded bundle: ``method`` (eval mode, on ``map_location``), its ``meta``, and ``path``."""

    method: TranslationMethod
    meta: BundleMeta
    path: Path


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------

def _weights_bytes(method: TranslationMethod) -> bytes:
    from safetensors.torch import save as st_save

    # Copies: safetensors refuses tensors that share storage (tied weights) and non-contiguous ones.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in method.state_dict().items()}
    return st_save(tensors, metadata={"format": "pt", "medtranslate_method": method.name,
                                      "medtranslate_format": str(FORMAT_VERSION)})


def save_bundle(method: TranslationMethod, meta: BundleMeta | dict | None, path: str | Path) -> Path:
    """Write ``method`` (inference state only) and ``meta`` as a bundle at ``path``.

    A ``.zip`` suffix writes a zip (files at its root), anything else a folder. The write is
    atomic: everything goes to a temporary name next to ``path`` and is renamed into place. An
    existing bundle at ``path`` is replaced; any other existing file or non-empty folder is not
    touched (BundleError). Returns ``path``.
    """
    path = Path(path)
    if meta is None:
        meta = BundleMeta()
    elif isinstance(meta, dict):
        meta = from_dict(BundleMeta, meta, where=f"bundle metadata for {path}")
    if meta.method and meta.method != method.name:
        raise BundleError(f"{path}: metadata says method {meta.method!r} but the model is {method.name!r}")
    from .methods import capabilities_of

    architecture = to_dict(method.config)
    meta = replace(meta, method=method.name, architecture=architecture,
                   capabilities=capabilities_of(method.name, architecture).to_dict(),
                   format_version=FORMAT_VERSION, library_version=__version__)
    meta_text = dump_yaml(meta)
    weights = _weights_bytes(method)

    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        _check_replaceable(path)
    if path.suffix.lower() == ".zip":
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
                zf.writestr(META_NAME, meta_text, compress_type=zipfile.ZIP_DEFLATED)
                zf.writestr(WEIGHTS_NAME, weights, compress_type=zipfile.ZIP_STORED)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        _write_folder(tmp, meta_text.encode("utf-8"), weights)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_folder(folder: Path, meta_bytes: bytes, weights: bytes) -> None:
    for name, data in ((WEIGHTS_NAME, weights), (META_NAME, meta_bytes)):
        with open(folder / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def _check_replaceable(path: Path) -> None:
    if path.is_symlink():
        raise BundleError(f"{path}: exists and is a link; not replacing it")
    if path.is_dir():
        if any(path.iterdir()) and not (path / META_NAME).is_file():
            raise BundleError(f"{path}: exists and is not a MedTranslate bundle; not replacing it")
    elif path.suffix.lower() != ".zip" or not zipfile.is_zipfile(path):
        raise BundleError(f"{path}: exists and is not a bundle .zip; not replacing it")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

#: Largest ``medtranslate.yaml``. Real ones are a few KiB (the demo bundles: ~5 KiB, a per-case
#: metrics table adds a few hundred bytes per case); YAML is parsed in pure Python at a few
#: hundred KiB per second, so 1 MiB is read in seconds, 16 MiB would take a minute per model list.
MAX_META_BYTES = 1 << 20
#: Largest ``model.safetensors``: 2 billion float32 parameters, far beyond the translation
#: networks of the papers implemented here (tens to hundreds of millions), while a zip bundle is
#: read into memory whole and a laptop running Slicer has 8-16 GiB.
MAX_WEIGHTS_BYTES = 8 << 30
#: Largest safetensors header (the JSON table of tensor names, dtypes, shapes and offsets, about
#: 100 bytes per tensor; safetensors itself stops at 100 MB).
MAX_HEADER_BYTES = 16 << 20
#: Most a compressed zip member may inflate (uncompressed / compressed size) once it is over
#: ``_INFLATION_FLOOR``: trained float weights hardly compress (deflate gains ~10%), while a zip
#: bomb inflates about 1000 times.
MAX_INFLATION = 100
_INFLATION_FLOOR = 16 << 20

#: What a damaged or unusual zip raises while it is opened or a member is read: bad CRC, bad
#: deflate data (zlib.error), a truncated archive (EOFError), an encrypted member (RuntimeError),
#: an unknown compression method (NotImplementedError), a bad header (struct.error, ValueError).
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError, struct.error,
    *((zipfile.lzma.LZMAError,) if getattr(zipfile, "lzma", None) else ()))


@dataclass
class _Files:
    """Where a bundle's two files are: names for messages, and either paths or bytes."""

    meta_name: str
    weights_name: str
    meta_bytes: bytes
    weights_path: Path | None = None
    weights_bytes: bytes | None = None
    top_folder: str = ""


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _too_large(name: str, size: int, limit: int) -> BundleError:
    return BundleError(f"{name}: too large ({_size(size)}, the limit is {_size(limit)}); not reading it")


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` of ``path`` (links followed); None when it does not exist."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # permission denied, a link loop, a NUL in the path, ...
        raise BundleError(f"{path}: cannot read ({_detail(exc)})") from None


def _regular_file(path: Path, missing: str, limit: int) -> int:
    """Size of the regular file ``path``; BundleError when it is missing, not a file or too large."""
    st = _stat(path)
    if st is None:
        raise BundleError(missing)
    if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO or a device such as /dev/zero
        raise BundleError(f"{path}: not a regular file")
    if st.st_size > limit:
        raise _too_large(str(path), st.st_size, limit)
    return st.st_size


def _read_file(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({_detail(exc)})") from None
    if len(data) > limit:  # it grew since it was measured
        raise _too_large(str(path), len(data), limit)
    return data


def _check_weights_head(read: Callable[[int], bytes], size: int, name: str) -> bytes:
    """Read and check the head of a safetensors file of ``size`` bytes through ``read``, before
    the tensors are: the 8-byte header length, the JSON header, and that the tensors' offsets lie
    within the file. Returns the bytes read. (dtype x shape against the offsets is checked by
    safetensors when it loads the file.)"""
    head = read(8)
    if len(head) < 8:
        raise BundleError(f"{name}: not a valid safetensors file ({size} bytes, less than a header)")
    length = int.from_bytes(head, "little")
    if length > size - 8:
        raise BundleError(f"{name}: not a valid safetensors file (its header claims {_size(length)}, "
                          f"the file has {_size(size)})")
    if length > MAX_HEADER_BYTES:
        raise BundleError(f"{name}: not a valid safetensors file (its header claims {_size(length)}, "
                          f"more than the {_size(MAX_HEADER_BYTES)} limit)")
    header = read(length)
    try:
        table = json.loads(header)
    except (ValueError, RecursionError):
        raise BundleError(f"{name}: not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(table, dict):
        raise BundleError(f"{name}: not a valid safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    end = 0
    for key, entry in table.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise BundleError(f"{name}: not a valid safetensors file (tensor {key[:80]!r} has no valid "
                              f"data_offsets)")
        end = max(end, offsets[1])
    if end > data:
        raise BundleError(f"{name}: not a valid safetensors file (its header claims {_size(end)} of tensors, "
                          f"the file holds {_size(data)})")
    return head + header


def _unsafe_member(name: str) -> bool:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts


def _check_member(path: Path, archive_size: int, info: zipfile.ZipInfo, limit: int) -> None:
    """Refuse a zip member from its declared sizes, before reading it (zipfile never returns more
    than the declared uncompressed size, so checking that one bounds what is read)."""
    name = f"{path}:{info.filename}"
    if info.flag_bits & 0x1:
        raise BundleError(f"{name}: encrypted; bundles must be plain zips")
    if info.compress_size > archive_size or (info.compress_type == zipfile.ZIP_STORED
                                             and info.file_size != info.compress_size):
        raise BundleError(f"{path}: damaged zip ({info.filename} claims {info.compress_size} bytes compressed, "
                          f"{info.file_size} uncompressed, in an archive of {archive_size})")
    if info.file_size > limit:
        raise _too_large(name, info.file_size, limit)
    if info.file_size > max(MAX_INFLATION * info.compress_size, _INFLATION_FLOOR):
        raise BundleError(f"{name}: would inflate {info.file_size // max(info.compress_size, 1)} times "
                          f"({_size(info.compress_size)} to {_size(info.file_size)}); not a bundle (a zip bomb?)")


def _read_zip(path: Path, archive_size: int, *, with_weights: bool) -> _Files:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise BundleError(f"{path}: not a zip file (a bundle is a folder or a .zip of one)") from None
    except _ZIP_ERRORS as exc:
        raise BundleError(f"{path}: cannot read ({_detail(exc)})") from None
    with zf:
        infos = {info.filename: info for info in zf.infolist()}
        for name in infos:
            if _unsafe_member(name):
                raise BundleError(f"{path}: unsafe member path {name!r} in zip (absolute or '..'); refusing it")
        metas = [n for n in infos if n == META_NAME
                 or (n.count("/") == 1 and n.endswith("/" + META_NAME) and not n.startswith("__MACOSX/"))]
        if not metas:
            raise BundleError(f"{path}: not a bundle: no {META_NAME} at the zip's root or in one top folder")
        if len(metas) > 1:
            raise BundleError(f"{path}: holds several bundles ({', '.join(metas)}); put one bundle per zip")
        top = metas[0][: -len(META_NAME)]
        weights_member = top + WEIGHTS_NAME
        if weights_member not in infos:
            raise BundleError(f"{path}: not a bundle: {weights_member} is missing from the zip")
        meta_info, weights_info = infos[metas[0]], infos[weights_member]
        _check_member(path, archive_size, meta_info, MAX_META_BYTES)
        _check_member(path, archive_size, weights_info, MAX_WEIGHTS_BYTES)
        weights = None
        try:
            meta_bytes = zf.read(meta_info)
            if with_weights:
                with zf.open(weights_info) as fh:
                    head = _check_weights_head(fh.read, weights_info.file_size, f"{path}:{weights_member}")
                    weights = head + fh.read()
        except BundleError:
            raise
        except _ZIP_ERRORS as exc:
            raise BundleError(f"{path}: damaged zip ({_detail(exc)})") from None
    return _Files(meta_name=f"{path}:{metas[0]}", weights_name=f"{path}:{weights_member}",
                  meta_bytes=meta_bytes, weights_bytes=weights, top_folder=top.rstrip("/"))


def _locate(path: str | Path, *, with_weights: bool = True) -> _Files:
    """The bundle's files; refuses, from their sizes and before reading them, a metadata file over
    ``MAX_META_BYTES`` and weights over ``MAX_WEIGHTS_BYTES`` (see ``_check_member`` for zips)."""
    path = Path(path)
    st = _stat(path)
    if st is None and path.is_symlink():
        raise BundleError(f"{path}: a link to {os.readlink(path)}, which does not exist")
    if st is None:
        raise BundleError(f"{path}: no such bundle (expected a folder or .zip with {META_NAME} and {WEIGHTS_NAME})")
    if stat.S_ISDIR(st.st_mode):
        meta_path, weights_path = path / META_NAME, path / WEIGHTS_NAME
        _regular_file(meta_path, f"{path}: not a bundle: {META_NAME} is missing", MAX_META_BYTES)
        _regular_file(weights_path, f"{path}: not a bundle: {WEIGHTS_NAME} is missing", MAX_WEIGHTS_BYTES)
        return _Files(meta_name=str(meta_path), weights_name=str(weights_path),
                      meta_bytes=_read_file(meta_path, MAX_META_BYTES), weights_path=weights_path)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path}: not a bundle (neither a folder nor a .zip file)")
    if path.name in (META_NAME, WEIGHTS_NAME):
        return _locate(path.parent, with_weights=with_weights)
    return _read_zip(path, st.st_size, with_weights=with_weights)


def _parse_meta(files: _Files) -> BundleMeta:
    where = files.meta_name
    try:
        text = files.meta_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}: not UTF-8 text") from None
    try:  # no aliases: save_bundle never writes any, and they are how "billion laughs" files blow up
        data = parse_yaml(text, where=where, aliases=False)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    version = data.get("format_version", None)
    if version is None:
        raise BundleError(f"{where}: missing format_version (not a MedTranslate bundle?)")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: made by a newer MedTranslate (format {version} > {FORMAT_VERSION}); "
                          f"upgrade MedTranslateLib to load it")
    try:
        meta = from_dict(BundleMeta, data, where=where)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if not meta.method:
        raise BundleError(f"{where}: missing method")
    config = meta.training.get("config")  # free-form, but meta_rois reads its data.masks
    if config is not None and not isinstance(config, dict):
        raise BundleError(f"'training.config' in {where}: expected a mapping, got {type(config).__name__}")
    return meta


def read_bundle_meta(path: str | Path) -> BundleMeta:
    """The bundle's metadata, validated, without reading the weights."""
    return _parse_meta(_locate(path, with_weights=False))


def read_bundle_files(path: str | Path) -> tuple[bytes, bytes]:
    """Raw ``(medtranslate.yaml, model.safetensors)`` bytes of a folder or zip bundle (for copying)."""
    files = _locate(path, with_weights=True)
    if files.weights_bytes is None:
        assert files.weights_path is not None
        files.weights_bytes = _read_file(files.weights_path, MAX_WEIGHTS_BYTES)
    return files.meta_bytes, files.weights_bytes


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` looks like a bundle (metadata readable; weights not checked)."""
    try:
        read_bundle_meta(path)
    except BundleError:
        return False
    return True


def _load_tensors(files: _Files) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file as st_load_file

    if files.weights_bytes is None:  # a folder: check the header before safetensors maps the file
        assert files.weights_path is not None
        try:
            with open(files.weights_path, "rb") as fh:
                _check_weights_head(fh.read, os.fstat(fh.fileno()).st_size, files.weights_name)
        except OSError as exc:
            raise BundleError(f"{files.weights_name}: cannot read ({_detail(exc)})") from None
    try:
        if files.weights_bytes is not None:
            return st_load(files.weights_bytes)
        assert files.weights_path is not None
        return st_load_file(files.weights_path, device="cpu")
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise BundleError(f"{files.weights_name}: not a valid safetensors file ({detail})") from None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _compare(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(expected) if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor{'s' * (len(missing) != 1)} ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor{'s' * (len(unexpected) != 1)} "
                        f"({_listed(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} "
                        f"(file vs model: {_listed(mismatched)})")
    return problems


def load_bundle(path: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    """Load and check a bundle: the method rebuilt from ``architecture``, its weights loaded
    strictly, in eval mode, on ``map_location``. Raises BundleError (one line) on any problem."""
    from .methods import available_methods, get_method_class

    path = Path(path)
    files = _locate(path, with_weights=True)
    meta = _parse_meta(files)
    try:
        cls = get_method_class(meta.method)
    except ValueError:
        raise BundleError(f"{files.meta_name}: unknown method {meta.method!r} "
                          f"(this MedTranslate knows: {', '.join(available_methods())}); "
                          f"upgrade MedTranslateLib or check the bundle") from None
    try:
        config = from_dict(cls.Config, meta.architecture, where=files.meta_name, prefix="architecture")
        method = cls(config)
    except ValueError as exc:
        raise BundleError(" ".join(str(exc).split())) from None
    state = _load_tensors(files)
    problems = _compare(state, method.state_dict())
    if problems:
        raise BundleError(f"{files.weights_name}: weights do not match the {meta.method} architecture in "
                          f"{META_NAME}: " + "; ".join(problems))
    try:
        method.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{files.weights_name}: cannot load weights ({' '.join(str(exc).split())[:200]})") \
            from None
    method.eval()
    method.to(map_location)
    return Bundle(method=method, meta=meta, path=path)


def meta_summary(meta: BundleMeta) -> str:
    """The metadata as the YAML text a bundle holds (for ``models show`` and the Slicer module),
    after a comment line per warning of ``represent_warnings``."""
    notes = "".join(f"# warning: {w}\n" for w in represent_warnings(meta))
    return notes + dump_yaml(meta)


# --------------------------------------------------------------------------------------------
# what a bundle's model offers (asked by every front end, no weights needed)
# --------------------------------------------------------------------------------------------

def meta_rois(meta: BundleMeta) -> tuple[str, ...]:
    """ROI mask names of the model: ``rois``, else what its training record says, else the
    default (``regions.DEFAULT_ROIS``)."""
    if meta.rois:
        return tuple(meta.rois)
    return roi_names_from_training(meta.training)


def meta_capabilities(meta: BundleMeta) -> Capabilities:
    """The method class's capabilities with the bundle's architecture (BundleError when the
    method or architecture is unknown). Imports the methods (torch); a front end that must not
    reads ``meta.capabilities``, the copy written when the bundle was saved."""
    from .methods import capabilities_of

    try:
        return capabilities_of(meta.method, meta.architecture)
    except ValueError as exc:
        raise BundleError(" ".join(str(exc).split())) from None


def side_preset(meta: BundleMeta, side: str) -> IntensityPreset:
    """The (unfitted) intensity preset of ``side`` ("source" or "target")."""
    spec = getattr(meta, side).preset
    if spec is None:
        raise BundleError(f"{side}.preset is missing in {META_NAME}")
    try:
        return preset_from_config(spec)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{side}.preset in {META_NAME}: {_detail(exc)}") from None


def represent_warnings(meta: BundleMeta) -> list[str]:
    """One line per problem of the target window: landmark tissues of the target's units that
    it cannot represent (a CT model in the abdomen window outputs air as -160 HU)."""
    try:
        target = side_preset(meta, "target")
    except BundleError:
        return []
    clipped = target.clipped_landmarks()
    if not clipped:
        return []
    lo, hi = target.physical_range
    return [f"the target window {lo:g}..{hi:g} {target.UNITS} cannot represent {', '.join(clipped)}: "
            f"whole-volume values outside it are clipped"]
