"""Integration fixtures: small local Ray clusters shared by the tests of one module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """`ray.init(num_cpus=...)`, shut down afterwards (token auth stays on)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs for the module's tests."""
    with local_ray(2):
        yield


@pytest.fixture(scope="module")
def ray_4cpu() -> Iterator[None]:
    """A local Ray with room for 2 training workers plus Ray Data's tasks."""
    with local_ray(4):
        yield
