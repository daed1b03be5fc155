"""config: YAML -> dataclasses with clear one-line errors; overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from MedTranslateLib.config import apply_overrides, dump_yaml, from_dict, load_yaml, parse_yaml, to_dict


@dataclass
class Gen:
    ngf: int = 64
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = 0.5


@dataclass
class Model:
    generator: Gen = field(default_factory=Gen)
    name: str = "m"


@dataclass
class Train:
    lr: float = 2e-4
    max_steps: int = 100
    betas: tuple[float, float] = (0.5, 0.999)
    milestones: list[int] = field(default_factory=list)
    roi: list[int] | None = None
    amp: bool = False
    out_dir: Path = Path("runs")
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: Any = None


@dataclass
class Root:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Required:
    path: str


def test_nested_parsing_and_defaults():
    cfg = from_dict(Root, {"model": {"generator": {"ngf": 8, "norm": "instance"}},
                           "train": {"lr": 1, "betas": [0.9, 0.99], "milestones": [1, 2], "roi": [1, 2, 3],
                                     "out_dir": "x/y", "phases": {"d": {"lr": 1e-3}}, "extra": {"a": [1]}}})
    assert cfg.model.generator == Gen(ngf=8, norm="instance", dropout=0.5)
    assert cfg.model.name == "m"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # ints accepted for floats
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.milestones == [1, 2] and cfg.train.roi == [1, 2, 3]
    assert cfg.train.out_dir == Path("x/y")
    assert cfg.train.phases == {"d": {"lr": 1e-3}}
    assert cfg.train.extra == {"a": [1]}
    assert from_dict(Root, None) == Root()
    assert from_dict(Root, {"train": {"roi": None}}).train.roi is None


def test_yaml_float_without_dot_is_accepted():
    # YAML 1.1 (pyyaml) reads 1e-4 as the string '1e-4'
    assert from_dict(Train, {"lr": "1e-4"}).lr == pytest.approx(1e-4)


def test_unknown_key_names_dotted_key_and_file():
    with pytest.raises(ValueError) as exc:
        from_dict(Root, {"model": {"generator": {"ngff": 8}}}, where="run.yaml")
    msg = str(exc.value)
    assert "unknown key 'model.generator.ngff' in run.yaml" in msg
    assert "valid keys: ngf, norm, dropout" in msg and "did you mean 'ngf'" in msg
    assert "\n" not in msg


def test_prefix_names_the_section():
    with pytest.raises(ValueError, match=r"unknown key 'model\.generator\.bad' in t\.yaml"):
        from_dict(Model, {"generator": {"bad": 1}}, where="t.yaml", prefix="model")


@pytest.mark.parametrize("data, expected", [
    ({"train": {"lr": "abc"}}, "'train.lr' in cfg.yaml: expected float, got 'abc'"),
    ({"train": {"max_steps": 2.5}}, "'train.max_steps' in cfg.yaml: expected int, got 2.5"),
    ({"train": {"max_steps": True}}, "'train.max_steps' in cfg.yaml: expected int, got True"),
    ({"train": {"amp": "yes"}}, "'train.amp' in cfg.yaml: expected bool, got 'yes'"),
    ({"train": {"betas": [0.5]}}, "'train.betas' in cfg.yaml: expected a list of 2 values, got 1"),
    ({"train": {"milestones": [1, "x"]}}, "'train.milestones[1]' in cfg.yaml: expected int, got 'x'"),
    ({"train": {"roi": 3}}, "'train.roi' in cfg.yaml: expected a list or null, got 3"),
    ({"model": {"generator": 8}}, "'model.generator' in cfg.yaml: expected a mapping, got 8"),
    ({"model": {"name": 3}}, "'model.name' in cfg.yaml: expected str, got 3"),
    ({"train": {"phases": {"d": {"lr": "x"}}}}, "'train.phases.d.lr' in cfg.yaml: expected float, got 'x'"),
])
def test_wrong_types(data, expected):
    with pytest.raises(ValueError) as exc:
        from_dict(Root, data, where="cfg.yaml")
    assert str(exc.value) == expected


def test_literal_validation():
    with pytest.raises(ValueError, match=r"'model\.generator\.norm' in c: expected one of 'batch', 'instance', "
                                         r"got 'group'"):
        from_dict(Root, {"model": {"generator": {"norm": "group"}}}, where="c")


def test_missing_required_key():
    with pytest.raises(ValueError, match=r"missing key 'path' in c"):
        from_dict(Required, {}, where="c")


def test_post_init_errors_are_named():
    @dataclass
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n < 1:
                raise ValueError("n must be >= 1")

    with pytest.raises(ValueError, match=r"'model' in c: n must be >= 1"):
        from_dict(Checked, {"n": 0}, where="c", prefix="model")


def test_to_dict_round_trip_through_yaml(tmp_path):
    cfg = from_dict(Root, {"train": {"betas": [0.9, 0.99], "out_dir": "a"}})
    plain = to_dict(cfg)
    assert plain["train"]["betas"] == [0.9, 0.99] and plain["train"]["out_dir"] == "a"
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert from_dict(Root, load_yaml(path)) == cfg


def test_to_dict_numpy_and_torch_scalars():
    import numpy as np
    import torch

    assert to_dict({"a": np.float32(1.5), "b": torch.tensor(2.0), "c": np.arange(2)}) == {"a": 1.5, "b": 2.0,
                                                                                        "c": [0, 1]}


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.yaml: no such file"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ValueError) as exc:
        load_yaml(bad)
    assert str(exc.value).startswith(f"{bad}: invalid YAML (line ") and "\n" not in str(exc.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping .* got list"):
        load_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_overrides():
    base = {"train": {"max_steps": 100}, "model": {"generator": {"ngf": 64}}}
    out = apply_overrides(base, ["train.max_steps=5", "model.generator.ngf=8", "train.betas=[0.9, 0.99]",
                                 "data.roi=null", "train.out_dir=runs/x=1", "model.name=abc", "train.lr=2.0e-4"])
    assert out == {"train": {"max_steps": 5, "betas": [0.9, 0.99], "out_dir": "runs/x=1", "lr": 2e-4},
                   "model": {"generator": {"ngf": 8}, "name": "abc"}, "data": {"roi": None}}
    assert base == {"train": {"max_steps": 100}, "model": {"generator": {"ngf": 64}}}  # not modified
    cfg = from_dict(Root, {k: v for k, v in out.items() if k != "data"})
    assert cfg.train.max_steps == 5 and cfg.model.generator.ngf == 8 and cfg.train.betas == (0.9, 0.99)


@pytest.mark.parametrize("item, match", [
    ("train.max_steps", "must look like key.path=value"),
    ("=5", "must look like key.path=value"),
    ("a..b=1", "must look like key.path=value"),
    ("train.max_steps.x=1", "'train.max_steps' is 100, not a mapping"),
    ("a=[1", "value is not valid YAML"),
])
def test_bad_overrides(item, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides({"train": {"max_steps": 100}}, [item])


def test_override_unknown_key_caught_by_from_dict():
    data = apply_overrides({}, ["train.max_stepz=5"])
    with pytest.raises(ValueError, match=r"unknown key 'train\.max_stepz' in overrides"):
        from_dict(Root, data, where="overrides")


# ---- YAML guards: billion laughs, recursive aliases, deep nesting, inert tags ------------------------

LAUGHS = "".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
                 + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)])
MERGE_LAUGHS = "".join(["a: &a {k: 1}\n"] + [f"{c}: &{c} {{<<: [{', '.join(['*' + p] * 10)}]}}\n"
                                             for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


@pytest.mark.parametrize("text, match", [
    (LAUGHS, r"line 6, column \d+: expands to more than 1000000 nodes"),  # stops at 10**6, not 10**9
    (MERGE_LAUGHS, r"expands to more than 1000000 nodes"),
    ("a: &a [1, *a]\n", r"line 1, column 11: alias \*a refers to a node that contains it \(recursive\)"),
    ("a: &a {b: {c: *a}}\n", r"alias \*a refers to a node that contains it"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"nested deeper than 100 levels"),
    ("a: " + "{b: " * 150 + "1" + "}" * 150 + "\n", r"nested deeper than 100 levels"),
])
def test_yaml_bombs_are_refused_in_one_line(tmp_path, text, match):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: invalid YAML (") and "\n" not in msg and re.search(match, msg), msg


def test_yaml_aliases_allowed_unless_refused():
    text = "defaults: &d {lr: 0.1}\ntrain: *d\nother: {<<: *d, steps: 2}\n" + "deep: " + "[" * 98 + "]" * 98 + "\n"
    data = parse_yaml(text)
    assert data["train"] == {"lr": 0.1} and data["other"] == {"lr": 0.1, "steps": 2}
    assert parse_yaml("only: &anchor {lr: 0.1}\n", aliases=False) == {"only": {"lr": 0.1}}
    with pytest.raises(ValueError, match=r"^m\.yaml: invalid YAML \(line 2, column 8: alias \*d: anchors and "
                                         r"aliases are not allowed in this file\)$"):
        parse_yaml(text, where="m.yaml", aliases=False)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/object/new:subprocess.check_call [[touch, '{marker}']]",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_yaml_tags_stay_inert(tmp_path, tag):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/"):
        parse_yaml("x: " + tag.format(marker=marker) + "\n")
    with pytest.raises(ValueError, match="could not determine a constructor"):
        apply_overrides({}, ["x=" + tag.format(marker=marker)])
    assert not marker.exists()
