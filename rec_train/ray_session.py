"""Starting or joining Ray, one way for every command (prepare, pre-train and fine-tune, the demo, serving).

One rule for the environment: every variable whose name starts with `AWS_` or `MLFLOW_` is forwarded to the
Ray workers (the job's `runtime_env`), so tasks and actors reach the same S3 endpoint and MLflow server with
the same credentials as the command that started them, on a local Ray and on a cluster alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

FORWARDED_PREFIXES = ("AWS_", "MLFLOW_")


def forwarded_env() -> dict[str, str]:
    """The variables of this process that Ray workers get too (names starting with `FORWARDED_PREFIXES`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and v}


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict[str, Any] | None:
    """`runtime_env` carrying `forwarded_env()` and `extra`; None when there is nothing to set."""
    env = {**forwarded_env(), **(extra or {})}
    return {"env_vars": env} if env else None


def init_ray(num_cpus: int | None = None, address: str | None = None, log_to_driver: bool = False) -> bool:
    """Join `address` or RAY_ADDRESS when given (the cluster's size is its own), else start a local Ray with
    `num_cpus` logical CPUs (None: the machine's). A Ray already running in this process is used as it is.
    Returns True when this call connected, so the caller knows to disconnect."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=worker_runtime_env())
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            runtime_env=worker_runtime_env(),
        )
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """`init_ray` for the length of a block; disconnects afterwards only when the block connected."""
    import ray

    connected = init_ray(num_cpus)
    try:
        yield
    finally:
        if connected:
            ray.shutdown()
