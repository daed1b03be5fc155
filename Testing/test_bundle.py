"""Model bundles: round trips (folder, zip), and one-line errors that name the file."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from MedTranslateLib.bundle import (
    META_NAME,
    WEIGHTS_NAME,
    BundleError,
    BundleMeta,
    ModalitySpec,
    SliceSpec,
    is_bundle,
    load_bundle,
    read_bundle_meta,
    save_bundle,
)
from MedTranslateLib.methods import build_method

TINY = {"generator": {"ngf": 8, "num_downs": 5}, "discriminator": {"ndf": 8}}


def make_method():
    torch.manual_seed(0)
    m = build_method("pix2pix", TINY)
    # Non-trivial running statistics, so that buffers are checked too.
    m.train()
    with torch.no_grad():
        m.generator(torch.randn(2, 1, 32, 32))
    return m.eval()


def make_meta() -> BundleMeta:
    return BundleMeta(source=ModalitySpec("ct", "ct_abdomen"),
                      target=ModalitySpec("cta_arterial", {"kind": "ct_window", "level": 300, "width": 600}),
                      slice=SliceSpec(size=32, axis=0), training={"steps": 3, "cases": ["case_000"]},
                      metrics={"val": {"mae": 12.5}})


@pytest.fixture(scope="module")
def method():
    return make_method()


@pytest.fixture
def folder_bundle(tmp_path, method):
    return save_bundle(method, make_meta(), tmp_path / "model")


def one_line_error(path, match: str) -> str:
    with pytest.raises(BundleError) as exc:
        load_bundle(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert re.search(match, msg), msg
    return msg


@pytest.mark.parametrize("name", ["model", "model.zip"])
def test_round_trip_identical_outputs(tmp_path, method, name):
    out = save_bundle(method, make_meta(), tmp_path / name)
    assert out == tmp_path / name
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left behind
    bundle = load_bundle(out)
    assert not bundle.method.training
    assert bundle.path == out
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(bundle.method.translate(x).image, method.translate(x).image)
    for (k, a), (k2, b) in zip(bundle.method.state_dict().items(), method.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    meta = bundle.meta
    assert meta.method == "pix2pix" and meta.format_version == 1
    assert meta.architecture["generator"]["ngf"] == 8
    assert meta.source == ModalitySpec("ct", "ct_abdomen")
    assert meta.target.preset == {"kind": "ct_window", "level": 300, "width": 600}
    assert meta.slice == SliceSpec(32, 0) and meta.metrics == {"val": {"mae": 12.5}}
    assert read_bundle_meta(out) == meta and is_bundle(out)


def test_folder_contents_and_no_training_parts(folder_bundle):
    assert sorted(p.name for p in folder_bundle.iterdir()) == sorted([WEIGHTS_NAME, META_NAME])
    tensors = load_file(folder_bundle / WEIGHTS_NAME)
    assert tensors and all(k.startswith("generator.") for k in tensors)
    data = yaml.safe_load((folder_bundle / META_NAME).read_text())
    assert list(data)[:2] == ["method", "architecture"] and data["library_version"]


def test_zip_with_top_folder_is_accepted(tmp_path, folder_bundle):
    z = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(folder_bundle / META_NAME, f"mymodel/{META_NAME}")
        zf.write(folder_bundle / WEIGHTS_NAME, f"mymodel/{WEIGHTS_NAME}")
        zf.writestr("__MACOSX/mymodel/._medtranslate.yaml", b"junk")
    assert load_bundle(z).meta.method == "pix2pix"


def test_save_replaces_bundle_but_not_other_folders(tmp_path, method):
    target = save_bundle(method, make_meta(), tmp_path / "m")
    save_bundle(method, BundleMeta(training={"steps": 9}), target)
    assert read_bundle_meta(target).training == {"steps": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    with pytest.raises(BundleError, match=r"notes: exists and is not a MedTranslate bundle"):
        save_bundle(method, make_meta(), other)
    assert (other / "important.txt").read_text() == "keep me"
    with pytest.raises(BundleError, match=r"metadata says method 'cyclegan'"):
        save_bundle(method, BundleMeta(method="cyclegan"), tmp_path / "x")


def test_not_found_and_not_a_bundle(tmp_path):
    one_line_error(tmp_path / "nothing", r"nothing: no such bundle")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", rf"empty: not a bundle: {META_NAME} is missing")
    (tmp_path / "file.txt").write_text("hello")
    one_line_error(tmp_path / "file.txt", r"file\.txt: not a zip file")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "x")
    one_line_error(tmp_path / "other.zip", rf"other\.zip: not a bundle: no {META_NAME}")


def test_missing_weights(folder_bundle):
    (folder_bundle / WEIGHTS_NAME).unlink()
    one_line_error(folder_bundle, rf"model: not a bundle: {WEIGHTS_NAME} is missing")


def test_invalid_yaml(folder_bundle):
    (folder_bundle / META_NAME).write_text("method: [pix2pix\nformat_version: 1\n")
    one_line_error(folder_bundle, rf"{META_NAME}: invalid YAML \(line \d+")


def edit_meta(folder: Path, **changes) -> None:
    path = folder / META_NAME
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data))


def test_unknown_method(folder_bundle):
    edit_meta(folder_bundle, method="magic")
    one_line_error(folder_bundle, rf"{META_NAME}: unknown method 'magic' \(this MedTranslate knows: .*pix2pix")


def test_newer_format(folder_bundle):
    edit_meta(folder_bundle, format_version=2, brand_new_key=1)
    one_line_error(folder_bundle, r"made by a newer MedTranslate \(format 2 > 1\); upgrade")


def test_unknown_metadata_and_architecture_keys(folder_bundle):
    edit_meta(folder_bundle, architecture__generator__ngff=8)
    one_line_error(folder_bundle, rf"unknown key 'architecture\.generator\.ngff' in .*{META_NAME}")
    edit_meta(folder_bundle, surprise=1)
    one_line_error(folder_bundle, rf"unknown key 'surprise' in .*{META_NAME}")


def test_shape_mismatch(folder_bundle):
    edit_meta(folder_bundle, architecture__generator__ngf=16)
    msg = one_line_error(folder_bundle, rf"{WEIGHTS_NAME}: weights do not match the pix2pix architecture")
    assert re.search(r"\d+ shape mismatches \(file vs model: generator\.decoder\.0\.conv\.weight "
                     r"\(16, 1, 4, 4\) vs \(32, 1, 4, 4\)", msg), msg
    assert "..." in msg  # long lists are cut


def test_missing_and_unexpected_tensors(folder_bundle):
    weights = folder_bundle / WEIGHTS_NAME
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["discriminator.extra.weight"] = torch.zeros(3)
    save_file(tensors, weights)
    msg = one_line_error(folder_bundle, r"1 missing tensor \(")
    assert dropped in msg and "1 unexpected tensor (discriminator.extra.weight)" in msg


def test_missing_tensors_from_architecture_change(folder_bundle):
    edit_meta(folder_bundle, architecture__generator__num_downs=6)
    one_line_error(folder_bundle, r"\d+ missing tensors \(generator\.")


def test_corrupt_weights(folder_bundle):
    (folder_bundle / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    one_line_error(folder_bundle, rf"{WEIGHTS_NAME}: not a valid safetensors file")


def test_zip_with_unsafe_member_is_refused(tmp_path, folder_bundle):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(folder_bundle / META_NAME, META_NAME)
        zf.write(folder_bundle / WEIGHTS_NAME, WEIGHTS_NAME)
        zf.writestr("../evil", "x")
    one_line_error(z, r"evil\.zip: unsafe member path '\.\./evil'")
    z2 = tmp_path / "abs.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/etc/evil"), "x")
    one_line_error(z2, r"unsafe member path '/etc/evil'")
    assert not (tmp_path.parent / "evil").exists()


def test_zip_with_two_bundles_is_refused(tmp_path, folder_bundle):
    z = tmp_path / "two.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for top in ("a", "b"):
            zf.write(folder_bundle / META_NAME, f"{top}/{META_NAME}")
            zf.write(folder_bundle / WEIGHTS_NAME, f"{top}/{WEIGHTS_NAME}")
    one_line_error(z, r"two\.zip: holds several bundles")


@pytest.mark.parametrize("module", ["bundle", "model_store"])
def test_never_unpickles(module):
    """No pickle import, no torch.load / numpy.load / yaml.load (unsafe loaders) anywhere."""
    import ast
    import importlib

    tree = ast.parse(Path(importlib.import_module(f"MedTranslateLib.{module}").__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {(node.module or "").split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}
    calls = {f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    assert not calls & {"torch.load", "np.load", "numpy.load", "yaml.load", "pickle.load", "pickle.loads"}
