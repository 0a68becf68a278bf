"""The per-worker training loop that Ray Train runs on every worker.

Each worker builds the model, wraps it in a DeepSpeed engine (ZeRO stage from the config), reads its
shard of the sequences with `ray.train.get_dataset_shard`, builds batches, trains, evaluates its share
of users (all-reduced), and reports metrics and checkpoints. On a restart (a failed worker, or the same
run started again) it continues from the latest checkpoint's epoch and step.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import torch
import torch.distributed as dist

from rec_train import storage
from rec_train.data.dataset import read_items
from rec_train.train import checkpoint as ckpt
from rec_train.train.batches import grouped_by_length, pointwise_batch, position_share, training_batch
from rec_train.train.config import TrainConfig
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

METRICS_FILE = "metrics.jsonl"


def append_metrics(
    run_uri: str, records: list[dict[str, Any]], keep_through_epoch: int | None = None
) -> None:
    """Append lines to the run's metrics.jsonl; `keep_through_epoch` first drops lines of later epochs
    (trained before a failure, then trained again from the checkpoint)."""
    kept = read_metrics(run_uri)
    if keep_through_epoch is not None:
        kept = [r for r in kept if r.get("epoch", 0) <= keep_through_epoch]
    lines = [json.dumps(r, sort_keys=True) for r in [*kept, *records]]
    storage.write_text(storage.resolve(run_uri).join(METRICS_FILE), "\n".join(lines) + "\n")


def peak_memory_mb(on_gpu: bool) -> float:
    """Peak accelerator memory allocated on GPUs; peak resident memory of the worker process on CPUs."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (epochs, resume events, the final test metrics)."""
    loc = storage.resolve(run_uri).join(METRICS_FILE)
    if not storage.exists(loc):
        return []
    return [json.loads(line) for line in storage.read_text(loc).splitlines() if line.strip()]


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
    from rec_train.train.model_init import merge_lora

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if config.finetune is not None and config.finetune.lora_rank:
        state = merge_lora(state, config.finetune.lora_alpha / config.finetune.lora_rank)
    plain = RecModel(copy.deepcopy(module.config)).to(next(module.parameters()).device)
    plain.load_state_dict(state)
    return plain.eval()


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


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import deepspeed

    config = TrainConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.train.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    # ---- model, engine --------------------------------------------------------------------------
    torch.manual_seed(config.train.seed)  # the same initial weights on every worker
    items = read_items(config.data.path)
    model = build_model(
        config,
        payload["num_items"],
        payload["max_seq_len"],
        items,
        payload["init_from"],
        payload["target_mean"],
        payload["popularity"]["train"] + (payload["popularity"]["valid"] if config.data.include_valid else 0),
    )
    model_config = model.config
    if config.finetune is not None:
        model = apply_finetune_policy(model, config.finetune)
    total_steps = config.train.epochs * payload["steps_per_epoch"]
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio)
    )
    if not on_gpu:
        # DeepSpeed's shared-memory all-reduce op serves only inference all-reduce, yet it is compiled (JIT,
        # minutes) whenever its build cache is cold; gloo carries every collective of training on CPUs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world, on_gpu), dist_init_required=False,
    )  # fmt: skip
    seed = config.train.seed + 1000 * rank  # dropout, shuffling: different on each worker
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    run_uri = payload["run_uri"]
    run_info = {"config": payload["config"], "init_from": payload["init_from"], "run": run_uri}
    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.restore(engine, Path(d), rank)
    if rank == 0:  # records of epochs after the checkpoint (or of an attempt without one) are dropped
        event = {
            "event": "resumed" if resumed is not None else "started",
            "epoch": state.epoch,
            "step": state.step,
        }
        append_metrics(run_uri, [event], keep_through_epoch=state.epoch)

    max_seq_len = model_config.max_seq_len
    popularity = {k: np.asarray(v, dtype=np.int64) for k, v in payload["popularity"].items()}
    evaluate = Evaluator(engine, config, max_seq_len, device, popularity, f"the model of run {run_uri}")
    split = config.eval_split
    metric_key = f"{split}_{config.eval.metric}"
    sign = 1 if config.metric_order == "max" else -1  # higher is better, or lower (rmse, mae, logloss)
    train_shard = ray.train.get_dataset_shard("train")

    # ---- epochs ---------------------------------------------------------------------------------
    stop = state.epoch >= config.train.epochs
    while not stop:
        epoch = state.epoch + 1
        start, loss_sum, micro_batches, sequences = time.perf_counter(), torch.zeros((), device=device), 0, 0
        size, group = config.train.batch_size, config.data.group_by_length
        chunks = train_shard.iter_batches(
            batch_size=size * max(1, group), batch_format="pyarrow", prefetch_batches=2,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=seed + epoch if config.data.shuffle_buffer else None,
        )  # fmt: skip
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
        peak = torch.tensor([peak_memory_mb(on_gpu)], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the most any worker used
        state.epoch, state.step = epoch, engine.global_steps
        metrics: dict[str, Any] = {
            "epoch": epoch, "step": state.step, "loss": totals[0].item() / max(1.0, totals[1].item()),
            "sequences_per_s": totals[2].item() / seconds, "train_s": seconds, "lr": scheduler.get_last_lr()[0],
            "peak_memory_mb": peak.item(),
        }  # fmt: skip

        last = epoch >= config.train.epochs
        save = last or epoch % config.checkpoint.every_epochs == 0
        if save or epoch % config.eval.every_epochs == 0:
            eval_start = time.perf_counter()
            metrics.update(evaluate(split, f"{split}_"))
            metrics["eval_s"] = time.perf_counter() - eval_start
            if not config.data.include_valid:  # test targets never choose a model
                value = metrics[metric_key]
                if state.best_metric is None or sign * value > sign * state.best_metric:
                    state.best_metric, state.best_epoch, state.evals_without_gain = value, epoch, 0
                else:
                    state.evals_without_gain += 1
                if config.eval.patience is not None and state.evals_without_gain >= config.eval.patience:
                    metrics["early_stopped"] = True
                    save = last = True
        state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        stop = last

        if save:
            with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
                ckpt.save(engine, Path(tmp), state, rank, model_config, run_info)
                dist.barrier()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if rank == 0:
            append_metrics(run_uri, [metrics])

    # ---- test metrics of the best validation checkpoint (the last one when training on validation) -------
    reported = ray.train.get_all_reported_checkpoints()
    if config.data.include_valid:  # the latest checkpoint: its test metrics were computed when it was saved
        chosen = max(reported, key=lambda r: r.metrics["epoch"])
        final = {"final": True, "epoch": state.epoch, "best_epoch": chosen.metrics["epoch"]}
        final.update({k: v for k, v in chosen.metrics.items() if k.startswith("test_")})
    else:
        chosen = max(reported, key=lambda r: (sign * r.metrics[metric_key], -r.metrics["epoch"]))
        with chosen.checkpoint.as_directory() as d:
            ckpt.restore(engine, Path(d), rank, rng=False)
        final = {"final": True, "epoch": state.epoch, "best_epoch": chosen.metrics["epoch"]}
        final.update(evaluate("test", "test_"))
        final[metric_key] = chosen.metrics[metric_key]
    ray.train.report(final)
    if rank == 0:
        append_metrics(run_uri, [final])
