"""Named sizes and `rec-train params`: counts come from the meta device, so `large` costs no memory."""

from __future__ import annotations

import json

import pytest

from rec_train.cli import main
from rec_train.model import SIZES, RecModel, build_config, count_parameters


def test_tiny_count_matches_a_real_model() -> None:
    config = build_config("tiny", pointwise_head="click")
    model = RecModel(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["item_table"] == 51 * 16
    assert counts["items"] + counts["encoder"] + counts["other"] == counts["total"]


def test_every_size_builds() -> None:
    assert set(SIZES) == {"tiny", "ml-1m", "base", "large"}
    ml1m = build_config("ml-1m")
    assert (ml1m.num_items, ml1m.hidden_size, ml1m.num_hidden_layers, ml1m.max_seq_len) == (3706, 64, 2, 200)
    assert count_parameters(build_config("base"))["total"] > 1e8


def test_params_command_large(capsys: pytest.CaptureFixture) -> None:
    assert main(["params", "--size", "large"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_items"] == 10_000_000
    assert report["item_table_parameters"] == 10_000_001 * 256
    assert report["parameters"] > 2e9
    assert report["encoder_parameters"] > 3e8


def test_params_command_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main(["params", "--size", "tiny", "num_items=99", "hidden_size=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["item_table_parameters"] == 100 * 8
    assert main(["params", "--size", "tiny", "hiden_size=8"]) == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
