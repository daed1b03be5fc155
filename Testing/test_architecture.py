"""The shape of the library, checked from its source: layers, one home per concept.

- Imports go one way through the layers of ../shared/DESIGN.md (``LAYERS`` below, lowest first):
  a module imports only modules of its own or a lower layer, and the import graph of the
  top-level modules has no circle. Lazy imports inside functions count too.
- No list of method names outside the registry; no list of region / ROI names outside
  ``regions``; one class per name for the concepts front ends share (``SliceSpec``, ``Case``, ...);
  case discovery and the case split defined once (``cases``) and used by training, evaluation and
  the CLI.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "MedTranslateLib"

#: Layer of every top-level module / package of MedTranslateLib, lowest first (DESIGN.md).
LAYERS: list[set[str]] = [
    {"__init__", "runtime", "regions", "modality", "metrics", "maps", "config", "worker"},  # leaves
    {"io", "intensity"},
    {"cases", "phantom", "slicing"},
    {"data"},
    {"nn"},
    {"diffusion"},
    {"methods"},
    {"bundle"},
    {"model_store"},
    {"onnx_backend"},
    {"engine", "training"},
    {"app", "runner"},  # the runner: the application layer in a process of its own
    {"mrml", "evaluation"},  # front ends
    {"cli"},  # the command line also runs evaluation
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[tuple[str, int]]]:
    """top-level module -> {(imported top-level module, line)} over every file of the library."""
    out: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
    for path in sorted(LIB.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module == "MedTranslateLib":  # from . import io, phantom / from . import __version__
                    targets = [f"MedTranslateLib.{a.name}" for a in node.names]
                elif module.startswith("MedTranslateLib."):
                    targets = [module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("MedTranslateLib")]
            for target in targets:
                top = _top(target)
                if top == "__version__":
                    top = "__init__"
                if top != _top(name):
                    out[_top(name)].add((top, node.lineno))
    return out


def test_every_module_has_a_layer():
    modules = {p.stem if p.is_file() else p.name for p in LIB.iterdir()
               if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert modules - set(RANK) == set(), "add new modules to LAYERS (and to DESIGN.md's layer list)"


def test_imports_never_climb_a_layer():
    climbing = [f"{src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]}), line {line}"
                for src, targets in _imports().items() for dst, line in sorted(targets) if RANK[dst] > RANK[src]]
    assert climbing == []


def test_no_import_circle():
    graph = {src: {dst for dst, _ in targets} for src, targets in _imports().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _string_collections(exclude: tuple[str, ...] = ()) -> list[tuple[Path, int, list[str]]]:
    """(file, line, strings) of every tuple/list/set literal of strings in the library and the
    Slicer module (its self-test excluded), except under ``exclude`` folders."""
    found = []
    files = [*LIB.rglob("*.py"), ROOT / "MedTranslate" / "MedTranslate.py"]
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(e) for e in exclude):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        for node in ast.walk(tree):  # the Slicer module's self-test checks names on purpose
            if isinstance(node, ast.ClassDef) and node.name.endswith("Test"):
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                continue
            strings = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(strings) >= 2:
                found.append((path, node.lineno, strings))
    return found


def test_method_names_are_listed_only_by_the_registry():
    from MedTranslateLib.methods import available_methods

    names = set(available_methods()) | {"c2fmit", "rlbcd", "dfbk", "lbbdm", "ddpm"}
    lists = [f"{p.relative_to(ROOT)}:{line} {strings}" for p, line, strings in
             _string_collections(exclude=("MedTranslateLib/methods/",)) if len(set(strings) & names) >= 2]
    assert lists == [], "ask methods.available_methods() / the method's capabilities instead"


def test_region_names_are_listed_only_in_regions():
    # the phantom renders its own anatomy (liver, tumours, labels): it is data, not the vocabulary
    vocabulary = {"whole", "body", "liver", "tumor", "tumour", "labels", "aorta", "kidney"}
    lists = [f"{p.relative_to(ROOT)}:{line} {strings}" for p, line, strings in
             _string_collections(exclude=("MedTranslateLib/regions.py", "MedTranslateLib/phantom/"))
             if len(set(strings) & vocabulary) >= 2 and set(strings) <= vocabulary]
    assert lists == [], "use regions.DEFAULT_ROIS / metric_regions / the bundle's ROI names"


def _definitions(kind: type) -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, kind) and not node.name.startswith("_"):
                out[node.name].append(path.relative_to(ROOT).as_posix())
    return out


@pytest.mark.parametrize("name", ["SliceSpec", "Case", "ModelChoice", "TranslationOptions", "TranslationRequest",
                                  "Capabilities", "ModelCache", "UserError"])
def test_one_class_per_name(name):
    assert len(_definitions(ast.ClassDef)[name]) == 1, _definitions(ast.ClassDef)[name]


@pytest.mark.parametrize("name", ["find_cases", "find_volume_file", "split_cases", "model_split", "read_case",
                                  "resolve_device", "resolve_precision", "distributed_env", "first_line",
                                  "readable_error", "identity_baseline", "metric_regions", "modality_family"])
def test_one_definition_per_function(name):
    assert len(_definitions(ast.FunctionDef)[name]) == 1, _definitions(ast.FunctionDef)[name]


def _callers(function: str) -> set[str]:
    out = set()
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == function:
                    out.add(path.relative_to(ROOT).as_posix())
    return out


def test_the_case_split_is_made_in_one_place():
    assert _callers("split_cases") == {"MedTranslateLib/cases.py"}  # inside model_split
    assert {"MedTranslateLib/training/data.py", "MedTranslateLib/evaluation.py"} <= _callers("model_split")
    assert "MedTranslateLib/cli.py" in _callers("find_case_files")


def test_methods_and_the_engine_read_no_files():
    """A method never reads files (the training loop hands pretrained parts in); the engine takes a
    loaded bundle, never a name."""
    readers = {"load_bundle", "read_bundle_meta", "find_model", "read_volume", "open"}
    for folder in ("methods", "engine.py"):
        for path in (LIB / folder).rglob("*.py") if (LIB / folder).is_dir() else [LIB / folder]:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
            assert not (readers & (names | imported)), f"{path.relative_to(ROOT)} reads files: {readers & names}"
