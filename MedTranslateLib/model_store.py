"""The user's model folder and the bundled models.

- User models: ``$MEDTRANSLATE_HOME/models`` (default ``~/.medtranslate/models``), one bundle per
  entry (a folder, or a .zip), its name being the folder name / zip stem.
- Bundled models: ``Resources/Models/*`` of the extension (read-only, demo models).

``import_model`` validates a bundle by loading it (weights and architecture must match) and copies
its two files into the user folder as ``<name>/``; nothing is copied when validation fails.
A user model shadows a bundled one of the same name; ``import_model`` takes such a name only with
``overwrite=True`` (the CLI's ``--force``).

An entry that cannot be read (damaged metadata or zip, no permission, a link loop) is listed
with ``error`` set to one line saying why; it never stops the other models from being listed
or found.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .bundle import (
    META_NAME,
    WEIGHTS_NAME,
    BundleError,
    BundleMeta,
    load_bundle,
    read_bundle_files,
    read_bundle_meta,
)
from .io import replace_dir

__all__ = ["ModelInfo", "models_dir", "bundled_models_dir", "list_models", "find_model", "import_model"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class ModelInfo:
    """One entry of the model list. ``meta`` is None and ``error`` says why when it is broken."""

    name: str
    path: Path
    origin: str  # "user" | "bundled"
    meta: BundleMeta | None = None
    error: str | None = None

    @property
    def method(self) -> str:
        return self.meta.method if self.meta else "?"

    @property
    def source(self) -> str:
        return self.meta.source.modality if self.meta else "?"

    @property
    def target(self) -> str:
        return self.meta.target.modality if self.meta else "?"


def models_dir() -> Path:
    """``$MEDTRANSLATE_HOME/models`` (default ``~/.medtranslate/models``); not created here."""
    home = os.environ.get("MEDTRANSLATE_HOME") or "~/.medtranslate"
    return Path(home).expanduser() / "models"


def bundled_models_dir() -> Path:
    """``Resources/Models`` next to the library (exists in a source checkout / the extension)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def _entry_name(path: Path) -> str:
    """The model name of a user-folder entry: a zip's stem, else the file or folder name."""
    try:
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    return path.stem if path.suffix.lower() == ".zip" and not is_dir else path.name


def _looks_like_bundle(entry: Path) -> bool:
    """A .zip file or a folder with metadata (not a README, not a folder of something else); also
    an entry that cannot be examined (a link loop, a dangling link, no permission), so that it is
    listed with what ``read_bundle_meta`` says is wrong, as when the model is used."""
    try:
        mode = entry.stat().st_mode  # follows links
    except OSError:
        return True
    if stat.S_ISREG(mode):
        return entry.suffix.lower() == ".zip"
    if not stat.S_ISDIR(mode):
        return False
    try:
        (entry / META_NAME).stat()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(str(exc))[:160] or type(exc).__name__


def _entries(folder: Path) -> list[tuple[str, Path]] | str:
    """(model name, path) of the entries of ``folder`` that are (or look like) bundles, sorted by
    file name, without reading them; a folder that cannot be listed gives the reason instead."""
    try:
        if not folder.is_dir():
            return []
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return f"{folder}: cannot list the model folder ({_reason(exc)})"
    # names starting with a dot: temporary folders of an import in progress, hidden files
    return [(_entry_name(e), e) for e in entries if not e.name.startswith(".") and _looks_like_bundle(e)]


def _scan(folder: Path, origin: str) -> list[ModelInfo]:
    """The entries of ``folder`` that are (or look like) bundles, sorted by file name; a broken
    one has ``error`` set. A folder that cannot be listed gives one broken entry named by its path."""
    entries = _entries(folder)
    if isinstance(entries, str):
        return [ModelInfo(str(folder), folder, origin, error=entries)]
    infos = []
    for name, entry in entries:
        try:
            infos.append(ModelInfo(name, entry, origin, meta=read_bundle_meta(entry)))
        except BundleError as exc:
            infos.append(ModelInfo(name, entry, origin, error=_one_line(str(exc))))
        except Exception as exc:  # a bug reading one entry must not hide every model
            infos.append(ModelInfo(name, entry, origin, error=f"{entry}: cannot read ({type(exc).__name__}: "
                                                               f"{_reason(exc)})"))
    return infos


def list_models() -> list[ModelInfo]:
    """User models, then bundled models not shadowed by a user model of the same name. Never
    raises for a broken entry: it is listed with ``error`` set."""
    user = _scan(models_dir(), "user")
    names = {m.name for m in user}
    return user + [m for m in _scan(bundled_models_dir(), "bundled") if m.name not in names]


def find_model(name_or_path: str | Path) -> Path:
    """Path of a model given by name (user folder first, then bundled) or by path. A broken
    model's path is returned too (loading it says what is wrong); other broken entries do not
    matter."""
    text = str(name_or_path)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~user" without such a user
        path = Path(text)
    try:
        if path.exists():
            return path
    except OSError:
        pass  # cannot be examined (e.g. no permission on the way): try it as a name
    # by name: user folder first; only the names are needed, no bundle is read (issue 14: parsing
    # every bundle's metadata cost 0.3 s of each translate)
    for folder in (models_dir(), bundled_models_dir()):
        entries = _entries(folder)
        for name, entry in entries if isinstance(entries, list) else ():
            if name == text:
                return entry
    if os.sep in text or "/" in text or text.endswith(".zip"):
        raise BundleError(f"{text}: no such bundle")
    known = ", ".join(m.name for m in list_models()) or "none"
    raise BundleError(f"no model named {text!r} (known models: {known}); give a bundle path or "
                      f"add it with: medtranslate models import PATH")


def _default_name(path: Path) -> str:
    path = path.resolve()
    if path.is_file() and path.name in (META_NAME, WEIGHTS_NAME):
        path = path.parent
    return _entry_name(path)


def import_model(path: str | Path, name: str | None = None, *, overwrite: bool = False) -> ModelInfo:
    """Validate the bundle at ``path`` by loading it, then copy it to ``models_dir()/<name>/``.

    ``name`` defaults to the bundle's folder name or zip stem. Raises BundleError (one line) when
    the bundle is broken, the name is invalid, or taken: by a user model, or by a bundled model
    that the new one would shadow. ``overwrite=True`` (the CLI's ``--force``) replaces the user
    model / shadows the bundled one. Copies nothing when it raises.
    """
    path = Path(path).expanduser()
    bundle = load_bundle(path)  # full check: metadata, method, architecture, tensors
    name = name if name is not None else _default_name(path)
    if not _NAME_RE.match(name):
        raise BundleError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
                          f"(and start with a letter or digit)")
    if not overwrite:
        bundled = {m.name: m.path for m in _scan(bundled_models_dir(), "bundled")}
        if name in bundled:
            raise BundleError(f"{name!r} is the name of a bundled model ({bundled[name]}) that a user model "
                              f"of that name would shadow; choose another --name, or --force to shadow it")
    meta_bytes, weights = read_bundle_files(path)
    dest_root = models_dir()
    dest = dest_root / name
    zip_twin = dest_root / f"{name}.zip"
    if (dest.exists() or zip_twin.exists()) and not overwrite:
        raise BundleError(f"a model named {name!r} already exists in {dest_root}; choose another --name")
    try:
        if dest.exists() and path.resolve() == dest.resolve():
            raise BundleError(f"{path}: is already the stored model {name!r}")
    except OSError:
        pass
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dest_root))
    try:
        (tmp / META_NAME).write_bytes(meta_bytes)
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        replace_dir(tmp, dest)  # the old model comes back if the swap fails
        if zip_twin.exists():
            zip_twin.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelInfo(name, dest, "user", meta=bundle.meta)
