"""Scaling and failure under load on a real local Serve: with autoscaling, load raises the replicas from 1
to 2 and they come back down when it stops; a replica whose process is SIGKILLed under load is replaced,
the failed requests are counted and bounded by those in flight, and none fails once the replacement runs."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest
from local_cluster import free_port
from ray import serve
from test_serve_lifecycle import Cluster, Load

from rec_serve.app import APP_NAME, build_app
from rec_serve.synthetic import write_tiny_model

pytestmark = pytest.mark.e2e
REPLICA_CLASS = f"ServeReplica:{APP_NAME}:Recommender"


@pytest.fixture(scope="module")
def server(ray_shared: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = write_tiny_model(tmp_path_factory.mktemp("scaling") / "model", model_version="v1")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Cluster(f"http://127.0.0.1:{port}", model, model, {}, client)
    finally:
        serve.shutdown()


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["Recommender"]
    return status.replica_states.get("RUNNING", 0)


def replica_processes() -> set[int]:
    """PIDs of the processes Ray titles after the app's replica actor."""
    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(REPLICA_CLASS in part for part in p.info["cmdline"] or [])
    }


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Poll until `condition` holds; returns the monotonic time it first held."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
    return time.monotonic()


def test_load_adds_a_replica_and_its_end_removes_it(server: Cluster) -> None:
    autoscaling = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
        "downscale_delay_s": 5,
    }  # fmt: skip
    serve.run(
        build_app({"model": str(server.v1), "autoscaling": autoscaling}), name=APP_NAME, route_prefix="/"
    )
    assert running_replicas() == 1
    with Load(server, threads=8) as load:
        wait_for(lambda: running_replicas() >= 2, 120)
    assert load.failures == [] and load.statuses[200] > 0
    wait_for(lambda: running_replicas() == 1, 120)  # no load: back down to min_replicas
    serve.delete(APP_NAME)


def test_a_sigkilled_replica_is_replaced_and_only_requests_in_flight_fail(server: Cluster) -> None:
    serve.run(build_app({"model": str(server.v1), "replicas": 2}), name=APP_NAME, route_prefix="/")
    # the earlier test's replica processes may take a moment to exit
    wait_for(lambda: running_replicas() == 2 and len(replica_processes()) == 2, 60)
    before = replica_processes()
    victim = min(before)
    with Load(server, threads=4) as load:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replaced_at = wait_for(
            lambda: running_replicas() == 2 and len(pids := replica_processes()) == 2 and victim not in pids,
            120,
        )
        count_at_replacement = len(load.failures)
        time.sleep(3)  # requests keep flowing to both replicas
    assert len(load.failures) <= load.threads, load.failures  # at most the requests in flight on the victim
    assert len(load.failures) == count_at_replacement  # none after the replacement is up
    assert load.statuses[200] > 20 and replaced_at > killed_at
    serve.delete(APP_NAME)
