"""User model folder and `medtranslate models list|show|import` (tmp MEDTRANSLATE_HOME)."""

from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from MedTranslateLib import app, model_store
from MedTranslateLib.bundle import (
    META_NAME,
    WEIGHTS_NAME,
    BundleError,
    BundleMeta,
    ModalitySpec,
    load_bundle,
    save_bundle,
)
from MedTranslateLib.cli import main
from MedTranslateLib.methods import build_method

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(model_store, "bundled_models_dir", lambda: bundled)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 3}}).eval()


def meta():
    return BundleMeta(source=ModalitySpec("ct", "ct_abdomen"), target=ModalitySpec("cta_arterial", "ct_angio"),
                      metrics={"val": {"mae": 3.0}})


@pytest.fixture
def src_bundle(tmp_path, method):
    return save_bundle(method, meta(), tmp_path / "src" / "liver_cta")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_dir_follows_env(home):
    assert model_store.models_dir() == home / "models"


def test_import_copies_and_lists(home, src_bundle):
    info = model_store.import_model(src_bundle)
    assert info.name == "liver_cta" and info.path == home / "models" / "liver_cta"
    assert sorted(p.name for p in info.path.iterdir()) == sorted([META_NAME, WEIGHTS_NAME])
    assert (info.path / WEIGHTS_NAME).read_bytes() == (src_bundle / WEIGHTS_NAME).read_bytes()
    [listed] = model_store.list_models()
    assert (listed.name, listed.method, listed.source, listed.target, listed.origin) == (
        "liver_cta", "pix2pix", "ct", "cta_arterial", "user")
    assert model_store.find_model("liver_cta") == info.path
    assert model_store.find_model(str(src_bundle)) == src_bundle


def test_import_zip_with_name_and_overwrite(tmp_path, method, home):
    z = save_bundle(method, meta(), tmp_path / "m.zip")
    info = model_store.import_model(z, "demo")
    assert info.path == home / "models" / "demo" and info.path.is_dir()
    with pytest.raises(BundleError, match=r"a model named 'demo' already exists"):
        model_store.import_model(z, "demo")
    model_store.import_model(z, "demo", overwrite=True)
    assert [m.name for m in model_store.list_models()] == ["demo"]
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(BundleError, match=r"invalid model name '\.\./x'"):
        model_store.import_model(z, "../x")


def test_broken_import_copies_nothing(tmp_path, home, src_bundle):
    (src_bundle / META_NAME).write_text((src_bundle / META_NAME).read_text().replace("ngf: 4", "ngf: 5"))
    with pytest.raises(BundleError, match="shape mismatch"):
        model_store.import_model(src_bundle)
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())


def test_bundled_models_listed_and_shadowed(tmp_path, method, home):
    bundled = model_store.bundled_models_dir()
    save_bundle(method, meta(), bundled / "demo_small")
    save_bundle(method, meta(), bundled / "shared.zip")
    (bundled / "README.txt").write_text("not a model")
    model_store.import_model(bundled / "shared.zip", overwrite=True)  # shadowing a bundled model is forced
    infos = {m.name: m.origin for m in model_store.list_models()}
    assert infos == {"shared": "user", "demo_small": "bundled"}
    assert model_store.find_model("demo_small") == bundled / "demo_small"


def test_find_model_by_name_reads_no_bundle(tmp_path, method, home, monkeypatch):
    """Resolving a name lists the folders only (issue 14: parsing every bundle's metadata cost
    0.3 s of each translate); the user's model still shadows a bundled one of the same name."""
    bundled = model_store.bundled_models_dir()
    save_bundle(method, meta(), bundled / "shared")
    save_bundle(method, meta(), bundled / "other")
    model_store.import_model(bundled / "shared", overwrite=True)

    read = []
    monkeypatch.setattr(model_store, "read_bundle_meta", read.append)
    assert model_store.find_model("shared") == home / "models" / "shared"
    assert model_store.find_model("other") == bundled / "other"
    assert read == []


def test_unknown_model_name():
    with pytest.raises(BundleError, match=r"no model named 'nope' \(known models: none\)"):
        model_store.find_model("nope")


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_list_show_import(capsys, src_bundle, home):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "no models in" in out
    code, out, err = run(capsys, "models", "import", str(src_bundle), "--name", "cta1")
    assert code == 0 and "imported cta1 (pix2pix: ct -> cta_arterial)" in out and not err
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "METHOD", "TRANSLATION", "ORIGIN"]
    assert row.split()[:6] == ["cta1", "pix2pix", "ct", "->", "cta_arterial", "user"]
    code, out, _ = run(capsys, "models", "show", "cta1")
    assert code == 0
    assert str(home / "models" / "cta1") in out
    assert "method: pix2pix" in out and "modality: cta_arterial" in out and "mae: 3.0" in out


def test_cli_list_marks_broken_entries(capsys, home):
    broken = home / "models" / "bad"
    broken.mkdir(parents=True)
    (broken / META_NAME).write_text("format_version: 7\nmethod: pix2pix\n")
    (broken / WEIGHTS_NAME).write_bytes(b"")
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "bad" in out and "BROKEN:" in out and "newer MedTranslate" in out


@pytest.mark.parametrize("argv, message", [
    (["models", "show", "nope"], "no model named 'nope'"),
    (["models", "import", "{tmp}/missing"], "missing: no such bundle"),
    (["models", "import", "{tmp}/src/liver_cta"], "unknown method 'magic'"),
])
def test_cli_errors_are_one_line(capsys, tmp_path, src_bundle, argv, message):
    text = (src_bundle / META_NAME).read_text().replace("method: pix2pix", "method: magic")
    (src_bundle / META_NAME).write_text(text)
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert err.startswith("medtranslate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---- one broken model breaks no other (issue 13) ----------------------------------------------------

def damage_zip_member(path: Path, member: str, *, flags: int | None = None, flip: bool = False) -> None:
    """Set ``member``'s flag bits (central directory and local header) or flip its first data bytes."""
    info = zipfile.ZipFile(path).getinfo(member)
    data = bytearray(path.read_bytes())
    if flags is not None:
        central = data.find(b"PK\x01\x02")
        while data[central + 46: central + 46 + len(member)] != member.encode():
            central = data.find(b"PK\x01\x02", central + 4)
        struct.pack_into("<H", data, central + 8, flags)
        struct.pack_into("<H", data, info.header_offset + 6, flags)
    if flip:
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
        data[start: start + 4] = bytes(b ^ 0xFF for b in data[start: start + 4])
    path.write_bytes(bytes(data))


def folder_with_meta(ctx, name: str, meta_text: str | bytes) -> str:
    folder = ctx.models / name
    folder.mkdir()
    data = meta_text.encode() if isinstance(meta_text, str) else meta_text
    (folder / META_NAME).write_bytes(data)
    shutil.copy(ctx.good / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    return name


def edited_meta(ctx, old: str, new: str) -> str:
    text = (ctx.good / META_NAME).read_text()
    assert old in text
    return text.replace(old, new)


LAUGHS = "training:\n" + "".join(["  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"] + [
    f"  {c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


def zip_entry(ctx, name: str, damage) -> str:
    z = save_bundle(ctx.method, meta(), ctx.models / f"{name}.zip")
    damage(z)
    return name


def locked_folder(ctx) -> str:
    """A model folder the user may not read: chmod 000, or, as root (who reads anything), every
    access inside it refused the way the system would."""
    folder = ctx.models / "locked"
    shutil.copytree(ctx.good, folder)
    if os.geteuid() != 0:
        folder.chmod(0)
        ctx.request.addfinalizer(lambda: folder.chmod(0o755))
        return "locked"
    real_stat, real_open = os.stat, builtins.open

    def inside(path) -> bool:
        try:
            return Path(os.fspath(path)).is_relative_to(folder) and Path(os.fspath(path)) != folder
        except TypeError:  # a file descriptor
            return False

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def stat(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_stat(path, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_open(path, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "stat", stat)
    ctx.monkeypatch.setattr(builtins, "open", open_)
    return "locked"


def symlink_loop(ctx) -> str:
    (ctx.models / "loop").symlink_to("loop")
    return "loop"


#: kind -> (make the broken entry in ctx.models, return its name; its one-line error)
BROKEN = {
    "garbage_yaml": (lambda ctx: folder_with_meta(ctx, "garbage", b"\x00\xff\xfe\x9f garbage"),
                     rf"garbage/{META_NAME}: not UTF-8 text"),
    "invalid_yaml": (lambda ctx: folder_with_meta(ctx, "invalid", "method: [pix2pix\nformat_version: 1\n"),
                     rf"invalid/{META_NAME}: invalid YAML \(line"),
    "deep_yaml": (lambda ctx: folder_with_meta(ctx, "deep", "a: " + "[" * 3000 + "]" * 3000 + "\n"),
                  rf"deep/{META_NAME}: invalid YAML \(line 1, column \d+: nested deeper than 100 levels\)"),
    "billion_laughs": (lambda ctx: folder_with_meta(ctx, "laughs", edited_meta(ctx, "training: {}\n", LAUGHS)),
                       rf"laughs/{META_NAME}: invalid YAML \(.*alias \*a: anchors and aliases are not allowed"),
    "wrong_types": (lambda ctx: folder_with_meta(ctx, "types", edited_meta(ctx, "training: {}", "training: {config: [1]}")),
                    rf"'training\.config' in .*types/{META_NAME}: expected a mapping, got list"),
    "wrong_method_type": (lambda ctx: folder_with_meta(ctx, "method", edited_meta(ctx, "method: pix2pix",
                                                                                   "method: [pix2pix]")),
                          rf"'method' in .*method/{META_NAME}: expected str, got a list"),
    "absurd_slice": (lambda ctx: folder_with_meta(ctx, "slice", edited_meta(ctx, "size: 128", "size: 200000")),
                     rf"'slice' in .*slice/{META_NAME}: SliceSpec: size must be an int from 1 to 4096, got 200000"),
    "huge_yaml": (lambda ctx: folder_with_meta(ctx, "huge", (ctx.good / META_NAME).read_text() + "#" * (2 << 20)),
                  rf"huge/{META_NAME}: too large \(2\.0 MiB, the limit is 1\.0 MiB\); not reading it"),
    "not_a_zip": (lambda ctx: (ctx.models / "notzip.zip").write_text("hello") and "notzip",
                  r"notzip\.zip: not a zip file"),
    "zip_bad_member": (lambda ctx: zip_entry(ctx, "badmember", lambda z: damage_zip_member(z, META_NAME, flip=True)),
                       r"badmember\.zip: damaged zip \(Error -3 while decompressing data"),
    "zip_encrypted": (lambda ctx: zip_entry(ctx, "encrypted", lambda z: damage_zip_member(z, META_NAME, flags=1)),
                      rf"encrypted\.zip:{META_NAME}: encrypted; bundles must be plain zips"),
    "no_permission": (locked_folder, r"locked.*: cannot read \(Permission denied\)"),
    "symlink_loop": (symlink_loop, r"loop: cannot read \(Too many levels of symbolic links\)"),
    "dangling_link": (lambda ctx: (ctx.models / "gone").symlink_to(ctx.models / "nowhere") or "gone",
                      r"gone: a link to .*nowhere, which does not exist"),
}


@pytest.fixture
def ctx(home, method, monkeypatch, request):
    models = home / "models"
    good = save_bundle(method, meta(), models / "good")
    save_bundle(method, meta(), model_store.bundled_models_dir() / "demo")
    return types.SimpleNamespace(models=models, good=good, method=method, monkeypatch=monkeypatch, request=request)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_one_broken_model_breaks_no_other(ctx, kind):
    make, match = BROKEN[kind]
    name = make(ctx)
    infos = {m.name: m for m in model_store.list_models()}
    assert {"good", "demo", name} <= set(infos)
    assert infos["good"].error is None and infos["demo"].error is None and infos["good"].method == "pix2pix"
    error = infos[name].error
    assert error and "\n" not in error and re.search(match, error), error
    assert infos[name].method == "?"
    # translate --model good / the Slicer model list
    assert model_store.find_model("good") == ctx.good
    assert model_store.find_model("demo") == model_store.bundled_models_dir() / "demo"
    choices = {c.name: c for c in app.model_choices()}
    assert choices["good"].error is None and choices["demo"].error is None and choices[name].error == error
    # the broken one itself: one line, wherever it is used
    with pytest.raises(BundleError) as exc:
        load_bundle(model_store.find_model(name))
    assert "\n" not in str(exc.value) and re.search(match.split(": ", 1)[-1], str(exc.value)), exc.value


def test_unlistable_model_folder_keeps_the_bundled_models(home, method, monkeypatch):
    save_bundle(method, meta(), model_store.bundled_models_dir() / "demo")
    (home / "models").mkdir(parents=True)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == home / "models":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    infos = model_store.list_models()
    assert [(m.name, m.error) for m in infos] == [
        (str(home / "models"), f"{home / 'models'}: cannot list the model folder (Permission denied)"), ("demo", None)]
    assert model_store.find_model("demo") == model_store.bundled_models_dir() / "demo"


def cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("medtranslate")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "MedTranslateLib.cli"]
    env = {**os.environ, "MEDTRANSLATE_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("MEDTRANSLATE_DEBUG", None)
    return subprocess.run([*command, *argv], capture_output=True, text=True, env=env, cwd=home, timeout=120)


def test_cli_stays_up_with_broken_models(ctx, home):
    """`medtranslate models list` in a real process, with every kind of broken entry at once: exit
    0, one row each; `models show` of a broken one: exit 2 and one line; of the good one: exit 0."""
    names = {}
    for kind, (make, match) in BROKEN.items():
        if kind == "no_permission" and os.geteuid() == 0:
            continue  # simulated in-process only: root reads anything
        names[make(ctx)] = match
    listed = cli(home, "models", "list")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "BROKEN" not in rows["good"] and rows["good"].split()[1] == "pix2pix"
    bundled = [p.name for p in REPO.joinpath("Resources", "Models").iterdir() if (p / META_NAME).is_file()]
    assert set(names) | {"good"} | set(bundled) == set(rows)
    for name, match in names.items():
        assert re.search(r"\?\s+\? -> \?\s+user\s+BROKEN: .*" + match, rows[name]), rows[name]
    for name, match in names.items():
        shown = cli(home, "models", "show", name)
        assert shown.returncode == 2 and shown.stdout == "", (name, shown.stdout)
        assert shown.stderr.startswith("medtranslate: error: ") and shown.stderr.count("\n") == 1, shown.stderr
        assert "Traceback" not in shown.stderr and re.search(match.split(": ", 1)[-1], shown.stderr), shown.stderr
    shown = cli(home, "models", "show", "good")
    assert shown.returncode == 0 and "method: pix2pix" in shown.stdout
    assert app.load_model("good").meta.method == "pix2pix"  # translate --model good


# ---- importing under a bundled model's name ---------------------------------------------------------

@pytest.mark.parametrize("bundled_entry", ["demo", "demo.zip"])
def test_import_refuses_to_shadow_a_bundled_model_unless_forced(tmp_path, method, home, src_bundle, bundled_entry):
    bundled = save_bundle(method, meta(), model_store.bundled_models_dir() / bundled_entry)
    with pytest.raises(BundleError) as exc:
        model_store.import_model(src_bundle, "demo")
    assert str(exc.value) == (f"'demo' is the name of a bundled model ({bundled}) that a user model of that name "
                              f"would shadow; choose another --name, or --force to shadow it")
    assert not (home / "models").exists() or not any((home / "models").iterdir())  # nothing copied
    with pytest.raises(BundleError, match=r"'demo' is the name of a bundled model"):
        model_store.import_model(bundled)  # the default name is the bundled one's
    info = model_store.import_model(src_bundle, "demo", overwrite=True)
    assert info.origin == "user" and [(m.name, m.origin) for m in model_store.list_models()] == [("demo", "user")]
    model_store.import_model(src_bundle, "demo", overwrite=True)  # again: replaces the user's copy


def test_cli_import_under_a_bundled_name_is_one_line(capsys, method, src_bundle):
    save_bundle(method, meta(), model_store.bundled_models_dir() / "demo")
    code, out, err = run(capsys, "models", "import", str(src_bundle), "--name", "demo")
    assert code == 2 and err.count("\n") == 1 and "'demo' is the name of a bundled model" in err
    code, out, err = run(capsys, "models", "import", str(src_bundle), "--name", "demo", "--force")
    assert code == 0 and "imported demo" in out
