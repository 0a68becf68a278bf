"""`rec-train demo --quick --stop` end to end, as `make demo` runs it (in its quick size): synthetic
data, Ray Data prepare, the real MiniLM, pre-training on 2 workers with ZeRO-2, fine-tuning, export,
Ray Serve with 2 replicas over HTTP, queries, and the closing JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_cluster import free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def test_quick_demo_runs_the_whole_path_and_beats_popularity(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [str(BIN / "rec-train"), "demo", "--quick", "--stop", "--output", str(out), "--port", str(free_port())],
        capture_output=True, text=True, timeout=1500, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["finetuned_valid_ndcg@10"] > 1.2 * figures["popularity_valid_ndcg@10"], figures
    assert figures["finetuned_valid_ndcg@10"] > figures["pretrained_valid_ndcg@10"], figures
    assert figures["median_latency_ms"] > 0 and figures["endpoint"] is None  # --stop: nothing left serving
    steps = [line for line in lines if line.startswith("==> ")]
    assert len(steps) >= 9, steps  # progress a person can follow, step by step
    assert any("curl -s -X POST" in line for line in lines)
    assert sum("because:" in line for line in lines) >= 5  # recommendations with their reasons
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "rayrec.json").is_file()
