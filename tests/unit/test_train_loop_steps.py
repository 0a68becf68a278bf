"""The training loop's steps alone: when to evaluate and checkpoint, early stopping, and one epoch of a
real DeepSpeed engine (gloo, one process) over batches given as Arrow tables."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from rec_train.config import load_config
from rec_train.train.checkpoint import TrainerState
from rec_train.train.config import TrainConfig
from rec_train.train.deepspeed_config import deepspeed_config
from rec_train.train.loop import Worker, due, record_evaluation, train_epoch
from rec_train.train.model_init import build_model
from rec_train.train.optim import build_optimizer, lr_lambda


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.path=somewhere", *overrides])


def test_checkpoint_and_evaluation_are_due_on_their_epochs_and_always_at_the_last() -> None:
    cfg = config("train.epochs=7", "checkpoint.every_epochs=3", "eval.every_epochs=2")
    assert [due(cfg, epoch) for epoch in range(1, 8)] == [
        (False, False), (False, True), (True, True), (False, True), (False, False), (True, True), (True, True),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("metric", "values", "stops_at"),
    [("ndcg@10", [0.1, 0.2, 0.15, 0.19, 0.3], 4), ("rmse", [1.0, 0.9, 0.95, 0.91, 0.5], 4)],
)
def test_patience_counts_evaluations_without_a_better_figure(
    metric: str, values: list[float], stops_at: int
) -> None:
    cfg = config(
        f"eval.metric={metric}", "eval.patience=2", *(["finetune.task=rating"] if metric == "rmse" else [])
    )
    state = TrainerState()
    stops = [record_evaluation(cfg, state, value, epoch) for epoch, value in enumerate(values, start=1)]
    assert stops.index(True) + 1 == stops_at
    assert (state.best_metric, state.best_epoch) == (values[-1], 5)  # a later gain still counts as best
    state = TrainerState()
    for epoch, value in enumerate(values[:stops_at], start=1):
        record_evaluation(cfg, state, value, epoch)
    assert (state.best_metric, state.best_epoch, state.evals_without_gain) == (values[1], 2, 2)


def test_without_patience_training_never_stops_early() -> None:
    state = TrainerState()
    assert not any(record_evaluation(config(), state, 0.5 - i / 10, i) for i in range(1, 6))
    assert state.best_epoch == 1 and state.evals_without_gain == 4


def walks(users: int, items: int, length: int = 10) -> pa.Table:
    """Each user walks the items one at a time from a random start: a next item any model can learn."""
    rng = random.Random(0)
    starts = [rng.randrange(items) for _ in range(users)]
    seqs = [[(s + t) % items + 1 for t in range(length)] for s in starts]
    return pa.table(
        {"train_items": [q[:-2] for q in seqs], "valid_item": pa.array([q[-2] for q in seqs], pa.int32())}
    )


def test_one_epoch_of_a_real_engine_trains_every_batch_and_reports_the_all_reduced_figures(
    process_group: None,
) -> None:
    import deepspeed

    config = load_config(
        TrainConfig, None,
        ["data.path=unused", "model.size=tiny", "train.batch_size=8", "optim.lr=0.01", "optim.warmup_ratio=0",
         "deepspeed.zero_stage=1", "data.group_by_length=0"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config, 30, 12, pa.table({}), None)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(40, 0.0, 0.1))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, 1, on_gpu=False, hidden_size=32), dist_init_required=False,
    )  # fmt: skip
    worker = Worker(
        config, 0, torch.device("cpu"), engine, scheduler, model.config, "unused", {}, 0, None, None, None
    )  # fmt: skip
    rows = walks(64, 30)
    chunks = [rows.slice(i, 8) for i in range(0, 64, 8)]  # 8 batches of 8 users
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_epoch(worker, chunks, 1)
    assert (first["epoch"], first["step"]) == (1, 8)
    assert first["sequences_per_s"] > 0 and first["peak_memory_mb"] > 0 and first["lr"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for epoch in range(2, 6):
        last = train_epoch(worker, chunks, epoch)
    assert last["step"] == 40 and last["loss"] < 0.8 * first["loss"]
