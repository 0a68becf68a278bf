"""The per-worker training loop that Ray Train runs on every worker, as a recipe of named steps:

    setup -> resume -> per epoch: train_epoch -> evaluate_and_decide -> report (+ checkpoint) -> final_test

`setup` builds the model and its DeepSpeed engine (ZeRO stage from the config); `train_epoch` trains on
this worker's shard of the sequences (`ray.train.get_dataset_shard`); the `Evaluator` ranks this worker's
share of users and merges the figures over workers. On a restart (a failed worker, or the same run started
again) `resume` continues from the latest checkpoint's epoch and step.
"""

from __future__ import annotations

import copy
import random
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import torch
import torch.distributed as dist

from rec_train.data.dataset import read_items
from rec_train.model import RecConfig
from rec_train.train import checkpoint as ckpt
from rec_train.train.batches import grouped_by_length, pointwise_batch, position_share, training_batch
from rec_train.train.config import TrainConfig
from rec_train.train.cpu_heap import configure_heap
from rec_train.train.deepspeed_config import deepspeed_config
from rec_train.train.evaluate import model_scores, pointwise_predictions, rank_split, text_vectors
from rec_train.train.metrics import (
    Catalogue,
    RankingAccumulator,
    check_finite,
    merge_states,
    pointwise_metrics,
    summarise,
)
from rec_train.train.model_init import apply_finetune_policy, build_model
from rec_train.train.optim import build_optimizer, lr_lambda
from rec_train.train.run_log import append_metrics
from rec_train.train.tracking import Tracker, start_tracking


def peak_memory_mb(on_gpu: bool) -> float:
    """Peak accelerator memory allocated on GPUs; peak resident memory of the worker process on CPUs."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Evaluator:
    """Full-ranking metrics and top-K list figures of the engine's weights on this worker's users, merged
    over workers; for a pointwise task, the head's metrics over every worker's predictions (gathered)."""

    def __init__(
        self,
        engine: Any,
        config: TrainConfig,
        max_seq_len: int,
        device: torch.device,
        popularity: dict[str, np.ndarray],
        name: str,
    ) -> None:
        self.engine, self.config, self.max_seq_len, self.device = engine, config, max_seq_len, device
        self.zero3 = config.deepspeed.zero_stage == 3
        self.popularity, self.name = popularity, name
        self.vectors = text_vectors(None, config.data.path) if config.task == "next_item" else None

    def catalogue(self, split: str) -> Catalogue:
        """Training events per item of `split`'s users (the validation targets count for the test)."""
        counts = self.popularity["train"] + (self.popularity["valid"] if split == "test" else 0)
        return Catalogue(torch.from_numpy(counts), self.vectors)

    @torch.no_grad()
    def __call__(self, split: str, prefix: str) -> dict[str, float]:
        import deepspeed

        module = self.engine.module
        module.eval()
        # ZeRO-3 partitions every parameter: gather them once so users can be scored without collectives.
        gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if self.zero3 else nullcontext()
        with gather:
            scorer = _plain_copy(module, self.config) if self.zero3 else module
            rows = ray.train.get_dataset_shard("eval").iter_batches(
                batch_size=self.config.eval.batch_size, batch_format="pyarrow", prefetch_batches=1
            )
            if self.config.task != "next_item":
                threshold = self.config.finetune.click_threshold if self.config.finetune else 0.5
                local = pointwise_predictions(scorer, rows, split, self.config.task, threshold, self.device)
            else:
                catalogue = self.catalogue(split)
                accumulator = RankingAccumulator(self.config.eval.ks, catalogue, self.config.eval.history)
                rank_split(model_scores(scorer, self.device), rows, split, self.max_seq_len, accumulator)
        module.train()
        gathered: list[Any] = [None] * dist.get_world_size()
        if self.config.task != "next_item":
            dist.all_gather_object(gathered, [t.numpy() for t in local])
            logits, targets = (np.concatenate([g[i] for g in gathered]) for i in range(2))
            return pointwise_metrics(logits, targets, self.config.task, prefix=prefix)
        dist.all_gather_object(gathered, accumulator.state())  # ranks and sums: the merge is exact
        state = merge_states(gathered)
        check_finite(state, self.name, split)
        return summarise(state, self.config.eval.ks, catalogue, prefix=prefix)


def _plain_copy(module: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """A copy of a gathered ZeRO-3 module without DeepSpeed's hooks (LoRA merged), for scoring."""
    from rec_train.model import RecModel
    from rec_train.model.peft_utils import load_weights

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    lora = (config.finetune.lora_rank, config.finetune.lora_alpha) if config.finetune is not None else (0, 0)
    plain = RecModel(copy.deepcopy(module.config)).to(next(module.parameters()).device)
    return load_weights(plain, state, *lora).eval()


def _batches(chunks: Iterable[pa.Table], config: TrainConfig, epoch: int) -> Iterator[pa.Table]:
    """Training batches from the shard's chunks of `batch_size * group_by_length` rows (of `batch_size`
    rows when grouping is off). The batch order of a group is drawn from the run's seed, the epoch and the
    chunk, the same on every worker."""
    group, size = config.data.group_by_length, config.train.batch_size
    for index, chunk in enumerate(chunks):
        if not group:
            yield chunk
            continue
        rng = np.random.default_rng([config.train.seed, epoch, index])
        yield from grouped_by_length(chunk, size, config.data.include_valid, rng)


@dataclass
class Worker:
    """Everything one training worker holds for the length of a run (built by `setup`)."""

    config: TrainConfig
    rank: int
    device: torch.device
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any  # the engine's learning-rate scheduler
    model_config: RecConfig
    run_uri: str
    run_info: dict[str, Any]
    seed: int  # this worker's seed: dropout and shuffling differ between workers
    evaluate: Evaluator
    train_shard: Any  # ray.data.DataIterator over this worker's training rows
    tracker: Tracker | None  # rank 0 under run.tracking

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def metric_key(self) -> str:
        return f"{self.config.eval_split}_{self.config.eval.metric}"


def setup(payload: dict[str, Any]) -> Worker:
    """Build the model (the same initial weights on every worker), its optimizer and schedule, and the
    DeepSpeed engine (ZeRO stage from the config); seed this worker."""
    import deepspeed

    config = TrainConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.train.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    heap = configure_heap(config, on_gpu)

    torch.manual_seed(config.train.seed)
    popularity = {k: np.asarray(v, dtype=np.int64) for k, v in payload["popularity"].items()}
    model = build_model(
        config,
        payload["num_items"],
        payload["max_seq_len"],
        read_items(config.data.path),
        payload["init_from"],
        payload["target_mean"],
        popularity["train"] + (popularity["valid"] if config.data.include_valid else 0),
    )
    model_config = model.config
    if config.finetune is not None:
        model = apply_finetune_policy(model, config.finetune)
    parameters = {  # counted before ZeRO-3 partitions them
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(
            config.train.epochs * payload["steps_per_epoch"],
            config.optim.warmup_ratio,
            config.optim.min_lr_ratio,
        ),
    )
    if not on_gpu:
        # DeepSpeed's shared-memory all-reduce op serves only inference all-reduce, yet it is compiled (JIT,
        # minutes) whenever its build cache is cold; gloo carries every collective of training on CPUs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world, on_gpu, model_config.hidden_size), dist_init_required=False,
    )  # fmt: skip
    seed = config.train.seed + 1000 * rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    run_uri = payload["run_uri"]
    evaluate = Evaluator(
        engine, config, model_config.max_seq_len, device, popularity, f"the model of run {run_uri}"
    )
    run_info = {
        "config": payload["config"], "init_from": payload["init_from"], "run": run_uri, "parameters": parameters,
        "cpu_heap": heap,
    }  # fmt: skip
    shard = ray.train.get_dataset_shard("train")
    tracker = start_tracking(config, run_uri, run_uri.rstrip("/").rsplit("/", 1)[-1], rank)
    return Worker(
        config,
        rank,
        device,
        engine,
        scheduler,
        model_config,
        run_uri,
        run_info,
        seed,
        evaluate,
        shard,
        tracker,
    )


def resume(worker: Worker) -> ckpt.TrainerState:
    """The state of Ray Train's latest checkpoint (a failed worker, or the same run started again), or a
    fresh one; rank 0 drops the metrics.jsonl records of epochs after it and records the (re)start with
    the model's parameter counts (all, and those that train)."""
    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.restore(worker.engine, Path(d), worker.rank)
    if worker.rank == 0:
        event = {
            "event": "resumed" if resumed is not None else "started",
            "epoch": state.epoch,
            "step": state.step,
            **worker.run_info.get("parameters", {}),
            "cpu_heap": worker.run_info["cpu_heap"],
        }
        append_metrics(worker.run_uri, [event], keep_through_epoch=state.epoch)
    return state


def train_epoch(worker: Worker, chunks: Iterable[pa.Table], epoch: int) -> dict[str, Any]:
    """One pass over this worker's training chunks; the loss, speed and peak memory all-reduced over workers."""
    config, engine, device = worker.config, worker.engine, worker.device
    size, max_seq_len = config.train.batch_size, worker.model_config.max_seq_len
    start, loss_sum, micro_batches, sequences = time.perf_counter(), torch.zeros((), device=device), 0, 0
    for rows in _batches(chunks, config, epoch):
        if config.task == "next_item":
            batch = training_batch(rows, max_seq_len, config.data.include_valid)
        else:
            batch = pointwise_batch(
                rows, max_seq_len, config.data.include_valid, config.task, config.finetune.click_threshold
            )
        weight = position_share(batch, size, max_seq_len) if config.train.loss_per == "position" else 1.0
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss * weight)
        engine.step()
        loss_sum += loss.detach().float()
        micro_batches += 1
        sequences += rows.num_rows
    seconds = time.perf_counter() - start
    totals = torch.tensor([loss_sum.item(), micro_batches, sequences], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    peak = torch.tensor([peak_memory_mb(worker.on_gpu)], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the most any worker used
    return {
        "epoch": epoch, "step": engine.global_steps, "loss": totals[0].item() / max(1.0, totals[1].item()),
        "sequences_per_s": totals[2].item() / seconds, "train_s": seconds,
        "lr": worker.scheduler.get_last_lr()[0], "peak_memory_mb": peak.item(),
    }  # fmt: skip


def epoch_chunks(worker: Worker, epoch: int) -> Iterable[pa.Table]:
    """This worker's shard of the training rows for `epoch`, in chunks of `batch_size * group_by_length`."""
    config = worker.config
    return worker.train_shard.iter_batches(
        batch_size=config.train.batch_size * max(1, config.data.group_by_length), batch_format="pyarrow",
        prefetch_batches=2, local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        local_shuffle_seed=worker.seed + epoch if config.data.shuffle_buffer else None,
    )  # fmt: skip


def due(config: TrainConfig, epoch: int) -> tuple[bool, bool]:
    """(save a checkpoint, evaluate) after `epoch`: the last epoch always does both."""
    save = epoch >= config.train.epochs or epoch % config.checkpoint.every_epochs == 0
    return save, save or epoch % config.eval.every_epochs == 0


def record_evaluation(config: TrainConfig, state: ckpt.TrainerState, value: float, epoch: int) -> bool:
    """Keep the best validation figure in `state`; True when patience has run out (stop early). Higher is
    better, or lower for rmse, mae and logloss (`config.metric_order`)."""
    sign = config.metric_sign
    if state.best_metric is None or sign * value > sign * state.best_metric:
        state.best_metric, state.best_epoch, state.evals_without_gain = value, epoch, 0
    else:
        state.evals_without_gain += 1
    return config.eval.patience is not None and state.evals_without_gain >= config.eval.patience


def evaluate_and_decide(
    worker: Worker, state: ckpt.TrainerState, metrics: dict[str, Any]
) -> tuple[bool, bool]:
    """Evaluate when due (into `metrics`) and decide: (save a checkpoint, stop). Test targets never choose
    a model: with `data.include_valid` no early stopping."""
    config, epoch = worker.config, metrics["epoch"]
    save, evaluate = due(config, epoch)
    stop = epoch >= config.train.epochs
    if evaluate:
        eval_start = time.perf_counter()
        metrics.update(worker.evaluate(config.eval_split, f"{config.eval_split}_"))
        metrics["eval_s"] = time.perf_counter() - eval_start
        if not config.data.include_valid and record_evaluation(
            config, state, metrics[worker.metric_key], epoch
        ):
            metrics["early_stopped"] = True
            save = stop = True
    return save, stop


def report(worker: Worker, state: ckpt.TrainerState, metrics: dict[str, Any], save: bool) -> None:
    """Report the epoch to Ray Train (with a checkpoint of every worker's shards when `save`); rank 0
    appends it to metrics.jsonl."""
    state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if save:
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            ckpt.save(worker.engine, Path(tmp), state, worker.rank, worker.model_config, worker.run_info)
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)
    if worker.rank == 0:
        append_metrics(worker.run_uri, [metrics])
    if worker.tracker is not None:
        worker.tracker.log(metrics, metrics["epoch"])


def final_test(worker: Worker, state: ckpt.TrainerState) -> None:
    """Test metrics of the best validation checkpoint (the latest one when training on validation, whose
    test metrics were computed when it was saved), reported and recorded as the run's `final` line."""
    config, key = worker.config, worker.metric_key
    reported = ray.train.get_all_reported_checkpoints()
    if config.data.include_valid:
        chosen = max(reported, key=lambda r: r.metrics["epoch"])
        final = {"final": True, "epoch": state.epoch, "best_epoch": chosen.metrics["epoch"]}
        final.update({k: v for k, v in chosen.metrics.items() if k.startswith("test_")})
    else:
        chosen = max(reported, key=lambda r: (config.metric_sign * r.metrics[key], -r.metrics["epoch"]))
        with chosen.checkpoint.as_directory() as d:
            ckpt.restore(worker.engine, Path(d), worker.rank, rng=False)
        final = {"final": True, "epoch": state.epoch, "best_epoch": chosen.metrics["epoch"]}
        final.update(worker.evaluate("test", "test_"))
        final[key] = chosen.metrics[key]
    ray.train.report(final)
    if worker.rank == 0:
        append_metrics(worker.run_uri, [final])
    if worker.tracker is not None:
        worker.tracker.log({k: v for k, v in final.items() if k != "epoch"}, state.epoch)
        worker.tracker.close()


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """What Ray Train runs on every worker: setup, resume, then per epoch train, evaluate and decide,
    report (and checkpoint); last, the test metrics of the chosen checkpoint."""
    worker = setup(payload)
    state = resume(worker)
    stop = state.epoch >= worker.config.train.epochs
    while not stop:
        epoch = state.epoch + 1
        metrics = train_epoch(worker, epoch_chunks(worker, epoch), epoch)
        state.epoch, state.step = epoch, metrics["step"]
        save, stop = evaluate_and_decide(worker, state, metrics)
        report(worker, state, metrics, save)
    final_test(worker, state)
