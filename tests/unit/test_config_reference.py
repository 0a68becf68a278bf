"""docs/configuration.md is generated from the typed configs and kept in sync with them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from rec_train import docs_reference
from rec_train.config import StrictModel, load_config
from rec_train.data.config import PrepareConfig
from rec_train.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "configuration.md"


def test_committed_reference_matches_the_configs() -> None:
    expected = docs_reference.render()
    assert REFERENCE.read_text() == expected, (
        "docs/configuration.md is out of date with the config models; regenerate it with\n"
        f"    {docs_reference.COMMAND}"
    )


def test_every_command_config_is_documented_under_its_command() -> None:
    used_by = docs_reference.config_models()
    assert "rec-train prepare" in used_by[PrepareConfig]
    assert {"rec-train pretrain", "rec-train finetune"} <= set(used_by[TrainConfig])
    text = REFERENCE.read_text()
    for model in used_by:
        assert f"## `{model.__name__}`" in text


def test_documented_keys_are_real_override_keys() -> None:
    # Every dotted key of the table can be set as an override: `key=<its default>` validates.
    rows = {key: default for key, _, default, _ in docs_reference.rows(TrainConfig)}
    for key, default in rows.items():
        if default in ("required", "null") or key.startswith("finetune"):
            continue
        load_config(TrainConfig, overrides=["data.path=/data", f"{key}={default}"])


class Inner(StrictModel):
    """An inner section."""

    depth: int = Field(2, ge=1, le=8, description="layers")
    names: list[str] = Field(default_factory=lambda: ["a", "b"])


class Outer(StrictModel):
    path: str = Field(description="where it lives")
    mode: Literal["fast", "slow"] = "fast"  # how hard to try
    inner: Inner = Field(default_factory=Inner)
    extra: Inner | None = None
    ratio: float = 0.5
    """share of the work"""


def test_rows_expand_sections_and_describe_each_key() -> None:
    assert list(docs_reference.rows(Outer)) == [
        ("path", "str", "required", "where it lives"),
        ("mode", '"fast" | "slow"', '"fast"', "how hard to try"),
        ("inner.depth", "int, >= 1, <= 8", "2", "layers"),
        ("inner.names", "list[str]", '["a", "b"]', ""),
        ("extra", "Inner | null", "null", "An inner section."),
        ("extra.depth", "int, >= 1, <= 8", "2", "layers"),
        ("extra.names", "list[str]", '["a", "b"]', ""),
        ("ratio", "float", "0.5", "share of the work"),
    ]


def test_table_cells_escape_pipes() -> None:
    assert docs_reference.cell('"a" | "b"') == '"a" \\| "b"'


def test_only_project_models_are_documented() -> None:
    # Outer / Inner above live in the tests, not in rec_train or rec_serve.
    names = {m.__name__ for m in docs_reference.project_models()}
    assert "Outer" not in names and "Inner" not in names
    assert {"PrepareConfig", "TrainConfig"} <= names
