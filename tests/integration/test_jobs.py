"""Ray Jobs: `ray start --head`, then `ray job submit --working-dir <repo> -- rec-train prepare ...
&& rec-train pretrain ...`, as a user does against a cluster, with Ray's token authentication on."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_cluster import free_port, processes_under

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's `ray` and `rec-train`
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "demo_out", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard (Jobs API) URL
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE and the token file
    token: str

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`ray ARGS --address ...` with this cluster's auth environment."""
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def get(self, path: str, token: str | None) -> int:
        """HTTP status of GET `path` on the dashboard (0 when nothing listens)."""
        request = urllib.request.Request(self.address + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except urllib.error.URLError:
            return 0  # not listening (yet)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A one-node Ray cluster started with `ray start --head --block`, shared by the module; terminating
    that process stops exactly this cluster (a plain `ray stop` would stop every Ray cluster of this
    user), and whatever of it is still running 10 s later is killed."""
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    dashboard_port = free_port()
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--port={free_port()}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    head = Head(f"http://127.0.0.1:{dashboard_port}", env, token)
    try:
        deadline = time.monotonic() + 180
        while head.get("/api/version", token) != 200 or head.get("/api/jobs/", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        time.sleep(2)
        if proc.poll() is not None:  # the dashboard answered, but the node itself failed to start
            pytest.fail(f"ray start exited:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in processes_under(temp_dir):  # anything of this cluster that outlived its head
            os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job(head: Head, job_id: str, timeout: float) -> str:
    """Poll `ray job status` until the job ends (or `timeout`); returns its last status."""
    deadline = time.monotonic() + timeout
    while True:
        out = head.ray("job", "status", job_id, "--address", head.address)
        assert out.returncode == 0, out.stderr
        # "Status for job 'ID': RUNNING" while it runs, "Job 'ID' succeeded" once it has ended.
        status = re.search(
            r"Status for job '[^']+': (\w+)|Job '[^']+' (succeeded|failed|stopped)", out.stdout
        )
        assert status, out.stdout
        current = (status[1] or status[2]).upper()
        if current in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(3)


def test_the_jobs_api_refuses_requests_without_the_token(ray_head: Head) -> None:
    assert ray_head.get("/api/jobs/", token=None) == 401
    assert ray_head.get("/api/jobs/", token="not-" + ray_head.token) in (401, 403)
    assert ray_head.get("/api/jobs/", token=ray_head.token) == 200


def test_submit_prepare_and_pretrain_as_a_ray_job(ray_head: Head, tmp_path: Path) -> None:
    raw, dataset, runs = tmp_path / "raw", tmp_path / "dataset", tmp_path / "runs"
    synth = subprocess.run(
        [str(BIN / "rec-train"), "synth", "--output", str(raw), "--users", "120", "--items", "60", "--events", "3000", "--seed", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    job_id = f"rayrec-{uuid.uuid4().hex[:8]}"
    prepare = [
        "rec-train", "prepare", "--config", "configs/data/synthetic.yaml", "--events", str(raw / "events.parquet"),
        "--items", str(raw / "items.parquet"), "--output", str(dataset),
    ]  # fmt: skip
    pretrain = [
        "rec-train", "pretrain", "--config", "configs/pretrain/synthetic.yaml", "--no-progress",
        f"data.path={dataset}", f"run.storage={runs}", "run.name=job", "train.epochs=1",
        "checkpoint.every_epochs=1", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
    ]  # fmt: skip
    # `ray job submit -- ARGS` quotes each argument, so a chain of commands goes in one `bash -c`.
    entrypoint = ["bash", "-c", f"{shlex.join(prepare)} && {shlex.join(pretrain)}"]
    # Until the node's job agent is up, the server answers "No available agent ... try again later";
    # a loaded machine can also drop the CLI's first connection. No job is created in either case.
    retry = ("Failed to connect to Ray", "No available agent")
    for _ in range(30):
        submit = ray_head.ray(
            "job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--no-wait",
            "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
            "--", *entrypoint,
        )  # fmt: skip
        if not any(message in submit.stderr for message in retry):
            break
        time.sleep(4)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    status = wait_for_job(ray_head, job_id, timeout=800)
    logs = ray_head.ray("job", "logs", job_id, "--address", ray_head.address)
    assert logs.returncode == 0, logs.stderr
    assert status == "SUCCEEDED", logs.stdout[-5000:]

    # Both commands ran (from the uploaded copy of the repository, with the venv's commands) and
    # printed their JSON summaries: the prepared dataset, then the trained run and its checkpoint.
    lines = logs.stdout.splitlines()
    prepared = next(json.loads(line) for line in lines if line.startswith('{"users"'))
    assert prepared["users"] == json.loads((dataset / "manifest.json").read_text())["counts"]["users"] > 0
    trained = next(json.loads(line) for line in lines if line.startswith('{"run"'))
    assert Path(trained["run"]) == runs / "job"
    assert trained["epoch"] == 1 and Path(trained["checkpoint"]).is_dir()
