"""Typed configs: YAML + `a.b=c` overrides, unknown keys rejected with the nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import model_validator

from rec_train.config import ConfigError, StrictModel, apply_overrides, load_config, parse_override


class Inner(StrictModel):
    lr: float = 1e-3
    betas: list[float] = [0.9, 0.98]


class Outer(StrictModel):
    name: str
    steps: int = 10
    optim: Inner = Inner()


class Span(StrictModel):
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _check_order(self) -> Span:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not be above high ({self.high})")
        return self


class Holder(StrictModel):
    span: Span = Span()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: run\noptim:\n  lr: 0.1\n")
    cfg = load_config(Outer, path, ["steps=20", "optim.betas=[0.8, 0.9]"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("run", 20, 0.1, [0.8, 0.9])


def test_override_values_are_yaml() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=") == (["a"], None)


def test_unknown_key_names_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown key; did you mean 'optim.lr'\?"):
        load_config(Outer, None, ["name=x", "optim.lrr=1"])


def test_bad_value_names_key_and_input() -> None:
    with pytest.raises(ConfigError, match=r"config: steps: .*integer.*\(got 'many'\)"):
        load_config(Outer, None, ["name=x", "steps=many"])


def test_a_validator_message_is_shown_as_written() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(Holder, None, ["span.low=3"])
    assert str(error.value) == "config: span: low (3) must not be above high (1)"
    with pytest.raises(ConfigError) as error:
        load_config(Span, None, ["low=3"])
    assert str(error.value) == "config: low (3) must not be above high (1)"


def test_malformed_overrides() -> None:
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, broken)
