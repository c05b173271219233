"""The config parser (genbench.config): JSON values checked against dataclass annotations, field by
field, and `--set key=value` items routed to the one section that owns the key."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from genbench.config import apply_sets, check_at_least, from_dict, merge, parse_set, to_dict
from genbench.errors import GenbenchError


@dataclass
class Inner:
    width: int = 8
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (1, "one")
    maybe: float | None = None
    table: dict[str, int] = field(default_factory=dict)
    items: list[float] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        check_at_least(self.inner, "outer config: inner", 1, "width")


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    stages: dict = field(default_factory=dict)


def test_values_are_converted_to_the_annotated_types():
    cfg = from_dict(Outer, {"kind": "b", "flag": True, "sizes": [3, 4, 5], "pair": [2, "two"], "maybe": 2,
                            "table": {"k": 1}, "items": [1, 2.5], "inner": {"width": 3}})
    assert cfg == Outer(kind="b", flag=True, sizes=(3, 4, 5), pair=(2, "two"), maybe=2.0, table={"k": 1},
                        items=[1.0, 2.5], inner=Inner(width=3))
    assert isinstance(cfg.maybe, float) and isinstance(cfg.sizes, tuple) and isinstance(cfg.inner, Inner)
    assert from_dict(Outer, {"maybe": None}).maybe is None
    # to_dict is the JSON form from_dict reads back
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert to_dict(cfg)["sizes"] == [3, 4, 5]


@pytest.mark.parametrize("data, match", [
    ({"nme": "y"}, r"Outer: unknown field\(s\) \['nme'\]; valid fields are"),
    ({"kind": "c"}, r"Outer.kind: 'c' is not one of \['a', 'b'\]"),
    ({"flag": 1}, "Outer.flag: expected true/false, got 1"),
    ({"sizes": [1, True]}, r"Outer.sizes\[1\]: expected an integer, got True"),
    ({"sizes": "12"}, "Outer.sizes: expected a list"),
    ({"pair": [1]}, "Outer.pair: expected 2 items, got 1"),
    ({"maybe": "1.0"}, "Outer.maybe: '1.0' is not a valid"),
    ({"maybe": float("inf")}, "Outer.maybe: .*is not a valid"),
    ({"inner": {"rate": float("nan")}}, "Outer.inner.rate: expected a finite number"),
    ({"inner": {"rate": 10**400}}, "Outer.inner.rate: .*too large for a number"),
    ({"inner": [1]}, "Outer.inner: expected a mapping of fields"),
    ({"table": {"k": "v"}}, r"Outer.table\['k'\]: expected an integer"),
    ({"name": 3}, "Outer.name: expected a string"),
    ({"inner": {"width": 0}}, "outer config: inner: width must be >= 1, got 0"),  # validate() runs
])
def test_invalid_values_name_the_field(data, match):
    with pytest.raises(GenbenchError, match=match):
        from_dict(Outer, data)


def test_not_a_mapping():
    with pytest.raises(GenbenchError, match="Outer: expected a mapping of fields, got list"):
        from_dict(Outer, [1])


def test_merge_is_recursive_and_leaves_its_inputs_alone():
    base = {"a": 1, "sub": {"x": 1, "y": 2}}
    out = merge(base, {"sub": {"y": 3}, "b": 2})
    assert out == {"a": 1, "b": 2, "sub": {"x": 1, "y": 3}}
    assert base == {"a": 1, "sub": {"x": 1, "y": 2}}


@pytest.mark.parametrize("item, expected", [
    ("lr=1e-3", (["lr"], 1e-3)), ("train.steps=5", (["train", "steps"], 5)), ("flag=true", (["flag"], True)),
    ("sizes=[1, 2]", (["sizes"], [1, 2])), ("name=hello", (["name"], "hello")), ("name=", (["name"], "")),
    ("eq=a=b", (["eq"], "a=b")),
])
def test_parse_set_reads_values_as_json_else_strings(item, expected):
    assert parse_set(item) == expected


@pytest.mark.parametrize("item, match", [("lr", "expected key=value"), ("=3", "empty key"), ("a..b=1", "empty key")])
def test_parse_set_refuses_malformed_items(item, match):
    with pytest.raises(GenbenchError, match=match):
        parse_set(item)


def test_apply_sets_routes_each_key_to_its_section():
    model, train = {}, {}
    sections = {"model": (Outer, model), "train": (Train, train)}
    apply_sets(sections, ["name=y", "train.lr=0.1", "steps=3", "inner.width=4", "model.flag=true",
                          "train.stages.prior.lr=0.5"])
    assert model == {"name": "y", "inner": {"width": 4}, "flag": True}
    assert train == {"lr": 0.1, "steps": 3, "stages": {"prior": {"lr": 0.5}}}
    # the values are type-checked when the section is built
    assert from_dict(Outer, model).inner.width == 4


@pytest.mark.parametrize("item, match", [
    ("nope=1", r"unknown key 'nope'; valid keys: model.name, .*train.lr"),
    ("model.lr=1", r"model has no field 'lr'; valid: \["),
    ("train.inner.width=2", "train has no field 'inner'"),
    ("name.x=1", "'name' is not a nested section"),
])
def test_apply_sets_refuses_unknown_or_misplaced_keys(item, match):
    sections = {"model": (Outer, {"name": "x"}), "train": (Train, {})}
    with pytest.raises(GenbenchError, match=match):
        apply_sets(sections, [item])


def test_a_key_two_sections_own_must_be_qualified():
    @dataclass
    class A:
        steps: int = 1

    sections = {"model": (A, {}), "train": (Train, {})}
    with pytest.raises(GenbenchError, match="ambiguous key 'steps'"):
        apply_sets(sections, ["steps=2"])
    apply_sets(sections, ["model.steps=2"])
    assert sections["model"][1] == {"steps": 2}


def test_check_at_least_names_the_first_offender():
    cfg = Inner(width=0, rate=-1.0)
    check_at_least(cfg, "x config", -1, "width", "rate")
    with pytest.raises(GenbenchError, match="x config: width must be >= 1, got 0"):
        check_at_least(cfg, "x config", 1, "width", "rate")
    assert dataclasses.asdict(cfg) == {"width": 0, "rate": -1.0}
