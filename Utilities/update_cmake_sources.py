"""Rewrite the generated file lists in MedTranslate/CMakeLists.txt from the files on disk.

Lists (paths relative to the repository root, sorted):
- ``MODULE_LIB_PYTHON_SCRIPTS``: every ``*.py`` under ``MedTranslateLib/``;
- ``MODULE_PYTHON_RESOURCES``: every file under ``Resources/``.
Caches (``__pycache__``, ``*.pyc``) and hidden files (``.gitkeep``, ``.DS_Store``) are skipped.

Usage::

    python Utilities/update_cmake_sources.py          # rewrite the lists in place
    python Utilities/update_cmake_sources.py --check  # exit 1 if the lists are stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_CMAKE = ROOT / "MedTranslate" / "CMakeLists.txt"
LIB_DIR = "MedTranslateLib"
RESOURCES_DIR = "Resources"


def _is_skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts) or relative.suffix in (
        ".pyc",
        ".pyo",
    )


def _files(root: Path, folder: str, suffix: str | None = None) -> list[str]:
    base = root / folder
    if not base.is_dir():
        return []
    found = []
    for path in base.rglob("*"):
        relative = path.relative_to(root)
        if not path.is_file() or _is_skipped(relative):
            continue
        if suffix is not None and path.suffix != suffix:
            continue
        found.append(relative.as_posix())
    return sorted(found)


def library_scripts(root: Path = ROOT) -> list[str]:
    """Every ``*.py`` file of the library, relative to ``root``."""
    return _files(root, LIB_DIR, ".py")


def resource_files(root: Path = ROOT) -> list[str]:
    """Every file under ``Resources/``, relative to ``root``."""
    return _files(root, RESOURCES_DIR)


def _block(name: str, entries: list[str]) -> str:
    lines = [f"set({name}"] + [f"  {entry}" for entry in entries] + ["  )"]
    return "\n".join(lines) + "\n"


def render(text: str, lists: dict[str, list[str]]) -> str:
    """Replace the text between ``# BEGIN GENERATED: NAME`` and ``# END GENERATED: NAME``."""
    for name, entries in lists.items():
        pattern = re.compile(
            rf"(^# BEGIN GENERATED: {name}\n).*?(^# END GENERATED: {name}$)", re.MULTILINE | re.DOTALL
        )
        if not pattern.search(text):
            raise SystemExit(f"{MODULE_CMAKE}: markers for {name} not found")
        text = pattern.sub(lambda m, e=entries, n=name: m.group(1) + _block(n, e) + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the lists are current")
    args = parser.parse_args(argv)

    current = MODULE_CMAKE.read_text(encoding="utf-8")
    updated = render(
        current,
        {"MODULE_LIB_PYTHON_SCRIPTS": library_scripts(), "MODULE_PYTHON_RESOURCES": resource_files()},
    )
    if updated == current:
        print(f"{MODULE_CMAKE.relative_to(ROOT)} is up to date")
        return 0
    if args.check:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), updated.splitlines(keepends=True), "listed", "on disk"
        )
        sys.stdout.writelines(diff)
        print(f"{MODULE_CMAKE.relative_to(ROOT)} is stale: run python Utilities/update_cmake_sources.py")
        return 1
    MODULE_CMAKE.write_text(updated, encoding="utf-8")
    print(f"updated {MODULE_CMAKE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
