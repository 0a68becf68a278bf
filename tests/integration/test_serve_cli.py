"""`rec-serve deploy` as a user runs it: prints the URL and a curl, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from local_cluster import free_port

from rec_serve.synthetic import item_id, write_tiny_model

REC_SERVE = str(Path(sys.executable).with_name("rec-serve"))


@pytest.fixture(scope="module", autouse=True)
def no_other_ray() -> None:
    """`rec-serve deploy` starts its own local Ray, as a user's does: the session's shared Ray is shut down
    first (the next module that needs it starts it again), so the two never share the machine's CPUs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.e2e  # a process that starts its own Ray and Serve, as a user's shell does
def test_deploy_serves_until_interrupted(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "model", model_version="cli-v1")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster
    proc = subprocess.Popen(
        [REC_SERVE, "deploy", "--model", str(folder), "--port", str(port), "--max-batch-size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if "stop:" in line:
                break
        out = "".join(lines)
        url = f"http://127.0.0.1:{port}"
        assert f"rayrec is serving {folder} at {url}" in out
        assert f"curl -s -X POST {url}/v1/recommend" in out and "Ctrl-C" in out
        body = httpx.post(f"{url}/v1/recommend", json={"history": [item_id(1)], "k": 4}, timeout=60).json()
        assert body["model_version"] == "cli-v1" and len(body["items"]) == 4
        assert httpx.get(f"{url}/v1/model", timeout=60).json()["serving"]["max_batch_size"] == 8
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-3000:]
    assert "stopping rayrec" in rest


def test_deploy_with_a_wrong_model_path_fails_fast(tmp_path: Path) -> None:
    result = subprocess.run(
        [REC_SERVE, "deploy", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no such model folder" in result.stderr and str(tmp_path / "missing") in result.stderr
    bad = subprocess.run(
        [REC_SERVE, "deploy", "--model", str(tmp_path), "--autoscale", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "must look like MIN:MAX" in bad.stderr
