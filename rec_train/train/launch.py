"""`rec-train pretrain` and `rec-train finetune`: a Ray Train `TorchTrainer` running train/loop.py.

    rec-train pretrain --config configs/pretrain/ml-1m.yaml [key=value ...] [--init-from MODEL]
    rec-train finetune --from MODEL --config configs/finetune/X.yaml [key=value ...]

The scaling, run storage (local or S3), failure handling and checkpoint policy all come from the one
`TrainConfig`. The same command with the same `run.name` resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import posixpath
import re
import threading
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rec_train import storage
from rec_train.config import ConfigError, load_config
from rec_train.errors import DataError, RayrecError
from rec_train.ray_session import init_ray, worker_runtime_env
from rec_train.train.batches import item_events, task_columns, trainable_rows
from rec_train.train.config import FinetuneSection, TrainConfig
from rec_train.train.cpu_heap import heap_env
from rec_train.train.run_log import read_metrics


def _data_config():
    from ray.train import DataConfig

    class RecDataConfig(DataConfig):
        """Training rows split equally (every worker takes the same number of steps); evaluation users
        split without dropping any (the all-reduced metrics cover every user exactly once)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if "eval" not in datasets:  # Ray Train configures one dataset at a time
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            return [{"eval": split} for split in datasets["eval"].streaming_split(world_size, equal=False)]

    return RecDataConfig()


def _progress(run_uri: str, epochs: int, done: threading.Event) -> None:
    """A progress bar on the driver, following the run's metrics.jsonl."""
    from tqdm import tqdm

    bar = tqdm(total=epochs, desc="epochs", unit="epoch", dynamic_ncols=True)
    while not done.wait(2.0):
        try:
            records = read_metrics(run_uri)
        except storage.StorageError:  # being written
            continue
        trained = [r for r in records if "loss" in r]
        if trained:
            last = trained[-1]
            bar.n = last["epoch"]
            bar.set_postfix(
                {
                    k: round(v, 4)
                    for k, v in last.items()
                    if k in ("loss", "sequences_per_s") or re.fullmatch(r"\w+_ndcg@\d+", k)
                }
            )
            bar.refresh()
    bar.close()


def _target_sums(rows: pa.Table, task: str, click_threshold: float) -> pa.Table:
    values = pc.list_flatten(rows["values"]).to_numpy(zero_copy_only=False).astype(np.float64)
    values = values[np.isfinite(values)]
    targets = values if task == "rating" else (values >= click_threshold).astype(np.float64)
    return pa.table({"total": [float(targets.sum())], "count": [len(targets)]})


def _split_events(rows: pa.Table, num_items: int) -> pa.Table:
    train = item_events(rows, num_items, include_valid=False)
    valid = item_events(rows, num_items, include_valid=True) - train
    return pa.table(
        {"train": pa.array([train], pa.list_(pa.int64())), "valid": pa.array([valid], pa.list_(pa.int64()))}
    )


def training_popularity(sequences: Any, num_items: int) -> dict[str, np.ndarray]:
    """Events per item [num_items + 1] over a Ray dataset of sequences: `train` counts the training
    items, `valid` the validation targets; test targets are never counted (a run must not learn them)."""
    blocks = (
        sequences.select_columns(["train_items", "valid_item"])
        .map_batches(_split_events, fn_kwargs={"num_items": num_items}, batch_format="pyarrow")
        .to_arrow_refs()
    )
    import ray

    total = {"train": np.zeros(num_items + 1, np.int64), "valid": np.zeros(num_items + 1, np.int64)}
    for table in ray.get(blocks):
        for name in total:  # one [num_items + 1] list per block: sum them without Python lists
            total[name] += table[name].combine_chunks().flatten().to_numpy().reshape(-1, num_items + 1).sum(0)
    return total


def target_mean(sequences: Any, config: TrainConfig) -> float:
    """The mean rating (or click rate) over the events of a Ray dataset of sequences; a clear error when
    the dataset has no values."""
    assert config.finetune is not None
    sums = sequences.map_batches(
        _target_sums, fn_kwargs={"task": config.task, "click_threshold": config.finetune.click_threshold},
        batch_format="pyarrow",
    ).to_pandas()  # fmt: skip
    count = int(sums["count"].sum())
    if count == 0:
        raise DataError(
            f"{config.data.path}: no event has a value, but finetune.task={config.task} learns from them; "
            "prepare it with the events' value column named (`rec-train prepare ... columns.value=rating`; "
            "MovieLens ratings are read as values)"
        )
    return float(sums["total"].sum()) / count


def training_window(
    config: TrainConfig, num_items: int, max_seq_len: int | None, init_from: str | None
) -> int | None:
    """Under `data.windows=all`, the max_seq_len of the model that will train (older items train in
    windows of it); None under `last`."""
    from rec_train.train.model_init import fresh_model_config
    from rec_train.train.saved_model import model_max_seq_len

    if config.data.windows == "last":
        return None
    if init_from is not None:
        return model_max_seq_len(init_from)
    return fresh_model_config(config, num_items, max_seq_len).max_seq_len


def check_pointwise_encoder(config: TrainConfig, init_from: str) -> None:
    """A rating or click head scores the event after each position from the history before it, which a
    bidirectional encoder (BERT, trained on masked items) cannot give: a `ConfigError` before Ray starts."""
    from rec_train.model.configuration import CAUSAL_ENCODERS
    from rec_train.train.saved_model import saved_config

    encoder = saved_config(init_from).get("encoder", "llama")
    if encoder not in CAUSAL_ENCODERS:
        raise ConfigError(
            f"finetune.task={config.task} needs a causal encoder, but {init_from} has a bidirectional {encoder!r} "
            f"one: fine-tune it for next items (finetune.task=next_item), or start from a model with one of "
            f"{', '.join(CAUSAL_ENCODERS)} (model.backbone: a Llama, Qwen2 or GPT-2 checkpoint)"
        )


def check_memory(config: TrainConfig, num_items: int, max_seq_len: int | None, init_from: str | None) -> None:
    """Refuse, before any data is read, a run on CPU workers whose weights, gradients and AdamW state alone
    cannot fit the memory a worker can have on this cluster (`rec_train/train/memory.py`)."""
    import ray

    from rec_train.model import RecConfig
    from rec_train.model.sizes import count_parameters
    from rec_train.train.memory import check_fits, worker_budget
    from rec_train.train.model_init import fresh_model_config
    from rec_train.train.saved_model import saved_config

    if init_from is None:
        model_config, what = (
            fresh_model_config(config, num_items, max_seq_len),
            f"model.size={config.model.size}",
        )
    else:
        saved = saved_config(init_from)
        model_config = RecConfig.from_dict({**saved, "num_items": max(num_items, int(saved["num_items"]))})
        what = init_from
    parameters = count_parameters(model_config)["total"]
    finetune = config.finetune
    full = finetune is None or (finetune.lora_rank == 0 and finetune.freeze == "none")
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    workers = config.scaling.num_workers
    budget = worker_budget(nodes, workers, config.scaling.cpus_per_worker)
    check_fits(parameters, parameters if full else 0, config.deepspeed.zero_stage, workers, budget, what)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with its local paths (data, backbone, item tower, TensorBoard folder) made absolute where
    the command runs: Ray Train workers run in another directory. URIs and "minilm" stay as they are."""
    from rec_train.model.text import MINILM_NAMES

    def checkpoint(path: str | None) -> str | None:
        return path if path is None or path.lower() in MINILM_NAMES else storage.resolve(path).uri

    backbone, item_tower, run = (
        checkpoint(config.model.backbone),
        checkpoint(config.model.item_tower),
        config.run,
    )
    if run.tracking == "tensorboard" and run.tracking_uri is not None:
        run = run.model_copy(update={"tracking_uri": storage.resolve(run.tracking_uri).uri})
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"path": storage.resolve(config.data.path).uri}),
            "model": config.model.model_copy(update={"backbone": backbone, "item_tower": item_tower}),
            "run": run,
        }
    )


def launch(config: TrainConfig, init_from: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run training on Ray (starting a local Ray when none is running); returns the run's figures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rec_train.data.dataset import load_manifest, ray_dataset, read_items
    from rec_train.train.loop import train_loop_per_worker

    for key in ("backbone", "item_tower"):
        if init_from is not None and getattr(config.model, key) is not None:
            raise ConfigError(
                f"model.{key}={getattr(config.model, key)!r} starts a new model, but --init-from {init_from} "
                "continues one: drop one of them"
            )
    config, init_from = absolute_paths(config), init_from and storage.resolve(init_from).uri
    if init_from is not None and config.task != "next_item":
        check_pointwise_encoder(config, init_from)
    manifest = load_manifest(config.data.path)
    num_items = int(read_items(config.data.path)["item_index"].to_numpy().max())
    max_seq_len = config.model.max_seq_len or manifest.get("max_seq_len")  # None: the model size's
    workers = config.scaling.num_workers

    name = (
        config.run.name
        or f"{'finetune' if config.finetune else 'pretrain'}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    )
    runs = storage.resolve(config.run.storage)
    run_uri = runs.join(name).uri
    needed = math.ceil(workers * config.scaling.cpus_per_worker) + 1  # the workers plus Ray Data's read tasks
    init_ray(num_cpus=max(os.cpu_count() or 1, needed), log_to_driver=True)
    if not config.scaling.use_gpu:
        check_memory(config, num_items, max_seq_len, init_from)

    include_valid = config.data.include_valid
    columns = task_columns(config.task)
    window = training_window(config, num_items, max_seq_len, init_from)
    train = ray_dataset(config.data.path, columns=columns).map_batches(
        lambda t: trainable_rows(t, include_valid, window), batch_format="pyarrow", zero_copy_batch=True
    )
    evaluation = ray_dataset(config.data.path, columns=columns)
    if config.data.cache:  # read once: later epochs iterate blocks already in the object store
        train, evaluation = train.materialize(), evaluation.materialize()
    rows = train.count() if window else int(manifest["counts"]["users"])  # windows: counted in one pass
    steps_per_epoch = max(1, math.ceil(rows / workers / config.train.batch_size / config.train.grad_accum))
    score = "epoch" if include_valid else f"{config.eval_split}_{config.eval.metric}"
    order = "max" if include_valid else config.metric_order  # rmse, mae and logloss: lower is better
    resources = {"CPU": config.scaling.cpus_per_worker, **config.scaling.resources_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"), "init_from": init_from, "run_uri": run_uri,
            "num_items": num_items, "max_seq_len": max_seq_len, "steps_per_epoch": steps_per_epoch,
            "target_mean": target_mean(train, config) if config.task != "next_item" else None,
            "popularity": training_popularity(evaluation, num_items),
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=runs.path,
            storage_filesystem=runs.fs if runs.is_s3 else None,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint.keep, checkpoint_score_attribute=score,
                checkpoint_score_order=order,
            ),
            worker_runtime_env=worker_runtime_env(heap_env(config, config.scaling.use_gpu)),
        ),
        datasets={"train": train, "eval": evaluation},
        dataset_config=_data_config(),
    )  # fmt: skip
    done = threading.Event()
    bar = threading.Thread(target=_progress, args=(run_uri, config.train.epochs, done), daemon=True)
    if show_progress:
        bar.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        if show_progress:
            bar.join()
    if result.error is not None:
        raise RayrecError(f"training run {run_uri} failed: {result.error}")
    kept = [c.path for c, _ in result.best_checkpoints or []]
    if result.checkpoint is not None:
        kept.append(result.checkpoint.path)
    remove_unregistered_checkpoints(runs.join(name), kept)
    return summary(run_uri, result.get_best_checkpoint(score, order), runs.is_s3)


def remove_unregistered_checkpoints(run: storage.Location, kept: list[str]) -> None:
    """Delete the run's checkpoint folders that Ray Train does not keep (`kept`: its best checkpoints and its
    latest): those a failed attempt finished uploading before the controller registered them, so that
    `checkpoint.keep` holds after a failure too. Called once the run has ended."""
    keep = {posixpath.basename(path.rstrip("/")) for path in kept}
    stale = [d for d in storage.list_dirs(run) if d.startswith("checkpoint_") and d not in keep]
    for folder in stale:
        storage.delete_dir(run.join(folder))


def summary(run_uri: str, best: Any, is_s3: bool) -> dict[str, Any]:
    """The run's figures: the parameter counts, last epoch's loss and speed, the best checkpoint and its
    test metrics."""
    records = read_metrics(run_uri)
    epochs = [r for r in records if "loss" in r]
    final = next((r for r in reversed(records) if r.get("final")), {})
    out: dict[str, Any] = {
        "run": run_uri,
        "checkpoint": ("s3://" if is_s3 else "") + best.path if best else None,
    }
    started = [r for r in records if "trainable_parameters" in r]
    if started:
        out.update({k: started[-1][k] for k in ("parameters", "trainable_parameters")})
    if epochs:
        out.update({k: epochs[-1][k] for k in ("epoch", "step", "loss", "sequences_per_s")})
        out["resumed"] = sum(1 for r in records if r.get("event") == "resumed")
    out.update({k: v for k, v in final.items() if k not in ("final", "epoch", "time")})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/pretrain or configs/finetune")
    parser.add_argument(
        "--init-from", "--from", dest="init_from",
        help="exported model or checkpoint to start from (continued pre-training; required by finetune)",
    )  # fmt: skip
    parser.add_argument("--name", help="run name (overrides run.name); the same name resumes that run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3"
    )


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"run.name={args.name}"] if args.name else [])
    config = load_config(TrainConfig, args.config, overrides)
    if args.command == "finetune":
        if not args.init_from:
            raise RayrecError("rec-train finetune needs --from MODEL (an exported model or a checkpoint)")
        if config.finetune is None:
            config.finetune = FinetuneSection()
    elif config.finetune is not None:
        raise RayrecError(
            f"{args.config} has a finetune section: run it with `rec-train finetune --from MODEL`"
        )
    print(json.dumps(launch(config, args.init_from, show_progress=not args.no_progress)))
    return 0
