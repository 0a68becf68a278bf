"""Integration fixtures: one local Ray shared by the tests that need no cluster of their own.

Tests that need their own cluster (several nodes, a `ray start` head, S3 variables in every worker) start
it themselves and shut down whatever Ray the process had; the shared one is started again, with the same
settings, by the next test that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from local_cluster import TEST_API_KEY, TEST_API_KEY_ENV


@pytest.fixture(scope="session")
def _shared_ray_owner() -> Iterator[None]:
    """Shuts the shared Ray down once, at the end of the session."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_shared(_shared_ray_owner: None) -> Iterator[None]:
    """The session's local Ray (4 logical CPUs: 2 training workers + Ray Data's tasks, or Serve's replicas),
    started on first use and again after a module that needed its own cluster shut it down."""
    import ray

    if not ray.is_initialized():
        os.environ[TEST_API_KEY_ENV] = TEST_API_KEY
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
