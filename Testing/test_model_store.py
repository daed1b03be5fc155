"""User model folder and `medtranslate models list|show|import` (tmp MEDTRANSLATE_HOME)."""

from __future__ import annotations

import pytest
import torch

from MedTranslateLib import model_store
from MedTranslateLib.bundle import META_NAME, WEIGHTS_NAME, BundleError, BundleMeta, ModalitySpec, save_bundle
from MedTranslateLib.cli import main
from MedTranslateLib.methods import build_method


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
    model_store.import_model(bundled / "shared.zip")
    infos = {m.name: m.origin for m in model_store.list_models()}
    assert infos == {"shared": "user", "demo_small": "bundled"}
    assert model_store.find_model("demo_small") == bundled / "demo_small"


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
