"""The Slicer extension's files, checked without Slicer.

CMake files are read with a small command parser (no CMake needed); the module is checked with
``ast``; the .ui with ``xml.etree``; the icon with a PNG chunk reader.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_CMAKE = ROOT / "CMakeLists.txt"
MODULE_DIR = ROOT / "MedTranslate"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
MODULE_PY = MODULE_DIR / "MedTranslate.py"
UI_FILE = ROOT / "Resources" / "UI" / "MedTranslate.ui"
ICON_FILE = ROOT / "Resources" / "Icons" / "MedTranslate.png"
FIX = "run: python Utilities/update_cmake_sources.py"


# --------------------------------------------------------------------------- CMake reading


def parse_cmake(text: str) -> list[tuple[str, list[str]]]:
    """``[(command_name_lowercase, [arguments])]`` of a CMake file.

    Handles comments, quoted arguments (returned without quotes) and nested parentheses
    (kept as tokens). Enough for the files of this repository, not a full CMake grammar.
    """
    commands: list[tuple[str, list[str]]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        match = re.compile(r"[A-Za-z_]\w*").match(text, i)
        if not match:
            i += 1
            continue
        name, j = match.group(0), match.end()
        while j < n and text[j] in " \t":
            j += 1
        if j >= n or text[j] != "(":
            i = match.end()
            continue
        args: list[str] = []
        depth, j = 1, j + 1
        while j < n and depth:
            ch = text[j]
            if ch in " \t\r\n":
                j += 1
            elif ch == "#":
                j = text.find("\n", j)
                j = n if j < 0 else j
            elif ch == '"':
                k = j + 1
                while k < n and text[k] != '"':
                    k += 2 if text[k] == "\\" else 1
                args.append(text[j + 1 : k])
                j = k + 1
            elif ch == "(":
                depth += 1
                args.append("(")
                j += 1
            elif ch == ")":
                depth -= 1
                if depth:
                    args.append(")")
                j += 1
            else:
                k = j
                while k < n and text[k] not in ' \t\r\n()"#':
                    k += 1
                args.append(text[j:k])
                j = k
        commands.append((name.lower(), args))
        i = j
    return commands


def cmake_variables(commands: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """Values of ``set(NAME ...)``, with ``${MODULE_NAME}`` expanded once it is known."""
    variables: dict[str, list[str]] = {}
    for name, args in commands:
        if name == "set" and args:
            module_name = variables.get("MODULE_NAME", [""])[0]
            variables[args[0]] = [a.replace("${MODULE_NAME}", module_name) for a in args[1:]]
    return variables


def calls(commands: list[tuple[str, list[str]]], name: str) -> list[list[str]]:
    return [args for command, args in commands if command == name.lower()]


def keyword_values(args: list[str], keyword: str, keywords: set[str]) -> list[str]:
    """Values after ``keyword`` up to the next keyword in a CMake call's arguments."""
    if keyword not in args:
        return []
    values = []
    for arg in args[args.index(keyword) + 1 :]:
        if arg in keywords:
            break
        values.append(arg)
    return values


@pytest.fixture(scope="module")
def top() -> list[tuple[str, list[str]]]:
    return parse_cmake(TOP_CMAKE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def module() -> list[tuple[str, list[str]]]:
    return parse_cmake(MODULE_CMAKE.read_text(encoding="utf-8"))


def _walk(folder: Path, suffix: str | None = None) -> set[str]:
    """Files under ``folder`` relative to the repository root (no caches, no hidden files)."""
    found = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(ROOT)
        if not path.is_file() or relative.suffix in (".pyc", ".pyo"):
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if suffix is None or path.suffix == suffix:
            found.add(relative.as_posix())
    return found


# --------------------------------------------------------------------------- top level


def test_parser_reads_quotes_comments_and_nesting():
    text = 'set(A "x # y" b) # set(B c)\nif(NOT (X AND Y))\nfoo( ${V}/z )\n'
    assert parse_cmake(text) == [
        ("set", ["A", "x # y", "b"]),
        ("if", ["NOT", "(", "X", "AND", "Y", ")"]),
        ("foo", ["${V}/z"]),
    ]


def test_top_level_extension_metadata(top):
    variables = cmake_variables(top)
    for field in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert field in variables, f"{field} is not set in CMakeLists.txt"
        assert any(v.strip() for v in variables[field]), f"{field} is empty"
    for url_field in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in " ".join(variables[url_field]).split():
            assert url.startswith("https://"), f"{url_field}: {url}"
    assert variables["EXTENSION_ICONURL"][0].endswith(".png")
    depends = {d for value in variables["EXTENSION_DEPENDS"] for d in re.split(r"[;\s]+", value) if d}
    assert "PyTorch" in depends


def test_top_level_follows_extension_template(top):
    names = [name for name, _ in top]
    assert calls(top, "cmake_minimum_required"), "cmake_minimum_required missing"
    assert names[0] == "cmake_minimum_required"
    assert calls(top, "project") == [["MedTranslate"]]
    assert ["Slicer", "REQUIRED"] in calls(top, "find_package")
    includes = [args[0] for args in calls(top, "include")]
    assert "${Slicer_USE_FILE}" in includes
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in includes
    assert "${Slicer_EXTENSION_CPACK}" in includes
    assert ["MedTranslate"] in calls(top, "add_subdirectory")
    # Slicer first, then the modules, then config + packaging.
    order = [(name, args[0] if args else "") for name, args in top]
    assert (
        order.index(("find_package", "Slicer"))
        < order.index(("add_subdirectory", "MedTranslate"))
        < order.index(("include", "${Slicer_EXTENSION_GENERATE_CONFIG}"))
        < order.index(("include", "${Slicer_EXTENSION_CPACK}"))
    )


# --------------------------------------------------------------------------- module CMake


def test_module_lists_every_library_script(module):
    listed = set(cmake_variables(module).get("MODULE_LIB_PYTHON_SCRIPTS", []))
    on_disk = _walk(ROOT / "MedTranslateLib", ".py")
    assert on_disk, "MedTranslateLib has no .py files?"
    missing = sorted(on_disk - listed)
    assert not missing, f"MedTranslate/CMakeLists.txt does not list {missing}; {FIX}"


def test_module_lists_every_resource(module):
    listed = set(cmake_variables(module).get("MODULE_PYTHON_RESOURCES", []))
    missing = sorted(_walk(ROOT / "Resources") - listed)
    assert not missing, f"MedTranslate/CMakeLists.txt does not list {missing}; {FIX}"
    assert "Resources/Icons/MedTranslate.png" in listed
    assert "Resources/UI/MedTranslate.ui" in listed


def test_every_listed_file_exists(module):
    variables = cmake_variables(module)
    assert variables["MODULE_NAME"] == ["MedTranslate"]
    assert "MedTranslate.py" in variables["MODULE_PYTHON_SCRIPTS"]
    for script in variables["MODULE_PYTHON_SCRIPTS"]:
        assert (MODULE_DIR / script).is_file(), f"{script} (relative to MedTranslate/) does not exist"
    for name in ("MODULE_LIB_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in variables[name]:
            # Relative, inside the tree: the path as listed becomes the path under qt-scripted-modules.
            assert not entry.startswith("/") and ".." not in Path(entry).parts, f"{name}: {entry}"
            assert (ROOT / entry).is_file(), f"{name} lists {entry}, which does not exist; {FIX}"
    lib = variables["MODULE_LIB_PYTHON_SCRIPTS"]
    assert all(entry.startswith("MedTranslateLib/") for entry in lib)
    assert all(entry.startswith("Resources/") for entry in variables["MODULE_PYTHON_RESOURCES"])


def test_module_build_macros(module):
    keywords = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
    (build,) = calls(module, "slicerMacroBuildScriptedModule")
    assert keyword_values(build, "NAME", keywords) == ["${MODULE_NAME}"]
    assert keyword_values(build, "SCRIPTS", keywords) == ["${MODULE_PYTHON_SCRIPTS}"]
    assert "WITH_GENERIC_TESTS" in build

    # Library and top-level resources: copied into the same qt-scripted-modules folder, with the
    # repository root as source so that the listed paths are the destination paths.
    ctk_keywords = {
        "TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
        "NO_INSTALL_SUBDIR", "GLOBAL_TARGET",
    }  # fmt: skip
    (lib,) = calls(module, "ctkMacroCompilePythonScript")
    assert keyword_values(lib, "SCRIPTS", ctk_keywords) == ["${MODULE_LIB_PYTHON_SCRIPTS}"]
    assert keyword_values(lib, "RESOURCES", ctk_keywords) == ["${MODULE_PYTHON_RESOURCES}"]
    assert keyword_values(lib, "SOURCE_DIR", ctk_keywords) == ["${MedTranslate_ROOT_DIR}"]
    assert keyword_values(lib, "DESTINATION_DIR", ctk_keywords) == [
        "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
    ]
    assert keyword_values(lib, "INSTALL_DIR", ctk_keywords) == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert "NO_INSTALL_SUBDIR" in lib
    (root_dir,) = [args for args in calls(module, "get_filename_component") if args[0] == "MedTranslate_ROOT_DIR"]
    assert root_dir[1:] == ["${CMAKE_CURRENT_SOURCE_DIR}/..", "ABSOLUTE"]


def test_module_self_test_registration(module):
    start = module.index(("if", ["BUILD_TESTING"]))
    unittest = ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"])
    assert [call for call in module if call[0] == "slicer_add_python_unittest"] == [unittest]
    # the self-test installs PyTorch and MONAI (network): a ctest only under its option, OFF by default
    (option,) = [args for name, args in module[start:] if name == "option"]
    assert option[0] == "MedTranslate_SELF_TEST_INSTALLS_DEPENDENCIES" and option[-1] == "OFF"
    guard = module.index(("if", [option[0]]), start)
    assert module[guard + 1 : guard + 3] == [unittest, ("endif", [])]
    assert ("add_subdirectory", ["Testing"]) in module[start:]
    testing = parse_cmake((MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert ("add_subdirectory", ["Python"]) in testing
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_screenshots_and_icon_urls_name_files_of_this_repository(top):
    variables = cmake_variables(top)
    prefix = "https://raw.githubusercontent.com/medtranslate/SlicerMedTranslate/main/"
    for field in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in " ".join(variables[field]).split():
            assert url.startswith(prefix), f"{field}: {url}"
            assert (ROOT / url[len(prefix):]).is_file(), f"{field}: {url} names no file of the repository"


def test_supported_slicer_versions_are_stated_everywhere(top, module_source):
    """Slicer >= 5.10 (Python 3.12): the extension's description, the module's help text, the README
    and the module's own check agree; the library's Python floor is the module's."""
    tree = ast.parse(module_source)
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id.startswith("MINIMUM_")}
    assert constants == {"MINIMUM_SLICER_VERSION": (5, 10), "MINIMUM_PYTHON_VERSION": (3, 11)}
    assert "Requires 3D Slicer 5.10 or newer" in " ".join(cmake_variables(top)["EXTENSION_DESCRIPTION"])
    assert "Requires 3D Slicer 5.10 or newer" in module_source  # help text
    assert "3D Slicer 5.10 or newer" in (ROOT / "README.md").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'requires-python = ">=3.11"' in pyproject


class _Py310Constructs(ast.NodeVisitor):
    """What Python 3.9 cannot run although ``ast.parse(feature_version=(3, 9))`` accepts it."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def _annotation(self, node, where):
        if node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node)):
            self.found.append(f"line {node.lineno}: X | Y in {where} (evaluated: needs 3.10)")

    def visit_AnnAssign(self, node):  # noqa: N802 (ast.NodeVisitor API)
        self._annotation(node.annotation, "an annotation")
        self.generic_visit(node)

    def visit_FunctionDef(self, node):  # noqa: N802
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]:
            if arg is not None:
                self._annotation(arg.annotation, f"the signature of {node.name}")
        self._annotation(node.returns, f"the return type of {node.name}")
        self.generic_visit(node)

    def visit_Call(self, node):  # noqa: N802
        name = ast.unparse(node.func)
        if name == "zip" and any(k.arg == "strict" for k in node.keywords):
            self.found.append(f"line {node.lineno}: zip(strict=...) needs 3.10")
        if name.endswith("format_exception") and len(node.args) == 1:
            self.found.append(f"line {node.lineno}: one-argument format_exception needs 3.10")
        if name in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
            self.found.append(f"line {node.lineno}: {name}(x, A | B) needs 3.10")
        self.generic_visit(node)

    def visit_ImportFrom(self, node):  # noqa: N802
        if node.module == "__future__" and any(a.name == "annotations" for a in node.names):
            self.found.append("from __future__ import annotations hides 3.10 annotations from this check")

    def visit_Import(self, node):  # noqa: N802
        for alias in node.names:
            if alias.name.split(".")[0] in ("tomllib",):
                self.found.append(f"line {node.lineno}: import {alias.name} needs 3.11")


def test_module_loads_under_python_39_to_refuse_old_slicer(module_source):
    """Slicer 5.6 and 5.8 embed Python 3.9: MedTranslate.py must load there to say, in one line,
    that this Slicer is too old (a SyntaxError or TypeError at import would be all the user sees)."""
    ast.parse(module_source, feature_version=(3, 9))
    visitor = _Py310Constructs()
    visitor.visit(ast.parse(module_source))
    assert visitor.found == []
    # the check itself catches what it is for
    bad = ("def f(x: int | None) -> None:\n    zip(a, b, strict=True)\n"
           "    traceback.format_exception(e)\n    isinstance(x, int | str)\nimport tomllib\n")
    probe = _Py310Constructs()
    probe.visit(ast.parse(bad))
    assert len(probe.found) == 5, probe.found


def test_library_parses_at_its_python_floor():
    for path in sorted((ROOT / "MedTranslateLib").rglob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 11))


def test_update_script_follows_the_same_rule():
    spec = importlib.util.spec_from_file_location("update_cmake_sources", ROOT / "Utilities" / "update_cmake_sources.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.library_scripts()) == _walk(ROOT / "MedTranslateLib", ".py")
    assert set(script.resource_files()) == _walk(ROOT / "Resources")
    text = "x\n# BEGIN GENERATED: L\nset(L\n  old\n  )\n# END GENERATED: L\ny\n"
    assert script.render(text, {"L": ["a/b.py", "c.py"]}) == (
        "x\n# BEGIN GENERATED: L\nset(L\n  a/b.py\n  c.py\n  )\n# END GENERATED: L\ny\n"
    )


# --------------------------------------------------------------------------- module code and .ui


@pytest.fixture(scope="module")
def module_source() -> str:
    return MODULE_PY.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def test_module_compiles(module_source):
    compile(module_source, str(MODULE_PY), "exec")


def test_module_classes_follow_template(module_source):
    tree = ast.parse(module_source)
    bases = {
        node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)
    }
    assert bases["MedTranslate"] == ["ScriptedLoadableModule"]
    assert bases["MedTranslateWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["MedTranslateLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["MedTranslateTest"] == ["ScriptedLoadableModuleTest"]
    assert 'loadUI(self.resourcePath("UI/MedTranslate.ui"))' in module_source
    assert "NOT for diagnosis" in module_source


class _ImportTimeImports(ast.NodeVisitor):
    """Modules imported when the file is loaded (function bodies run later, so they are skipped)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_FunctionDef(self, node):  # noqa: N802 (ast.NodeVisitor API)
        pass

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node):  # noqa: N802
        self.names.update(alias.name.split(".")[0] for alias in node.names)

    def visit_ImportFrom(self, node):  # noqa: N802
        if node.module and not node.level:
            self.names.add(node.module.split(".")[0])


def test_module_has_no_heavy_imports_at_import_time(module_source):
    visitor = _ImportTimeImports()
    visitor.visit(ast.parse(module_source))
    heavy = {"torch", "monai", "lightning", "pytorch_lightning", "safetensors", "tensorboard", "MedTranslateLib"}
    assert not visitor.names & heavy, f"imported when Slicer loads the module: {visitor.names & heavy}"


def _widget_names(root: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_ui_is_a_module_panel(ui_root):
    assert ui_root.tag == "ui"
    assert ui_root.findtext("class") == "MedTranslate"
    top_widget = ui_root.find("widget")
    assert top_widget is not None and top_widget.get("class") == "qMRMLWidget"
    widgets = _widget_names(ui_root)
    assert widgets.get("inputsCollapsibleButton") == "ctkCollapsibleButton"
    assert widgets.get("sourceVolumeSelector") == "qMRMLNodeComboBox"
    assert widgets.get("applyButton") == "QPushButton"
    inputs = next(w for w in ui_root.iter("widget") if w.get("name") == "inputsCollapsibleButton")
    assert inputs.findtext("property[@name='text']/string") == "Inputs"
    # Every non-Qt widget class is declared; every connection names existing widgets.
    declared = {c.findtext("class") for c in ui_root.iter("customwidget")}
    assert {cls for cls in widgets.values() if not cls.startswith("Q")} <= declared
    for connection in ui_root.iter("connection"):
        assert connection.findtext("sender") in widgets
        assert connection.findtext("receiver") in widgets
    # MRML widgets get the scene from the panel.
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert {name for name, cls in widgets.items() if cls == "qMRMLNodeComboBox"} <= receivers


def test_ui_has_every_widget_the_module_uses(module_source, ui_root):
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", module_source))
    assert "applyButton" in used
    missing = sorted(used - set(_widget_names(ui_root)))
    assert not missing, f"MedTranslate.py uses self.ui.{missing}, not in {UI_FILE.relative_to(ROOT)}"


def test_ui_parameter_names_are_parameter_node_fields(module_source, ui_root):
    tree = ast.parse(module_source)
    (wrapper,) = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    fields = {stmt.target.id for stmt in wrapper.body if isinstance(stmt, ast.AnnAssign)}
    bound = {p.findtext("string") for p in ui_root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound, "no widget is bound to the parameter node"
    assert bound <= fields, f"SlicerParameterName without a parameter node field: {bound - fields}"



def _parameter_fields(module_source: str) -> dict[str, ast.expr]:
    """Field name -> annotation of the ``@parameterNodeWrapper`` class."""
    tree = ast.parse(module_source)
    (wrapper,) = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    return {stmt.target.id: stmt.annotation for stmt in wrapper.body if isinstance(stmt, ast.AnnAssign)}


def _annotation_kind(annotation: ast.expr) -> tuple[str, tuple]:
    """("nodes", node classes) | ("bool"|"int"|"float"|"str", WithinRange args or ())."""
    text = ast.unparse(annotation)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        base, *extra = annotation.slice.elts
        ranges = [tuple(ast.literal_eval(a) for a in e.args) for e in extra
                  if isinstance(e, ast.Call) and ast.unparse(e.func) == "WithinRange"]
        return ast.unparse(base), ranges[0] if ranges else ()
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Union":
        # None is how a Union says "no node" (it has no node type of its own)
        return "nodes", tuple(ast.unparse(e) for e in annotation.slice.elts if ast.unparse(e) != "None")
    if isinstance(annotation, ast.BinOp):
        return "nodes", tuple(p.strip() for p in text.split("|") if p.strip() != "None")
    if text.startswith("vtkMRML"):
        return "nodes", (text,)
    return text, ()


# Widget classes Slicer's parameterNodeWrapper connects to each parameter kind (guiConnectors.py).
_CONNECTABLE = {"nodes": {"qMRMLNodeComboBox"}, "bool": {"QCheckBox", "QPushButton"},
                "int": {"QSpinBox", "QSlider"}, "float": {"QDoubleSpinBox", "ctkSliderWidget"},
                "str": {"QLineEdit", "QTextEdit"}}


def _bound_widgets(root: ET.Element) -> dict[str, list[ET.Element]]:
    bound: dict[str, list[ET.Element]] = {}
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound.setdefault(p.findtext("string"), []).append(w)
    return bound


def test_ui_widget_names_are_unique(ui_root):
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_ui_bindings_fit_the_parameter_types(module_source, ui_root):
    """Each bound widget can represent its parameter (else connectGui fails in Slicer), a
    parameter is bound once, node selectors offer the parameter's node classes, and spin boxes
    have the parameter's range (their special value text sits at the minimum)."""
    fields = _parameter_fields(module_source)
    bound = _bound_widgets(ui_root)
    assert {"sourceVolume", "referenceVolume", "liverMask", "tumorMask", "steps", "numSamples", "roiOnly",
            "roiMargin", "seed"} <= set(bound)
    for name, widgets in bound.items():
        assert len(widgets) == 1, f"parameter {name} is bound to {len(widgets)} widgets"
        (widget,) = widgets
        kind, extra = _annotation_kind(fields[name])
        cls = widget.get("class")
        assert cls in _CONNECTABLE.get(kind, set()), f"{widget.get('name')} ({cls}) cannot show {name}: {kind}"
        if kind == "nodes":
            types = [s.text for s in widget.findall("property[@name='nodeTypes']/stringlist/string")]
            assert sorted(types) == sorted(extra), f"{widget.get('name')}: nodeTypes {types} != {extra}"
        if kind == "int" and extra:
            lo = int(widget.findtext("property[@name='minimum']/number"))
            hi = int(widget.findtext("property[@name='maximum']/number"))
            assert (lo, hi) == extra, f"{widget.get('name')}: range {(lo, hi)} != WithinRange{extra}"
    # Combo boxes whose items the module fills itself must not be bound (Slicer would need a Choice).
    assert not any(w.get("class") == "QComboBox" for ws in bound.values() for w in ws)


def test_module_uses_only_parameter_node_fields(module_source):
    fields = set(_parameter_fields(module_source))
    used = set(re.findall(r"\b(?:_parameterNode|parameterNode|pn)\.([A-Za-z_]\w*)", module_source))
    missing = sorted(used - fields - {"connectGui", "disconnectGui"})
    assert not missing, f"MedTranslate.py uses parameter(s) {missing} that the parameter node does not declare"


def test_self_test_widget_names_exist(module_source, ui_root):
    """The self-test's UI_NAMES and the widgets it drives through ``widget.ui`` are in the .ui."""
    tree = ast.parse(module_source)
    (test_class,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedTranslateTest"]
    (names,) = [ast.literal_eval(s.value) for s in test_class.body
                if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "UI_NAMES"]
    driven = set(re.findall(r"widget\.ui\.([A-Za-z_]\w*)", module_source))
    assert driven and driven <= set(names)
    missing = sorted(set(names) - set(_widget_names(ui_root)))
    assert not missing, f"MedTranslateTest.UI_NAMES lists {missing}, not in {UI_FILE.relative_to(ROOT)}"


# Stand-ins for the Slicer-only modules MedTranslate.py imports; run with ``python -S`` so that only
# the sys.path entries given here (not the editable install of the library) can provide MedTranslateLib.
_LOAD_MODULE = r"""
import importlib.util, json, sys, types

def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module

class Base:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = type(self).__name__

stub("qt", QIcon=lambda path: path)
stub("vtk", vtkCommand=types.SimpleNamespace(ModifiedEvent=33))
stub("slicer", **{name: type(name, (), {}) for name in (
    "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode")})
stub("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
stub("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls,
     WithinRange=lambda minimum, maximum: (minimum, maximum))
stub("slicer.ScriptedLoadableModule", **{name: type(name, (Base,), {}) for name in (
    "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget")})
stub("slicer.util", VTKObservationMixin=type("VTKObservationMixin", (), {}))

module_file, extra_path = sys.argv[1], sys.argv[2:]
sys.path[:0] = extra_path
spec = importlib.util.spec_from_file_location("MedTranslate", module_file)
module = importlib.util.module_from_spec(spec)
sys.modules["MedTranslate"] = module
spec.loader.exec_module(module)
parent = types.SimpleNamespace()
module.MedTranslate(parent)
import MedTranslateLib
print(json.dumps({
    "library": MedTranslateLib.__file__,
    "ui": module.moduleResourcePath("UI/MedTranslate.ui"),
    "icon": getattr(parent, "icon", None),
    "title": parent.title,
    "heavy": sorted(m for m in ("torch", "monai", "numpy", "SimpleITK") if m in sys.modules),
}))
"""


def _load_module(module_file: Path, *extra_path: Path) -> dict:
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-S", "-c", _LOAD_MODULE, str(module_file), *map(str, extra_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_module_finds_library_and_resources_in_source_checkout():
    """'Add module path' = <repository>/MedTranslate: library and Resources/ one level up."""
    found = _load_module(MODULE_PY)
    assert Path(found["library"]).resolve() == ROOT / "MedTranslateLib" / "__init__.py"
    assert Path(found["ui"]).resolve() == UI_FILE
    assert Path(found["icon"]).resolve() == ICON_FILE
    assert found["title"] == "MedTranslate"
    assert found["heavy"] == []


def test_module_finds_library_and_resources_in_built_extension(tmp_path, module):
    """The layout CMake produces: everything side by side in qt-scripted-modules (on sys.path)."""
    import shutil

    variables = cmake_variables(module)
    scripted = tmp_path / "lib" / "Slicer-X.Y" / "qt-scripted-modules"
    scripted.mkdir(parents=True)
    shutil.copy(MODULE_PY, scripted / "MedTranslate.py")
    for relative in variables["MODULE_LIB_PYTHON_SCRIPTS"] + variables["MODULE_PYTHON_RESOURCES"]:
        (scripted / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, scripted / relative)
    found = _load_module(scripted / "MedTranslate.py", scripted)
    assert Path(found["library"]) == scripted / "MedTranslateLib" / "__init__.py"
    assert Path(found["ui"]) == scripted / "Resources" / "UI" / "MedTranslate.ui"
    assert Path(found["icon"]) == scripted / "Resources" / "Icons" / "MedTranslate.png"


# --------------------------------------------------------------------------- icon


def test_icon_is_a_valid_128x128_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks: list[tuple[bytes, bytes]] = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height) == (128, 128)
    assert interlace == 0
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + (width * channels * bit_depth + 7) // 8)
