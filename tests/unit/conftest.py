"""Unit-test fixtures: a one-process gloo group for tests that build real DeepSpeed engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of one, as Ray Train sets up on each worker; one per session, since DeepSpeed
    keeps the groups it derives from it."""
    import deepspeed

    rendezvous = tmp_path_factory.mktemp("gloo") / "store"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            mp.setenv(key, value)
        # as the loop does on CPUs: no JIT build of DeepSpeed's shared-memory op, gloo carries everything
        mp.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
