"""benchmarks/quality_ml1m.py end to end on MovieLens-100K with one epoch: prepare, `rec-train pretrain`
on Ray Train + DeepSpeed (older items in windows, batches grouped by length), rayrec's evaluator, the
popularity baseline, one JSON line."""

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


@pytest.mark.slow
def test_benchmark_prints_one_json_line_with_the_figures(shared_data: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "benchmarks/quality_ml1m.py", str(shared_data / "ml-100k"), "--work-dir", str(tmp_path),
        "train.epochs=1", "train.torch_threads=1", "model.max_seq_len=50", "eval.batch_size=256",
        "data.windows=all", "data.group_by_length=4", "train.loss_per=position",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[-2000:]
    result = json.loads(lines[0])

    assert result["users"] == 943 and result["items"] == 1682  # every ml-100k user has >= 20 ratings
    assert result["machine"]["cores"] == os.cpu_count() and result["machine"]["torch_threads"] == 1
    assert "published" in result and "strict" not in result
    run = result["published"]
    assert run["protocol"] == "published" and run["users"] == 943
    assert run["epochs"] == run["epochs_planned"] == run["reported_epoch"] == 1
    assert run["stopped_by_budget"] is False
    assert run["sequences_per_s"] > 0 and run["seconds_per_epoch"] > 0 and run["wall_s"] > 0
    assert run["eval_s"] > 0  # the one epoch is evaluated
    assert 0 < run["train_s"] + run["eval_s"] < run["wall_s"]
    check_figures(run)
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
    check_figures(result["popularity"])
    # ml-1m.yaml fuses MiniLM vectors of the items' texts with the IDs: written on the first run
    text = result["text_embeddings"]
    assert text["cached"] is False and text["items"] == 1682 and text["dim"] == 384
    assert text["missing_text"] == 0
    assert (tmp_path / "data" / "ml-100k" / "item_text_embeddings.safetensors").exists()
    assert (tmp_path / "data" / "ml-100k" / "manifest.json").exists()
    assert Path(run["run"], run["checkpoint"], "trainer_state.json").exists()
