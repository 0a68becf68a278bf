"""Operating the service as `serve deploy configs/serve/local.yaml` does: live batching changes,
a killed replica, and a new model version rolled out while requests keep flowing.

The app is deployed from the shipped config file (its `args.model` pointed at a test model) through
Serve's declarative path, the one `serve deploy` and KubeRay use, so a `user_config` change reaches
running replicas through `reconfigure` and a new `args.model` replaces them one by one.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from local_cluster import free_port
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from rec_serve.synthetic import write_tiny_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve" / "local.yaml"


@dataclass
class Cluster:
    url: str
    v1: Path
    v2: Path
    config: dict[str, Any]
    client: httpx.Client


def deploy(config: dict[str, Any], wait: bool = True) -> None:
    """What `serve deploy FILE` sends to the controller; optionally wait until the app is running."""
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 300
    while wait and serve.status().applications["rayrec"].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status().applications["rayrec"]
        time.sleep(0.5)


def with_changes(cluster: Cluster, model: Path, max_batch_size: int) -> dict[str, Any]:
    config = copy.deepcopy(cluster.config)
    [app] = config["applications"]
    app["args"]["model"] = str(model)
    app["deployments"][0]["user_config"]["max_batch_size"] = max_batch_size
    return config


@pytest.fixture(scope="module")
def cluster(ray_shared: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("lifecycle")
    v1 = write_tiny_model(root / "v1", model_version="v1", seed=1)
    v2 = write_tiny_model(root / "v2", model_version="v2", seed=2)
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = str(v1)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(config)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Cluster(f"http://127.0.0.1:{port}", v1, v2, config, client)
    finally:
        serve.shutdown()


def replica_stats(cluster: Cluster, polls: int = 40) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(polls):
        stats = cluster.client.get("/v1/model").json()["serving"]
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


@dataclass
class Load:
    """Requests sent from background threads until stopped; every status and model version kept."""

    cluster: Cluster
    threads: int = 4
    statuses: Counter = field(default_factory=Counter)
    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.cluster.url, timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    r = client.post("/v1/recommend", json={"user_id": f"u{1 + (n + i) % 49}", "k": 5})
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.versions.append(r.json()["model_version"])
                    else:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, args=(n,)) for n in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()


def test_batching_settings_change_live_without_restarting_replicas(cluster: Cluster) -> None:
    before = replica_stats(cluster)
    assert len(before) == 2 and all(s["max_batch_size"] == 32 for s in before.values())
    deploy(with_changes(cluster, cluster.v1, max_batch_size=1))
    deadline = time.monotonic() + 120
    after = replica_stats(cluster)
    while any(s["max_batch_size"] != 1 for s in after.values()) and time.monotonic() < deadline:
        time.sleep(0.5)  # the controller applies the new user_config asynchronously
        after = replica_stats(cluster)
    assert set(after) == set(before)  # reconfigure, not a restart
    assert all(s["max_batch_size"] == 1 for s in after.values())
    with Load(cluster, threads=8):
        time.sleep(3)
    final = replica_stats(cluster)
    batches = sum(final[r]["batches"] - after[r]["batches"] for r in final)
    requests = sum(
        final[r]["mean_batch_size"] * final[r]["batches"] - after[r]["mean_batch_size"] * after[r]["batches"]
        for r in final
    )
    assert batches > 0 and requests == pytest.approx(batches)  # every batch since then had one request
    deploy(with_changes(cluster, cluster.v1, max_batch_size=32))


def test_a_killed_replica_is_replaced_while_requests_keep_succeeding(cluster: Cluster) -> None:
    victim, survivor = sorted(replica_stats(cluster))
    with Load(cluster, threads=2) as load:
        time.sleep(1)
        ray.kill(
            ray.get_actor(f"SERVE_REPLICA::rayrec#Recommender#{victim}", namespace="serve"), no_restart=True
        )
        deadline = time.monotonic() + 120
        replicas: set[str] = set()
        while time.monotonic() < deadline:
            replicas = set(replica_stats(cluster, polls=10))
            if len(replicas) == 2 and victim not in replicas:
                break
            time.sleep(1)
        time.sleep(1)
    assert survivor in replicas and victim not in replicas and len(replicas) == 2
    # A request already running on the killed replica may fail with it; nothing else may.
    assert len(load.failures) <= load.threads, load.failures
    assert load.statuses[200] > 20


def test_a_new_model_version_rolls_out_with_zero_failed_requests(cluster: Cluster) -> None:
    with Load(cluster, threads=4) as load:
        time.sleep(1)
        deploy(with_changes(cluster, cluster.v2, max_batch_size=32), wait=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and load.versions[-20:].count("v2") < 20:
            time.sleep(0.5)
        time.sleep(1)
    assert load.failures == []
    assert load.versions[0] == "v1" and load.versions[-1] == "v2"
    switch = load.versions.index("v2")
    assert load.versions[-20:] == ["v2"] * 20 and switch > 0
    assert cluster.client.get("/v1/model").json()["model_version"] == "v2"
