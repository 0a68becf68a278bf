"""Training throughput and memory: a plain PyTorch loop against rayrec on Ray Train + DeepSpeed.

    python benchmarks/train_throughput.py [--users 6040] [--epochs 2] [--memory-items 400000] [--part all]
        (--part throughput | heap | grouping | negatives | memory measures one of them)

Throughput: sequences per second of the MovieLens-1M model config (`--size ml-1m`) on sequences shaped
like MovieLens-1M (6,040 users, 3,706 items, up to 200 items each; `--data` takes a prepared dataset
instead), under (a) a single-process PyTorch loop of the same model, batches and optimizer (no Ray, no
DeepSpeed), as it runs by default and (a') started with the glibc heap settings rayrec gives its CPU
workers (`train.cpu_heap`), and rayrec with (b) 1 worker ZeRO-0, (c) 2 workers ZeRO-2, (d) 2 workers
ZeRO-3. The figure is the last epoch's (the first pays for start-up); evaluation is not timed.

Heap: rayrec with 2 workers under ZeRO-2 and ZeRO-3, each with glibc's heap kept (`train.cpu_heap=keep`)
and with its ZeRO stage's alternative (`glibc`, `release`): sequences per second and peak memory per worker.

Length grouping: rayrec with 2 workers on random batches against batches grouped by history length
(`data.group_by_length=50 train.loss_per=position`), same data and model, their ratio.

Negatives: the SASRec-equivalent model (`configs/pretrain/ml-1m-sasrec.yaml`: width 50, sampled softmax
with 128 uniform negatives, 2 workers x 64) with its negatives drawn once per batch against once per
position (`model.overrides.negatives_per`), same data, their ratio.

Memory: peak memory per worker (resident memory on CPUs, allocated memory on GPUs) of 2 workers
under ZeRO 0, 1, 2 and 3 for a model with a large item table (`--memory-items` rows of width 128),
where parameters, gradients and AdamW states dominate. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rec_train.config import load_config
from rec_train.data.dataset import read_items, read_sequences
from rec_train.model import RecModel, build_config, count_parameters
from rec_train.train.batches import trainable_rows, training_batch
from rec_train.train.config import TrainConfig
from rec_train.train.cpu_heap import KEEP_ENV
from rec_train.train.optim import build_optimizer

SASREC_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "ml-1m-sasrec.yaml"
SEQ_SCHEMA = pa.schema(
    [
        ("user_index", pa.int32()), ("user_id", pa.string()), ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())), ("train_items", pa.list_(pa.int32())),
        ("valid_item", pa.int32()), ("test_item", pa.int32()),
    ]
)  # fmt: skip


def synthetic_dataset(out: Path, users: int, items: int, max_len: int, seed: int = 0) -> str:
    """A prepared dataset (docs/formats.md) with MovieLens-1M-like lengths (20..max_len, long-tailed)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.4, 0.9, users).astype(int), 20, max_len)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    popularity /= popularity.sum()
    rows = []
    for u, n in enumerate(lengths):
        seq = (rng.choice(items, size=n, p=popularity) + 1).astype(np.int32).tolist()
        rows.append(
            {"user_index": u, "user_id": str(u), "items": seq, "timestamps": list(range(n)),
             "train_items": seq[:-2], "valid_item": seq[-2], "test_item": seq[-1]}
        )  # fmt: skip
    (out / "sequences").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SEQ_SCHEMA), out / "sequences" / "part-00000.parquet")
    ids = np.arange(1, items + 1, dtype=np.int32)
    pq.write_table(
        pa.table({"item_index": ids, "item_id": ids.astype(str), "count": np.ones(items, dtype=np.int64),
                  "title": pa.nulls(items, pa.string()), "text": pa.nulls(items, pa.string())}),
        out / "items.parquet",
    )  # fmt: skip
    pq.write_table(pa.table({"user_index": np.arange(users, dtype=np.int32), "user_id": np.arange(users).astype(str)}),
                   out / "users.parquet")  # fmt: skip
    (out / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "kind": "rayrec.dataset", "max_seq_len": max_len, "split": {"kind": "leave_one_out"},
        "counts": {"users": users, "items": items, "events": int(lengths.sum()), "skipped": {}},
        "source": "benchmarks/train_throughput.py", "config": {}, "created": "",
    }))  # fmt: skip
    return str(out)


def plain_pytorch(data: str, config: TrainConfig, epochs: int) -> float:
    """Sequences per second of the last epoch of a single-process loop: same model, batches, AdamW."""
    torch.set_num_threads(os.cpu_count() or 1)
    table = trainable_rows(read_sequences(data), include_valid=False)
    num_items = int(read_items(data)["item_index"].to_numpy().max())
    model = RecModel(build_config(config.model.size, num_items=num_items, **config.model.overrides)).train()
    optimizer = build_optimizer(model, config)
    max_len = model.config.max_seq_len
    rate = 0.0
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(table.num_rows)
        start, seen = time.perf_counter(), 0
        for first in range(0, table.num_rows, config.train.batch_size):
            rows = table.take(order[first : first + config.train.batch_size])
            loss = model(**training_batch(rows, max_len, include_valid=False)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            seen += rows.num_rows
        rate = seen / (time.perf_counter() - start)
    return rate


def plain_pytorch_keep_heap(data: str, args: argparse.Namespace) -> float:
    """`plain_pytorch` in a child process started with the heap rayrec gives its CPU workers by default
    (`train.cpu_heap=keep`, read by glibc at start-up): what the loop itself gains from that heap."""
    command = [sys.executable, __file__, "--part", "plain", "--data", data, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size)]  # fmt: skip
    child = subprocess.run(
        command, env={**os.environ, **KEEP_ENV}, capture_output=True, text=True, check=True
    )
    return json.loads(child.stdout.strip().splitlines()[-1])["plain_pytorch_seq_per_s"]


def rayrec_run(data: str, runs: str, name: str, overrides: list[str]) -> list[dict]:
    """One rayrec training run; returns its per-epoch records."""
    from rec_train.train.launch import launch
    from rec_train.train.run_log import read_metrics

    config = load_config(
        TrainConfig, None, [f"data.path={data}", f"run.storage={runs}", f"run.name={name}", *overrides]
    )
    launch(config, show_progress=False)
    return [r for r in read_metrics(f"{runs}/{name}") if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a prepared dataset (default: synthetic, MovieLens-1M shaped)")
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--memory-items", type=int, default=400_000, help="item rows of the memory model")
    parser.add_argument(
        "--part",
        choices=["all", "throughput", "heap", "grouping", "negatives", "memory", "plain"],
        default="all",
        help="what to measure",
    )
    args = parser.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rayrec-bench-"))
    data = args.data or synthetic_dataset(tmp / "data", args.users, 3706, 200)
    runs = str(tmp / "runs")
    common = [
        "model.size=ml-1m", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        "eval.ks=[10]", "eval.batch_size=512", f"checkpoint.every_epochs={args.epochs}", "checkpoint.keep=1",
        "run.max_failures=0",
    ]  # fmt: skip
    figures: dict[str, object] = {
        "benchmark": "train_throughput", "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "data": args.data or f"synthetic ml-1m shape, {args.users} users", "model": "ml-1m",
        "parameters": count_parameters(build_config("ml-1m"))["total"], "batch_size": args.batch_size,
    }  # fmt: skip
    base = load_config(TrainConfig, None, [f"data.path={data}", *common])
    if args.part == "plain":
        print(json.dumps({"plain_pytorch_seq_per_s": round(plain_pytorch(data, base, args.epochs), 1)}))
        return
    if args.part in ("all", "throughput"):
        figures["plain_pytorch_seq_per_s"] = round(plain_pytorch(data, base, args.epochs), 1)
        figures["plain_pytorch_keep_heap_seq_per_s"] = plain_pytorch_keep_heap(data, args)

    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    setups = {} if args.part not in ("all", "throughput") else {
        "rayrec_1w_zero0": ["scaling.num_workers=1", f"scaling.cpus_per_worker={os.cpu_count() or 1}", "deepspeed.zero_stage=0"],
        "rayrec_2w_zero2": ["scaling.num_workers=2", "deepspeed.zero_stage=2"],
        "rayrec_2w_zero3": ["scaling.num_workers=2", "deepspeed.zero_stage=3"],
    }  # fmt: skip
    if args.part in ("all", "heap"):
        for stage, heaps in ((2, ("glibc", "keep")), (3, ("release", "keep"))):
            for heap in heaps:
                setups[f"rayrec_2w_zero{stage}_heap_{heap}"] = [
                    "scaling.num_workers=2",
                    f"deepspeed.zero_stage={stage}",
                    f"train.cpu_heap={heap}",
                ]
    if args.part in ("all", "grouping"):
        random_batches = ["scaling.num_workers=2", "deepspeed.zero_stage=0", "train.torch_threads=1"]
        setups["rayrec_2w_random_batches"] = random_batches
        setups["rayrec_2w_grouped_by_length"] = [
            *random_batches,
            "data.group_by_length=50",
            "train.loss_per=position",
        ]
    if args.part in ("all", "negatives"):
        sasrec = load_config(TrainConfig, SASREC_CONFIG, [f"data.path={data}"]).model.overrides
        for per in ("batch", "position"):
            setups[f"rayrec_2w_sasrec_negatives_per_{per}"] = [
                "scaling.num_workers=2", "deepspeed.zero_stage=0", "train.torch_threads=1", "train.batch_size=64",
                f"model.overrides={json.dumps({**sasrec, 'negatives_per': per})}",
            ]  # fmt: skip
    for key, extra in setups.items():
        records = rayrec_run(data, runs, key, [*common, *extra])
        figures[f"{key}_seq_per_s"] = round(records[-1]["sequences_per_s"], 1)
        if "_heap_" in key:
            figures[f"{key}_peak_mb"] = round(max(r["peak_memory_mb"] for r in records))
    if args.part in ("all", "throughput"):
        for plain in ("plain_pytorch", "plain_pytorch_keep_heap"):
            figures[f"rayrec_1w_to_{plain}"] = round(
                figures["rayrec_1w_zero0_seq_per_s"] / figures[f"{plain}_seq_per_s"], 2
            )
    if args.part in ("all", "grouping"):
        grouped = figures["rayrec_2w_grouped_by_length_seq_per_s"]
        figures["grouped_to_random_batches"] = round(
            grouped / figures["rayrec_2w_random_batches_seq_per_s"], 2
        )

    if args.part in ("all", "negatives"):
        figures["negatives_per_position_to_batch"] = round(
            figures["rayrec_2w_sasrec_negatives_per_position_seq_per_s"]
            / figures["rayrec_2w_sasrec_negatives_per_batch_seq_per_s"],
            2,
        )

    if args.part in ("all", "memory"):
        memory_model = [
            "model.size=tiny", "eval.batch_size=64",
            "model.overrides={hidden_size: 128, intermediate_size: 256, loss: sampled_softmax, num_negatives: 128}",
        ]  # fmt: skip
        small = synthetic_dataset(tmp / "memory_data", 256, args.memory_items, 20)
        figures["memory_model_parameters"] = count_parameters(
            build_config("tiny", num_items=args.memory_items, hidden_size=128, intermediate_size=256)
        )["total"]
        for stage in (0, 1, 2, 3):
            records = rayrec_run(
                small, runs, f"memory_zero{stage}",
                ["train.epochs=1", "train.batch_size=64", "eval.ks=[10]", "run.max_failures=0", "scaling.num_workers=2",
                 f"deepspeed.zero_stage={stage}", *memory_model],
            )  # fmt: skip
            figures[f"peak_memory_mb_2w_zero{stage}"] = round(records[-1]["peak_memory_mb"])
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
