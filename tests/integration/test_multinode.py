"""Several nodes on one machine (`ray.cluster_utils.Cluster`): a head and two worker nodes.

One pre-training run puts its two workers on different nodes; a worker node that disappears mid-run is
survived (the run resumes from its last checkpoint on a replacement node and finishes); Serve puts two
replicas of the model it exports on different nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
from local_cluster import free_port, processes_under
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from rec_train.config import load_config
from rec_train.data.config import PrepareConfig
from rec_train.data.prepare import prepare
from rec_train.data.synth import SynthConfig, synth
from rec_train.train.config import TrainConfig
from rec_train.train.launch import launch

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
SLOT = "trainer_slot"  # a training worker needs one, so training runs on the worker nodes only
# Room for both training workers on one worker node: only the placement strategy spreads them.
NODE_ARGS = {"num_cpus": 2, "object_store_memory": 100 * 1024**2, "resources": {SLOT: 2}}


def worker_node(cluster: Cluster) -> Any:
    """A worker node with two CPUs and two training slots."""
    return cluster.add_node(**NODE_ARGS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head (2 CPUs: drivers, Ray Data, Train and Serve controllers) + two worker nodes.

    Its temp dir (and the address file that `ray.init()` looks for) is private to this module, so
    other Ray instances on the machine neither see it nor are seen. Token authentication is on
    (tests/conftest.py), with Ray's default token (~/.ray/auth_token, created when missing)."""
    generated = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, text=True
    )
    assert generated.returncode == 0, generated.stderr
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: socket paths live under it
    if ray.is_initialized():  # the session's shared Ray (conftest.py); started again by the next user
        ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp_dir)
        env.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=2, object_store_memory=150 * 1024**2, dashboard_port=0)
            worker_node(cluster)
            worker_node(cluster)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            for pid in processes_under(temp_dir):  # a node that failed to start leaves its processes
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset, prepared with Ray Data on this cluster."""
    root = tmp_path_factory.mktemp("multinode-data")
    synth(SynthConfig(output=str(root / "raw"), users=150, items=60, events=4000, seed=5))
    prepare(
        PrepareConfig(
            format="parquet", events=str(root / "raw" / "events.parquet"),
            items=str(root / "raw" / "items.parquet"), output=str(root / "ds"),
        )
    )  # fmt: skip
    return root / "ds"


def train_config(dataset: Path, runs: Path, name: str, epochs: int) -> TrainConfig:
    return load_config(
        TrainConfig,
        overrides=[
            f"data.path={dataset}", f"run.storage={runs}", f"run.name={name}", f"train.epochs={epochs}",
            "model.size=tiny", "model.max_seq_len=50", "train.batch_size=32", "eval.ks=[10]",
            "deepspeed.zero_stage=2", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
            f"scaling.resources_per_worker={{{SLOT}: 1}}", "scaling.placement_strategy=STRICT_SPREAD",
            "run.max_failures=3", "checkpoint.every_epochs=1",
        ],
    )  # fmt: skip


def train_worker_nodes(alive: bool = False) -> list[str]:
    """Node ids of the Ray Train worker actors (only the running ones with `alive`)."""
    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive else [])
    return [a.node_id for a in list_actors(filters=filters, detail=True, limit=1000)]


def worker_node_ids(cluster: Cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def metrics_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def node_loss_run(
    cluster: Cluster, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A 5-epoch pre-training run on the two worker nodes; once its first checkpoint is registered, the node
    of one of its workers is removed and a new worker node added (what an autoscaler would bring). Returns
    the run's result (or error), the worker nodes of its first attempt, and the worker nodes then."""
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "node-loss"
    outcome: dict[str, Any] = {"runs": runs, "run": run, "epochs": 5}

    def train() -> None:
        try:
            outcome["result"] = launch(
                train_config(dataset, runs, "node-loss", outcome["epochs"]), show_progress=False
            )
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 600
    # The first checkpoint is registered (Ray Train's checkpoint manager snapshot lists it) and rank 0
    # has logged its epoch: a restart from here must resume, not start over.
    while not ((run / "checkpoint_manager_snapshot.json").is_file() and (run / "metrics.jsonl").is_file()
               and any("loss" in r for r in metrics_records(run))):  # fmt: skip
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    outcome["first_nodes"] = train_worker_nodes(alive=True)
    outcome["worker_nodes"] = worker_node_ids(cluster)
    doomed = next(n for n in cluster.worker_nodes if n.node_id in outcome["first_nodes"])
    cluster.remove_node(doomed)
    worker_node(cluster)  # the replacement an autoscaler would bring
    thread.join(timeout=900)
    assert not thread.is_alive(), "training did not finish after the node loss"
    return outcome


def test_pretraining_workers_run_on_different_worker_nodes(node_loss_run: dict[str, Any]) -> None:
    nodes = node_loss_run["first_nodes"]
    assert len(nodes) == 2
    assert len(set(nodes)) == 2, f"both training workers ran on node {nodes[0]}"
    assert set(nodes) <= node_loss_run["worker_nodes"]


def test_a_worker_node_removed_mid_training_is_survived(node_loss_run: dict[str, Any]) -> None:
    assert "error" not in node_loss_run, node_loss_run.get("error")
    epochs, records = node_loss_run["epochs"], metrics_records(node_loss_run["run"])
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["epoch"] >= 1, records
    assert [r["epoch"] for r in records if "loss" in r] == list(range(1, epochs + 1)), records
    assert records[-1].get("final") and records[-1]["epoch"] == epochs
    assert node_loss_run["result"]["epoch"] == epochs and node_loss_run["result"]["checkpoint"] is not None


def test_serve_replicas_run_on_different_nodes(node_loss_run: dict[str, Any]) -> None:
    from ray import serve

    from rec_serve.app import build_app
    from rec_train.train.export import export

    assert "error" not in node_loss_run, node_loss_run.get("error")
    model = node_loss_run["runs"] / "model"
    export(node_loss_run["result"]["checkpoint"], str(model), evaluate=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"model": str(model), "replicas": 2, "num_cpus": 1}), name="rayrec", route_prefix="/"
        )
        replicas = [
            a
            for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if a.class_name.startswith("ServeReplica:rayrec:")
        ]
        assert len(replicas) == 2
        assert len({a.node_id for a in replicas}) == 2, "both replicas on one node"

        # The exported model answers over HTTP, whichever replica takes the request.
        history = pq.read_table(model / "items.parquet", columns=["item_id"])["item_id"].to_pylist()[:3]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/recommend",
            data=json.dumps({"history": history, "k": 5}).encode(),
            headers={"content-type": "application/json"},
        )
        for _ in range(4):
            with urllib.request.urlopen(request, timeout=60) as response:
                body = json.loads(response.read())
            assert len(body["items"]) == 5 and not set(history) & {i["item_id"] for i in body["items"]}
    finally:
        serve.shutdown()
