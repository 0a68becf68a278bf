"""benchmarks/quality_table.py: means and sample deviations over seeds, against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rec_train.errors import RayrecError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_table.py"
spec = importlib.util.spec_from_file_location("quality_table", SCRIPT)
assert spec is not None and spec.loader is not None
quality_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality_table)

POPULARITY = {"users": 3, "hr@10": 0.05, "ndcg@10": 0.02, "hr@50": 0.2, "ndcg@50": 0.04, "mrr": 0.01}


def line(dataset: str, seed: int, protocol: str, ndcg: float, hr: float, **extra) -> dict:
    test = {"users": 3, "hr@10": hr, "ndcg@10": ndcg, "hr@50": 0.9, "ndcg@50": 0.5, "mrr": 0.05,
            "coverage@10": 0.5, "ndcg@10_short": 0.1}  # fmt: skip
    return {
        "benchmark": "quality", "dataset": dataset, "config": "configs/pretrain/ml-1m.yaml", "overrides": [],
        "max_seq_len": 50, "seed": seed, "protocol": protocol, "test": test, "popularity": POPULARITY,
        **extra,
    }  # fmt: skip


LINES = [
    line("ml-1m", 0, "strict", 0.1, 0.3, valid={"ndcg@10": 0.2}, seconds_per_epoch=10.0),
    line("ml-1m", 1, "strict", 0.2, 0.4, valid={"ndcg@10": 0.3}, seconds_per_epoch=20.0),
    line("ml-1m", 2, "strict", 0.3, 0.8, valid={"ndcg@10": 0.4}, seconds_per_epoch=30.0),
    line("ml-1m", 0, "published", 0.25, 0.45, seconds_per_epoch=None),  # its own row: another protocol
]


def test_mean_and_sample_std_per_group() -> None:
    summary = quality_table.summarise(LINES)
    # the accuracy figures only: no `users`, `coverage@10`, `ndcg@10_short`
    assert summary["columns"] == ["ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr"]
    strict, published = summary["rows"]
    assert (strict["dataset"], strict["protocol"], strict["seeds"]) == ("ml-1m", "strict", [0, 1, 2])
    figures = strict["figures"]
    assert figures["ndcg@10"] == {"mean": 0.2, "std": 0.1}
    # hr@10 0.3, 0.4, 0.8: mean 0.5, squares 0.04 + 0.01 + 0.09 over n - 1 = 2: sqrt(0.07) = 0.2646
    assert figures["hr@10"] == {"mean": 0.5, "std": 0.2646}
    assert figures["mrr"] == {"mean": 0.05, "std": 0.0}
    assert figures["valid ndcg@10"] == {"mean": 0.3, "std": 0.1}
    assert figures["s/epoch"] == {"mean": 20.0, "std": 10.0}
    assert published["seeds"] == [0] and published["figures"]["ndcg@10"] == {"mean": 0.25, "std": None}
    none = {"mean": None, "std": None}
    assert published["figures"]["valid ndcg@10"] == published["figures"]["s/epoch"] == none
    assert summary["popularity"] == {"ml-1m": {k: POPULARITY[k] for k in summary["columns"]}}


def test_columns_are_the_ks_every_line_has_and_groups_split_by_overrides() -> None:
    short = line(
        "amazon-beauty", 0, "strict", 0.04, 0.06, overrides=["train.epochs=1"], seconds_per_epoch=3.0
    )
    short["test"] = {k: v for k, v in short["test"].items() if not k.endswith("@50")}
    summary = quality_table.summarise([*LINES, short, {**short, "overrides": []}])
    assert summary["columns"] == ["ndcg@10", "hr@10", "mrr"]
    assert [r["config"] for r in summary["rows"][2:]] == [
        "configs/pretrain/ml-1m.yaml train.epochs=1", "configs/pretrain/ml-1m.yaml",
    ]  # fmt: skip


def test_table_and_json_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    files[0].write_text("".join(json.dumps(x) + "\n" for x in LINES[:2]) + "\n")
    files[1].write_text("".join(json.dumps(x) + "\n" for x in LINES[2:]))
    monkeypatch.setattr(sys, "argv", ["quality_table.py", *map(str, files)])
    quality_table.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| dataset | config | protocol | max_seq_len | seeds | ndcg@10 | hr@10 |")
    assert out[2].startswith("| ml-1m | configs/pretrain/ml-1m.yaml | strict | 50 | 3 | 0.2000 ± 0.1000 |")
    assert out[2].endswith("| 0.3000 ± 0.1000 | 20.0 ± 10.0 |")
    assert "| 0.2500 ± n/a |" in out[3] and out[3].endswith("| n/a | n/a |")
    assert out[4] == "| ml-1m | most popular |  |  |  | 0.0200 | 0.0500 | 0.0400 | 0.2000 | 0.0100 |  |  |"
    assert json.loads(out[-1]) == quality_table.summarise(LINES)


def test_lines_of_something_else_are_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n" + json.dumps({"benchmark": "serve_load"}) + "\n")
    with pytest.raises(RayrecError, match=r"x\.jsonl line 2: not a line of benchmarks/quality\.py"):
        quality_table.read_lines([path])
    path.write_text("{oops\n")
    with pytest.raises(RayrecError, match=r"x\.jsonl line 1: not JSON"):
        quality_table.read_lines([path])
