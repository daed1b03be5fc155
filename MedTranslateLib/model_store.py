"""The user's model folder and the bundled models.

- User models: ``$MEDTRANSLATE_HOME/models`` (default ``~/.medtranslate/models``), one bundle per
  entry (a folder, or a .zip), its name being the folder name / zip stem.
- Bundled models: ``Resources/Models/*`` of the extension (read-only, demo models).

``import_model`` validates a bundle by loading it (weights and architecture must match) and copies
its two files into the user folder as ``<name>/``; nothing is copied when validation fails.
A user model shadows a bundled one of the same name.
"""

from __future__ import annotations

import os
import re
import shutil
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
    return path.stem if path.is_file() and path.suffix.lower() == ".zip" else path.name


def _scan(folder: Path, origin: str) -> list[ModelInfo]:
    if not folder.is_dir():
        return []
    infos = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # temporary folders of an import in progress, hidden files
        is_zip = entry.is_file() and entry.suffix.lower() == ".zip"
        if not (is_zip or (entry.is_dir() and (entry / META_NAME).exists())):
            continue
        try:
            infos.append(ModelInfo(_entry_name(entry), entry, origin, meta=read_bundle_meta(entry)))
        except BundleError as exc:
            infos.append(ModelInfo(_entry_name(entry), entry, origin, error=str(exc)))
    return infos


def list_models() -> list[ModelInfo]:
    """User models, then bundled models not shadowed by a user model of the same name."""
    user = _scan(models_dir(), "user")
    names = {m.name for m in user}
    return user + [m for m in _scan(bundled_models_dir(), "bundled") if m.name not in names]


def find_model(name_or_path: str | Path) -> Path:
    """Path of a model given by name (user folder first, then bundled) or by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    for info in list_models():
        if info.name == text:
            return info.path
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
    the bundle is broken, the name is invalid or taken (unless ``overwrite``); copies nothing then.
    """
    path = Path(path).expanduser()
    bundle = load_bundle(path)  # full check: metadata, method, architecture, tensors
    name = name if name is not None else _default_name(path)
    if not _NAME_RE.match(name):
        raise BundleError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
                          f"(and start with a letter or digit)")
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
