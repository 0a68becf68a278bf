"""The prepare config: every shipped data YAML validates; bad keys and values give clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rec_train.config import ConfigError, load_config, validate
from rec_train.data import prepare
from rec_train.data.config import PrepareConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "data").glob("*.yaml"))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_data_configs_load(path: Path) -> None:
    assert path.read_text().startswith("# rec-train ")
    cfg = load_config(PrepareConfig, path)
    assert cfg.max_seq_len is None  # full histories by default; the model picks its window


def test_there_are_data_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"ml-1m.yaml", "ml-100k.yaml", "synthetic.yaml"}


def test_flags_override_yaml_and_overrides() -> None:
    args = parse(["--config", "configs/data/ml-100k.yaml", "--output", "s3://b/x", "max_seq_len=50",
                  "split.kind=leave_one_out"])  # fmt: skip
    cfg = prepare.config_from_args(args)
    assert cfg.output == "s3://b/x" and cfg.max_seq_len == 50 and cfg.format == "movielens"


def test_the_exact_command_line_parses() -> None:
    args = parse(["--format", "sequences", "--events", "../shared/data/ml-1m/sequences.txt.gz", "--items",
                  "../shared/data/ml-1m/movies.dat", "--output", "OUT"])  # fmt: skip
    cfg = prepare.config_from_args(args)
    assert (
        cfg.format == "sequences" and cfg.items.endswith("movies.dat") and cfg.split.kind == "leave_one_out"
    )


def test_misspelt_key_names_the_nearest_one() -> None:
    with pytest.raises(ConfigError, match=r"max_seq_lenn: unknown key; did you mean 'max_seq_len'"):
        prepare.config_from_args(
            parse(["--format", "csv", "--events", "e", "--output", "o", "max_seq_lenn=3"])
        )


def test_unknown_format_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"format: Input should be 'movielens', 'sequences', 'parquet' or 'csv'"
    ):
        prepare.config_from_args(parse(["--events", "e", "--output", "o", "format=tsv"]))


def test_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"min_item_count: .*greater than or equal to 1"):
        validate(PrepareConfig, {"format": "csv", "events": "e", "output": "o", "min_item_count": 0})
    with pytest.raises(ConfigError, match="split.kind=time needs split.valid_cutoff"):
        prepare.config_from_args(
            parse(["--format", "csv", "--events", "e", "--output", "o", "split.kind=time"])
        )
    with pytest.raises(ConfigError, match="only used with split.kind=time"):
        prepare.config_from_args(
            parse(["--format", "csv", "--events", "e", "--output", "o", "split.test_cutoff=5"])
        )
    with pytest.raises(ConfigError, match="output: Field required"):
        prepare.config_from_args(parse(["--format", "csv", "--events", "e"]))


def test_time_cutoffs_accept_iso_dates() -> None:
    args = parse(["--format", "csv", "--events", "e", "--output", "o", "split.kind=time",
                  "split.valid_cutoff=2000-12-31", "split.test_cutoff=978393600"])  # fmt: skip
    split = prepare.config_from_args(args).split
    assert (split.valid_cutoff, split.test_cutoff) == (978220800, 978393600)
    with pytest.raises(ConfigError, match="neither an integer timestamp nor an ISO date"):
        prepare.config_from_args(parse(["--format", "csv", "--events", "e", "--output", "o", "split.kind=time",
                                        "split.valid_cutoff=soon", "split.test_cutoff=1"]))  # fmt: skip
