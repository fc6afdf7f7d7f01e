"""The config registry: registration, typed overrides, serialisation."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    hidden: int = 8
    rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class Outer:
    output: str = ""
    steps: int = 10
    flag: bool = False
    method: Literal["a", "b"] = "a"
    spacing: tuple[float, float, float] | None = None
    names: tuple[str, ...] = ()
    limit: int | None = None
    inner: Inner = Inner()


@config_lib.register("test_outer", command="train test")
def _outer() -> Outer:
    """A config for these tests."""
    return Outer()


def test_registered_config_is_listed_with_its_description():
    (entry,) = [r for r in config_lib.registered("train test") if r.name == "test_outer"]
    assert entry.description == "A config for these tests."
    assert config_lib.get("test_outer") == Outer()


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        config_lib.register("test_outer", command="train test")(lambda: Outer())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match="test_outer"):
        config_lib.get("no_such_config")


@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("steps=25", "steps", 25),
        ("flag=true", "flag", True),
        ("flag=0", "flag", False),
        ("method=b", "method", "b"),
        ("spacing=1.5,0.8,0.8", "spacing", (1.5, 0.8, 0.8)),
        ("spacing=none", "spacing", None),
        ("names=x,y", "names", ("x", "y")),
        ("limit=7", "limit", 7),
        ("limit=null", "limit", None),
        ("inner.hidden=64", "inner", Inner(hidden=64)),
        ("inner.rate=1e-3", "inner", Inner(rate=1e-3)),
    ],
)
def test_overrides_parse_the_declared_type(override, field, expected):
    config = config_lib.apply_overrides(Outer(), [override])
    assert getattr(config, field) == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=ten", "--set steps 'ten': expected int"),
        ("flag=maybe", "expected bool"),
        ("method=c", "expected 'a' | 'b'"),
        ("spacing=1,2", "expected 3 comma-separated values"),
        ("stepz=3", "unknown config field 'stepz'"),
        ("inner.width=3", "unknown config field 'width' in Inner"),
        ("steps.x=3", "not a nested config"),
        ("inner=3", "nested config"),
        ("steps", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        config_lib.apply_overrides(Outer(), [override])


def test_configs_are_immutable_and_overrides_copy():
    base = Outer()
    changed = config_lib.override(base, "inner.hidden", "3")
    assert base.inner.hidden == 8 and changed.inner.hidden == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.steps = 3  # type: ignore[misc]


def test_dump_writes_every_field_and_round_trips(tmp_path):
    config = config_lib.apply_overrides(Outer(), ["spacing=1,2,3", "inner.hidden=5", "names=a"])
    config_lib.dump(config, tmp_path / "resolved_config.json", extra={"runner": "FnApiRunner"})
    data = json.loads((tmp_path / "resolved_config.json").read_text())
    assert data["config_class"].endswith("Outer")
    assert data["inner"] == {"hidden": 5, "rate": 0.1}
    assert data["run"] == {"runner": "FnApiRunner"}
    fields = {k: v for k, v in data.items() if k not in ("config_class", "run")}
    assert config_lib.from_dict(Outer, fields) == config
