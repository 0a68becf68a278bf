"""benchmarks/gpu_check.sh: refused with exit 2 where there is no GPU; the same commands on CPU workers at a
small size (CHECK_CPU=1) train one epoch through `rec-train pretrain` and print the epoch as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def gpu_check(work: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(work)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path / "work", CUDA_VISIBLE_DEVICES="")  # no GPU visible, on any machine
    assert proc.returncode == 2 and proc.stdout == ""
    assert "gpu_check.sh needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "work").exists()  # nothing written


@pytest.mark.e2e
def test_the_same_commands_train_one_epoch_on_cpu_workers(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path, CHECK_CPU="1", CHECK_SIZE="tiny", CHECK_ITEMS="300", CHECK_USERS="200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.splitlines()
    figures = json.loads(line)
    assert figures["benchmark"] == "gpu_check" and figures["parameters"] > 0
    assert figures["sequences_per_s"] > 0 and figures["peak_memory_mb"] > 0
    assert 0.0 <= figures["valid_ndcg@10"] <= 1.0
    assert (tmp_path / "data" / "items.parquet").is_file()
