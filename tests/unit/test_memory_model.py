"""The memory model of a run's states per ZeRO stage, and the refusal of a model that cannot fit."""

from __future__ import annotations

import pytest

from rec_train.config import ConfigError
from rec_train.train.memory import GB, check_fits, state_bytes, worker_budget

P = 1_000_000_000


def test_bytes_per_parameter_per_stage() -> None:
    assert [state_bytes(P, P, s, 1) / P for s in range(4)] == [16, 16, 16, 16]  # one worker: nothing to shard
    assert [state_bytes(P, P, s, 4) / P for s in range(4)] == [16, 10, 7, 4]  # 4+4+8, 4+4+2, 4+3, 16/4
    assert state_bytes(P, 0, 0, 4) / P == 4 and state_bytes(P, 0, 3, 4) / P == 1  # frozen: weights only


def test_the_budget_spreads_workers_over_the_nodes_that_can_hold_one() -> None:
    nodes = [{"CPU": 2, "memory": 16 * GB}, {"CPU": 2, "memory": 8 * GB}, {"CPU": 0.5, "memory": 64 * GB}]
    assert worker_budget(nodes, 2, 1) == 16 * GB  # one per CPU node, the larger one
    assert worker_budget(nodes, 4, 1) == 8 * GB  # two on each
    assert worker_budget([], 2, 1) == float("inf")


def test_a_model_that_cannot_fit_is_refused_with_what_would() -> None:
    check_fits(P, P, 3, 2, 8.1 * GB, "model.size=large")  # 16 GB of states over 2 workers: fits
    with pytest.raises(
        ConfigError,
        match=r"needs at least 16.0 GB per worker .* stage 0 on 2 workers.*set deepspeed.zero_stage=3",
    ):
        check_fits(P, P, 0, 2, 8.5 * GB, "model.size=large")
    with pytest.raises(ConfigError, match="give ZeRO stage 3 at least 4 workers"):
        check_fits(P, P, 2, 2, 4.5 * GB, "model.size=large")
