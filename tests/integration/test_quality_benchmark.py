"""benchmarks/quality.py end to end on MovieLens-100K with one epoch and two seeds: prepare, `rec-train
pretrain` on Ray Train + DeepSpeed (older items in windows, batches grouped by length), rayrec's evaluator,
the popularity baseline, one JSON line per seed; benchmarks/quality_table.py's mean and deviation of them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KS = (10, 50, 200)


def check_figures(figures: dict) -> None:
    """HR and NDCG in [0, 1], growing with K, NDCG@K <= HR@K, MRR in (0, 1]."""
    for k in KS:
        assert 0.0 <= figures[f"ndcg@{k}"] <= figures[f"hr@{k}"] <= 1.0
    assert figures["hr@10"] <= figures["hr@50"] <= figures["hr@200"]
    assert figures["ndcg@10"] <= figures["ndcg@50"] <= figures["ndcg@200"]
    assert 0.0 < figures["mrr"] <= 1.0
    assert figures["hr@200"] > 0.0  # 200 of 1,682 items: some users' targets must be in there


def run_script(*args: str) -> list[str]:
    """The non-empty stdout lines of a benchmark script run from the repository root."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.e2e
def test_benchmark_prints_one_json_line_per_seed_and_the_table_summarises_them(
    shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "quality.jsonl"
    lines = run_script(
        "benchmarks/quality.py", str(shared_data / "ml-100k"), "--work-dir", str(tmp_path), "--out", str(out),
        "train.epochs=1", "train.torch_threads=1", "eval.batch_size=256", "model.overrides.num_hidden_layers=1",
        "data.windows=all", "data.group_by_length=4", "train.loss_per=position", "--seeds", "0", "1",
        "--max-seq-len", "50",
    )  # fmt: skip
    assert len(lines) == 2, lines
    assert out.read_text().splitlines() == lines
    results = [json.loads(line) for line in lines]
    assert [r["seed"] for r in results] == [0, 1]
    for result in results:
        check_run(result, shared_data, tmp_path)
    assert results[0]["popularity"] == results[1]["popularity"]  # measured once
    assert results[0]["run"] != results[1]["run"]

    table = run_script("benchmarks/quality_table.py", str(out))
    assert table[2].startswith("| ml-100k | configs/pretrain/ml-1m.yaml train.epochs=1 ")
    assert "| published | 50 | 2 |" in table[2] and table[3].startswith("| ml-100k | most popular |")
    (row,) = json.loads(table[-1])["rows"]
    assert row["seeds"] == [0, 1]
    ndcg = [r["test"]["ndcg@10"] for r in results]
    assert row["figures"]["ndcg@10"]["mean"] == pytest.approx(sum(ndcg) / 2, abs=1e-4)
    assert row["figures"]["ndcg@10"]["std"] == pytest.approx(abs(ndcg[0] - ndcg[1]) / math.sqrt(2), abs=1e-4)
    assert f"{row['figures']['ndcg@10']['mean']:.4f} ± {row['figures']['ndcg@10']['std']:.4f}" in table[2]

    # benchmarks/rerank_tradeoff.py on the first seed's checkpoint: the knobs move the lists as they claim
    png = tmp_path / "tradeoff.png"
    checkpoint = str(Path(results[0]["run"], results[0]["checkpoint"]))
    (line,) = run_script(
        "benchmarks/rerank_tradeoff.py", "--model", checkpoint, "--setting", "0:0", "2:0", "0:0.5", "--png", str(png)
    )  # fmt: skip
    plain, penalised, diverse = json.loads(line)["settings"]
    assert plain["ndcg@10"] == pytest.approx(results[0]["test"]["ndcg@10"], abs=1e-4)  # the same evaluator
    assert penalised["popularity@10"] < plain["popularity@10"]
    assert diverse["diversity@10"] > plain["diversity@10"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_run(run: dict, shared_data: Path, tmp_path: Path) -> None:
    """One seed's line: the dataset, the machine, the run's figures and timings, the baseline, the text."""
    assert run["benchmark"] == "quality" and run["dataset"] == "ml-100k"
    assert run["config"] == "configs/pretrain/ml-1m.yaml" and run["protocol"] == "published"
    assert run["users"] == 943 and run["items"] == 1682  # every ml-100k user has >= 20 ratings
    assert run["max_seq_len"] == run["model"]["max_seq_len"] == 50
    assert run["machine"]["cores"] == os.cpu_count() and run["machine"]["torch_threads"] == 1
    assert "valid" not in run and "published_reference" not in run  # strict only; ml-1m only
    assert run["test"]["users"] == 943
    assert run["epochs"] == run["epochs_planned"] == run["reported_epoch"] == 1
    assert run["stopped_by_budget"] is False
    assert run["sequences_per_s"] > 0 and run["seconds_per_epoch"] > 0 and run["wall_s"] > 0
    assert run["eval_s"] > 0  # the one epoch is evaluated
    assert 0 < run["train_s"] + run["eval_s"] < run["wall_s"]
    check_figures(run["test"])
    check_figures(run["test_history_keep"])
    for figures in (run["test"], run["popularity"]):  # the top-K lists' figures beside the accuracy
        assert 0.0 < figures["coverage@10"] <= 1.0 and 0.0 < figures["gini@10"] < 1.0
        assert figures["popularity@10"] > 0.0 and figures["novelty@10"] > 0.0
    assert run["popularity"]["coverage@10"] < run["test"]["coverage@10"]  # 10 items for everyone vs lists
    assert 0.0 < run["test"]["diversity@10"] <= 2.0  # ml-1m.yaml reads MiniLM vectors: they give diversity
    assert run["test"]["users_short"] + run["test"]["users_medium"] + run["test"]["users_long"] == 943
    # data.windows=all: n training items (all but the test item) make 1 + (n - 2) // 50 rows of <= 51 items
    users = Counter(
        line.split("\t")[0] for line in (shared_data / "ml-100k" / "u.data").read_text().splitlines()
    )
    rows = sum(1 + (n - 1 - 2) // 50 for n in users.values())
    assert run["training_rows"] == rows > 943
    records = [json.loads(line) for line in Path(run["run"], "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    # each of the 2 workers takes half, in batches of 16 (grouped by length in runs of 4 batches)
    assert steps == [math.ceil(rows // 2 / 16)]
    check_figures(run["popularity"])
    # ml-1m.yaml fuses MiniLM vectors of the items' texts with the IDs: written on the first run
    text = run["text_embeddings"]
    assert text["cached"] is False and text["items"] == 1682 and text["dim"] == 384
    assert text["missing_text"] == 0
    assert (tmp_path / "data" / "ml-100k" / "item_text_embeddings.safetensors").exists()
    assert (tmp_path / "data" / "ml-100k" / "manifest.json").exists()
    assert Path(run["run"], run["checkpoint"], "trainer_state.json").exists()
