"""Model bundles: round trips (folder, zip), and one-line errors that name the file."""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from MedTranslateLib.bundle import (
    MAX_META_BYTES,
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


# ---- metadata YAML: no aliases (billion laughs), bounded nesting, inert tags -------------------

LAUGHS = "".join(["  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
                 + [f"  {c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


def with_training(folder: Path, block: str) -> None:
    """Replace the ``training:`` section of the folder's metadata with the YAML text ``block``."""
    path = folder / META_NAME
    data = yaml.safe_load(path.read_text())
    del data["training"]
    path.write_text(yaml.safe_dump(data, sort_keys=False) + "training:\n" + block)


@pytest.mark.parametrize("block, match", [
    (LAUGHS, r"alias \*a: anchors and aliases are not allowed"),             # 10**9 nodes once expanded
    ("  self: &t {again: *t}\n", r"alias \*t: anchors and aliases are not allowed"),  # recursive
    ("  x: &x {k: 1}\n  merged: {<<: *x}\n", r"alias \*x"),                  # merge keys need aliases too
    ("  deep: " + "[" * 3000 + "]" * 3000 + "\n", r"nested deeper than 100 levels"),  # RecursionError before
])
def test_metadata_yaml_bombs_are_one_line(folder_bundle, block, match):
    with_training(folder_bundle, block)
    for read in (read_bundle_meta, load_bundle):
        with pytest.raises(BundleError) as exc:
            read(folder_bundle)
        msg = str(exc.value)
        assert "\n" not in msg and f"{META_NAME}: invalid YAML (line " in msg and re.search(match, msg), msg


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/object/new:subprocess.Popen [[touch, '{marker}']]",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_metadata_yaml_tags_stay_inert(folder_bundle, tmp_path, tag):
    marker = tmp_path / "pwned"
    with_training(folder_bundle, "  run: " + tag.format(marker=marker) + "\n")
    one_line_error(folder_bundle, rf"{META_NAME}: invalid YAML \(line \d+, column \d+: could not determine a "
                                  r"constructor for the tag 'tag:yaml\.org,2002:python/")
    assert not marker.exists()


# ---- caps on what is read, from the declared sizes ------------------------------------------------

def zip_of(folder: Path, out: Path, *, meta: bytes | None = None, weights: bytes | None = None,
           weights_type: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(META_NAME, meta if meta is not None else (folder / META_NAME).read_bytes(),
                    compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(WEIGHTS_NAME, weights if weights is not None else (folder / WEIGHTS_NAME).read_bytes(),
                    compress_type=weights_type)
    return out


def patch_member(path: Path, member: str, *, flags: int | None = None, method: int | None = None,
                 compress_size: int | None = None, file_size: int | None = None, flip: int | None = None) -> None:
    """Rewrite fields of ``member``'s headers (central directory, and local header for flags and
    method), or flip the bits of 4 bytes of its stored data from byte number ``flip`` on."""
    info = zipfile.ZipFile(path).getinfo(member)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    while data[central + 46: central + 46 + len(member)] != member.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    local = info.header_offset
    for value, central_at, local_at, fmt in ((flags, 8, 6, "<H"), (method, 10, 8, "<H"),
                                             (compress_size, 20, None, "<I"), (file_size, 24, None, "<I")):
        if value is not None:
            struct.pack_into(fmt, data, central + central_at, value)
            if local_at is not None:
                struct.pack_into(fmt, data, local + local_at, value)
    if flip is not None:
        name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + name_len + extra_len + flip
        data[start: start + 4] = bytes(b ^ 0xFF for b in data[start: start + 4])
    path.write_bytes(bytes(data))


def opened_members(monkeypatch) -> list[str]:
    """Names of the zip members read from now on."""
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def test_huge_metadata_is_refused_from_its_size(tmp_path, folder_bundle, monkeypatch):
    """A 4 MiB medtranslate.yaml (valid YAML: a long comment) in a folder, in a zip (deflated to a
    few KiB), and a zip member whose declared size says 4 GiB: refused before it is read."""
    text = (folder_bundle / META_NAME).read_bytes() + b"#" + b" lol" * (1 << 20) + b"\n"
    z = zip_of(folder_bundle, tmp_path / "bomb.zip", meta=text)
    assert zipfile.ZipFile(z).getinfo(META_NAME).compress_size < MAX_META_BYTES // 50
    liar = zip_of(folder_bundle, tmp_path / "liar.zip")
    patch_member(liar, META_NAME, file_size=0xFFFFFFF0)
    (folder_bundle / META_NAME).write_bytes(text)
    opened = opened_members(monkeypatch)
    one_line_error(folder_bundle, rf"model/{META_NAME}: too large \(4\.0 MiB, the limit is 1\.0 MiB\); not reading it")
    for path in (z, liar):
        for read in (read_bundle_meta, load_bundle):
            with pytest.raises(BundleError, match=rf"\.zip:{META_NAME}: too large \(4\.0 [MG]iB, the limit is 1\.0 MiB"):
                read(path)
    assert opened == []


def test_weights_over_the_cap_are_refused_from_their_size(tmp_path, folder_bundle, monkeypatch):
    z = zip_of(folder_bundle, tmp_path / "m.zip")
    monkeypatch.setattr("MedTranslateLib.bundle.MAX_WEIGHTS_BYTES", 100_000)
    opened = opened_members(monkeypatch)
    one_line_error(folder_bundle, rf"model/{WEIGHTS_NAME}: too large \(1\.0 MiB, the limit is 97\.7 KiB\)")
    one_line_error(z, rf"m\.zip:{WEIGHTS_NAME}: too large \(1\.0 MiB, the limit is 97\.7 KiB\)")
    assert opened == []


def test_zip_bomb_weights_are_refused_from_the_compressed_size(tmp_path, folder_bundle, monkeypatch):
    z = zip_of(folder_bundle, tmp_path / "bomb.zip", weights=safetensors_bytes({"w": F32}) + bytes(32 << 20),
               weights_type=zipfile.ZIP_DEFLATED)
    opened = opened_members(monkeypatch)
    one_line_error(z, rf"bomb\.zip:{WEIGHTS_NAME}: would inflate \d{{3,}} times \(.* KiB to 32\.0 MiB\); "
                      r"not a bundle \(a zip bomb\?\)")
    assert WEIGHTS_NAME not in opened
    ok = zip_of(folder_bundle, tmp_path / "deflated.zip", weights_type=zipfile.ZIP_DEFLATED)
    assert load_bundle(ok).meta.method == "pix2pix"  # deflated real weights are fine


def test_zip_member_claiming_more_than_the_archive_is_refused(tmp_path, folder_bundle):
    z = zip_of(folder_bundle, tmp_path / "liar.zip")
    patch_member(z, WEIGHTS_NAME, compress_size=0xFFFFFFF0, file_size=0xFFFFFFF0)
    one_line_error(z, rf"liar\.zip: damaged zip \({WEIGHTS_NAME} claims 4294967280 bytes compressed, "
                      r"4294967280 uncompressed, in an archive of \d+\)")


def safetensors_bytes(header: dict | bytes, data: bytes = bytes(16), length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("weights, match", [
    (safetensors_bytes({"w": F32}, length=1 << 62), r"its header claims 4294967296\.0 GiB, the file has \d+ bytes"),
    (safetensors_bytes({"w": F32}, length=10_000), r"its header claims 9\.8 KiB, the file has \d+ bytes"),
    (safetensors_bytes({"w": F32}, data=bytes(17 << 20), length=17 << 20),
     r"its header claims 17\.0 MiB, more than the 16\.0 MiB limit"),
    (safetensors_bytes({"w": {**F32, "data_offsets": [0, 10**15]}}), r"claims 931322\.6 GiB of tensors, the file holds 16 bytes"),
    (safetensors_bytes({"w": {**F32, "data_offsets": [0, 10**6]}}), r"claims 976\.6 KiB of tensors, the file holds 16 bytes"),
    (safetensors_bytes({"w": {**F32, "data_offsets": "all"}}), r"tensor 'w' has no valid data_offsets"),
    (safetensors_bytes(b"[[[[" * 100_000), r"its header is not JSON"),
    (safetensors_bytes(b"[1, 2]"), r"its header is not a JSON object"),
    (b"\x01\x02", r"2 bytes, less than a header"),
    (safetensors_bytes({"w": {**F32, "shape": [10**6, 10**6, 10**6]}}), r"overflow computing buffer size"),  # safetensors' check
])
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_absurd_safetensors_headers_are_one_line(tmp_path, folder_bundle, weights, match, kind):
    if kind == "zip":
        path = zip_of(folder_bundle, tmp_path / "m.zip", weights=weights)
    else:
        (folder_bundle / WEIGHTS_NAME).write_bytes(weights)
        path = folder_bundle
    one_line_error(path, rf"{WEIGHTS_NAME}: not a valid safetensors file \(.*({match})")


# ---- damaged zips: zlib.error, bad CRC, truncated, encrypted, unknown compression -------------------

@pytest.mark.parametrize("member, damage, match", [
    (META_NAME, {"flip": 0}, r"damaged zip \(Error -3 while decompressing data"),       # zlib.error
    (META_NAME, {"flip": -6}, r"damaged zip \(Bad CRC-32 for file 'medtranslate\.yaml'\)"),
    (WEIGHTS_NAME, {"flip": -100}, r"damaged zip \(Bad CRC-32 for file 'model\.safetensors'\)"),
    (WEIGHTS_NAME, {"flip": 0, "deflate": True}, r"damaged zip \(Error -3 while decompressing data"),
    (WEIGHTS_NAME, {"grow": True}, r"damaged zip \(EOFError\)"),                        # data ends early
    (META_NAME, {"flags": 1}, r"m\.zip:medtranslate\.yaml: encrypted; bundles must be plain zips"),
    (META_NAME, {"method": 99}, r"damaged zip \(That compression method is not supported\)"),
    (None, {"truncate": True}, r"not a zip file"),
])
def test_damaged_zips_are_one_line(tmp_path, folder_bundle, member, damage, match):
    deflate = damage.pop("deflate", False)
    z = zip_of(folder_bundle, tmp_path / "m.zip", weights_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    info = zipfile.ZipFile(z).getinfo(member) if member else None
    if damage.pop("truncate", False):
        z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    if damage.pop("grow", False):  # the member's data claims to run past the end of the file
        name_len = len(member)
        claimed = z.stat().st_size - (info.header_offset + 30 + name_len) + 1
        damage.update(compress_size=claimed, file_size=claimed)
    if damage.get("flip", 0) < 0:  # from the end
        damage["flip"] += info.compress_size
    if damage:
        patch_member(z, member, **damage)
    readers = [load_bundle] if member == WEIGHTS_NAME else [read_bundle_meta, load_bundle]
    for read in readers:
        with pytest.raises(BundleError) as exc:
            read(z)
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(str(z)) and re.search(match, msg), msg


# ---- slicing spec: absurd values are one line naming medtranslate.yaml ---------------------------

@pytest.mark.parametrize("key, value, match", [
    ("size", 0, r"size must be an int from 1 to 4096, got 0"),
    ("size", -64, r"size must be an int from 1 to 4096, got -64"),
    ("size", 200000, r"size must be an int from 1 to 4096, got 200000"),
    ("size", 4097, r"size must be an int from 1 to 4096, got 4097"),
    ("size", 12.5, r"'slice\.size' in .*: expected int, got 12\.5"),
    ("size", "128", r"'slice\.size' in .*: expected int, got '128'"),
    ("axis", 5, r"axis must be 0, 1 or 2"),
    ("axis", -1, r"axis must be 0, 1 or 2"),
    ("axis", True, r"'slice\.axis' in .*: expected int, got True"),
    ("roi_margin", 10**9, r"roi_margin must be an int from 0 to 10000, got 1000000000"),
    ("roi_margin", -1, r"roi_margin must be an int from 0 to 10000, got -1"),
    ("min_foreground", 2.0, r"min_foreground must be in \[0, 1\]"),
    ("margin", float("inf"), r"margin must be in \[0, 1\], got inf"),
    ("margin", float("nan"), r"margin must be in \[0, 1\], got nan"),
])
def test_absurd_slice_spec_in_metadata_is_one_line(folder_bundle, key, value, match):
    edit_meta(folder_bundle, **{f"slice__{key}": value})
    for read in (read_bundle_meta, load_bundle):
        with pytest.raises(BundleError) as exc:
            read(folder_bundle)
        msg = str(exc.value)
        assert "\n" not in msg and f"model/{META_NAME}" in msg and re.search(match, msg), msg


@pytest.mark.parametrize("kwargs", [{"size": 200000}, {"size": 4097}, {"size": 64.0}, {"size": True},
                                    {"axis": True}, {"axis": 1.0}, {"axis": 3}, {"roi_margin": 10_001},
                                    {"roi_margin": 2.5}, {"min_foreground": "0.5"}, {"margin": "0.1"},
                                    {"margin": float("nan")}, {"roi": 3}])
def test_slice_spec_refuses_absurd_values(kwargs):
    (key,) = kwargs
    with pytest.raises(ValueError, match=rf"^SliceSpec: {key} must be"):
        SliceSpec(**kwargs)


def test_slice_spec_bounds_are_accepted():
    assert SliceSpec(size=4096, axis=2, roi_margin=10_000, min_foreground=1, margin=0).size == 4096
    assert SliceSpec(size=1, roi="liver", roi_margin=0).roi == "liver"
