"""Cold-start items: a share of the catalogue held out of training altogether, then recommended from text.

    python benchmarks/cold_start.py DATA_DIR --name NAME [--config configs/pretrain/ml-1m.yaml]
        [--fraction 0.2] [--split-seed 0] [--seeds 0 1 2] [--time-budget-min N] [--max-seq-len N]
        [--work-dir runs/cold] [--out runs/cold.jsonl] [key=value ...]

DATA_DIR is what `benchmarks/quality.py` reads (a raw MovieLens or Amazon folder, or a prepared dataset).
`--fraction` of its items, drawn with `--split-seed`, are cold: every event of theirs is removed from
every user's sequence except a user's last one, so no training row, validation target or history
contains them and they are only ever test targets; leave-one-out is then taken on what is left (the
validation target is the last warm event before the test). The derived dataset is written once under
the work dir (`<dataset>-cold<percent>-split<seed>`, with `cold_items.json`) and reused.

Each seed trains the config under the strict protocol (`rec-train pretrain` through quality.py: the
validation target picks the checkpoint) and the chosen checkpoint is evaluated by rayrec's evaluator,
history excluded, on three groups:

- `cold_full`: users whose test item is cold, ranked over the full catalogue;
- `cold_only`: the same users, ranked among the cold items only;
- `warm_full`: the other users, over the full catalogue (what holding the items out costs them).

Beside each run, on the same users: `popularity` (events per item in the training data: a cold item has
none) and `content` (the cosine between an item's all-MiniLM-L6-v2 text vector and the mean of the
text vectors of the user's history; no training). `--name` labels the model in the lines (e.g. `text`,
`id`, `id+text`); the overrides say what it is (e.g. model.overrides.item_representation=text).
Prints one JSON line per seed and appends it to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import quality
import torch
import torch.nn.functional as F

from rec_train.config import load_config
from rec_train.data.dataset import MANIFEST, load_manifest, read_items, read_sequences
from rec_train.errors import RayrecError
from rec_train.model.text import EMBEDDINGS_FILE, embed_items, read_item_text_embeddings
from rec_train.train.batches import trainable_rows
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import ScoreFn, model_scores, popularity_scores, rank_split, split_popularity
from rec_train.train.launch import training_window
from rec_train.train.metrics import Catalogue, RankingAccumulator, summarise
from rec_train.train.saved_model import load_model

ALIGNED = ("items", "timestamps", "values", "event_types")  # per-event lists, in the order of `items`
COLD_FILE = "cold_items.json"


def draw_cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted item indices (1..num_items) of the held-out share."""
    count = round(fraction * num_items)
    if not 0 < count < num_items:
        raise RayrecError(
            f"--fraction {fraction} of {num_items} items holds out {count}: choose one in (0, 1)"
        )
    return np.sort(np.random.default_rng(seed).choice(np.arange(1, num_items + 1), size=count, replace=False))


def without_cold(sequences: pa.Table, cold: np.ndarray) -> tuple[pa.Table, int]:
    """(sequences with every cold event removed but each user's last, re-split leave-one-out; the number of
    users dropped for lack of 2 warm events before the last)."""
    is_cold = np.zeros(int(max(cold.max(), pa.compute.max(sequences["test_item"]).as_py() or 0)) + 1, bool)
    is_cold[cold] = True
    columns: dict[str, list[Any]] = {name: [] for name in sequences.column_names}
    dropped = 0
    for row in sequences.to_pylist():
        items = row["items"]
        keep = [j for j, item in enumerate(items) if j == len(items) - 1 or not is_cold[item]]
        if len(keep) < 3:
            dropped += 1
            continue
        for name in ALIGNED:
            if row.get(name) is not None and len(row[name]) == len(items):
                row[name] = [row[name][j] for j in keep]
        kept = row["items"]
        row["train_items"], row["valid_item"], row["test_item"] = kept[:-2], kept[-2], kept[-1]
        values = row.get("values")
        if values is not None and len(values) == len(kept):
            row["valid_value"], row["test_value"] = values[-2], values[-1]
        for name, value in row.items():
            columns[name].append(value)
    return pa.table(columns, schema=sequences.schema), dropped


def cold_dataset(data: str, fraction: float, seed: int, work: Path) -> tuple[str, np.ndarray, dict[str, Any]]:
    """(the derived dataset's folder, its cold item indices, its summary), written on the first call."""
    name = f"{Path(data).name}-cold{round(fraction * 100)}-split{seed}"
    out = work / "data" / name
    if (out / MANIFEST).exists():
        info = json.loads((out / COLD_FILE).read_text())
        return str(out), np.array(info["items"]), info["summary"]
    items = read_items(data)
    num_items = int(pa.compute.max(items["item_index"]).as_py())
    cold = draw_cold_items(num_items, fraction, seed)
    sequences = read_sequences(data)
    derived, dropped = without_cold(sequences, cold)
    if out.exists():
        shutil.rmtree(out)
    (out / "sequences").mkdir(parents=True)
    pq.write_table(derived, out / "sequences" / "part-00000-0.parquet")
    flat = pa.compute.list_flatten(derived["items"]).to_numpy().astype(np.int64)
    counts = np.bincount(flat, minlength=num_items + 1)
    order = items["item_index"].to_numpy()
    items = items.set_column(
        items.schema.get_field_index("count"), "count", pa.array(counts[order], pa.int64())
    )
    pq.write_table(items, out / "items.parquet")
    for extra in ("users.parquet", EMBEDDINGS_FILE):
        if (Path(data) / extra).exists():
            shutil.copy2(Path(data) / extra, out / extra)
    cold_set = set(cold.tolist())
    summary = {
        "base": data,
        "fraction": fraction,
        "split_seed": seed,
        "cold_items": len(cold),
        "users": derived.num_rows,
        "users_dropped": dropped,
        "cold_test_users": sum(t in cold_set for t in derived["test_item"].to_pylist()),
        "events": int(len(flat)),
        "events_removed": int(pa.compute.sum(pa.compute.list_value_length(sequences["items"])).as_py())
        - int(len(flat)),
    }
    (out / COLD_FILE).write_text(json.dumps({"items": cold.tolist(), "summary": summary}))
    manifest = load_manifest(data)
    manifest["counts"] = {**manifest["counts"], "events": summary["events"], "users": derived.num_rows}
    manifest["cold_start"] = {k: v for k, v in summary.items() if k != "base"}
    (out / MANIFEST).write_text(json.dumps(manifest))  # last: the folder is a dataset from now on
    return str(out), cold, summary


def content_scores(unit: torch.Tensor) -> ScoreFn:
    """Cosine between each item's text vector and the mean text vector of the user's history (unit [N + 1, d],
    zero row for padding)."""

    def score(batch: Any) -> torch.Tensor:
        mask = batch.attention_mask.float()[..., None]  # [B, L, 1]
        history = (unit[batch.input_ids] * mask).sum(dim=1)  # [B, d]
        return F.normalize(history, dim=-1) @ unit.T  # [B, N + 1]

    return score


def among(score: ScoreFn, candidates: torch.Tensor) -> ScoreFn:
    """`score` with every item outside `candidates` [N + 1] (bool) at the lowest finite float, so no such
    item outranks a candidate (-inf would mark the users' scores as broken)."""
    low = torch.finfo(torch.float32).min

    def masked(batch: Any) -> torch.Tensor:
        return score(batch).float().masked_fill(~candidates, low)

    return masked


def group_figures(
    score: ScoreFn, groups: dict[str, tuple[pa.Table, torch.Tensor | None]], catalogue: Catalogue,
    ks: list[int], max_len: int, batch_size: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """HR@K, NDCG@K, MRR and users of each group (its users, its candidates or None for all)."""
    out = {}
    for name, (rows, candidates) in groups.items():
        fn = score if candidates is None else among(score, candidates)
        accumulator = RankingAccumulator(ks, catalogue, "exclude")
        rank_split(fn, rows.to_batches(batch_size), "test", max_len, accumulator)
        figures = summarise(accumulator.state(), ks, catalogue)
        keep = ["users", "mrr", *(f"{m}@{k}" for k in ks for m in ("hr", "ndcg"))]
        out[name] = quality.rounded({k: figures[k] for k in keep})
    return out


def user_groups(sequences: pa.Table, cold: np.ndarray, num_items: int) -> dict[str, tuple[pa.Table, Any]]:
    is_cold = np.zeros(num_items + 1, bool)
    is_cold[cold] = True
    cold_user = pa.array(is_cold[sequences["test_item"].to_numpy()])
    return {
        "cold_full": (sequences.filter(cold_user), None),
        "cold_only": (sequences.filter(cold_user), torch.from_numpy(is_cold)),
        "warm_full": (sequences.filter(pa.compute.invert(cold_user)), None),
    }


def baselines(data: str, popularity: torch.Tensor, groups: dict, ks: list[int]) -> dict[str, Any]:
    """Popularity (events per item [N + 1] a model could learn from) and the text-content baseline on every
    group."""
    text, _ = read_item_text_embeddings(data)
    unit = F.normalize(text.float(), dim=-1)
    unit[0] = 0.0
    catalogue = Catalogue(popularity, unit)
    scorers: dict[str, Callable] = {
        "popularity": popularity_scores(popularity),
        "content": content_scores(unit),
    }
    return {name: group_figures(fn, groups, catalogue, ks, 200, 256) for name, fn in scorers.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="prepared dataset, or raw ml-1m, amazon-beauty, ...")
    parser.add_argument("--name", required=True, help="the model's label in the lines (e.g. text, id)")
    parser.add_argument("--config", default="configs/pretrain/ml-1m.yaml", help="training config (YAML)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the items held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out draw")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one training run per seed")
    parser.add_argument("--max-seq-len", type=int, default=None, help="history length the model reads")
    parser.add_argument("--time-budget-min", type=float, default=None, help="interrupt training after N min")
    parser.add_argument("--work-dir", type=Path, default=quality.REPO / "runs" / "cold", help="data and runs")
    parser.add_argument("--out", type=Path, default=None, help="also append each JSON line to this file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    args = quality.training_args(parser)
    if not 0.0 < args.fraction < 1.0:
        parser.error(f"--fraction must be in (0, 1), got {args.fraction}")
    return args


def main() -> None:
    args = parse_args()
    work, runs, checked, seeds = quality.start(args)

    dataset, base = quality.prepare_dataset(args.data_dir, work)
    if not (Path(base) / EMBEDDINGS_FILE).exists():  # the content baseline (and text models) read them
        embed_items(base, model="minilm", progress=False)
    data, cold, summary = cold_dataset(base, args.fraction, args.split_seed, work)
    sequences = read_sequences(data)
    num_items = int(pa.compute.max(read_items(data)["item_index"]).as_py())
    groups = user_groups(sequences, cold, num_items)
    popularity = split_popularity(sequences, "test", num_items)
    ks = sorted(set(checked.eval.ks))
    common = {
        "benchmark": "cold_start", "dataset": dataset, "data": data, "cold": summary, "name": args.name,
        "config": os.path.relpath(args.config, quality.REPO), "overrides": args.overrides,
        "baselines": baselines(data, popularity, groups, ks),
    }  # fmt: skip
    config = load_config(TrainConfig, args.config, [*args.settings, f"data.path={data}"])
    max_seq_len = config.model.max_seq_len or load_manifest(data).get("max_seq_len")
    window = training_window(config, num_items, max_seq_len, None)
    rows = trainable_rows(sequences, include_valid=False, window=window).num_rows
    training_rows = {"strict": rows, "published": rows}  # run_protocol reads the strict one
    catalogue = Catalogue(popularity)
    for seed in seeds:
        run = quality.run_protocol("strict", seed, args, data, runs, training_rows)
        model, _ = load_model(str(Path(run["run"]) / run["checkpoint"]))
        model.eval()
        figures = group_figures(
            model_scores(model), groups, catalogue, ks, model.config.max_seq_len, checked.eval.batch_size
        )
        keep = ("valid", "epochs", "reported_epoch", "stopped_by_budget", "wall_s", "seconds_per_epoch",
                "train_s", "eval_s", "load_avg_1m", "run", "checkpoint")  # fmt: skip
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        line = {**common, "seed": seed, **figures, **{k: run[k] for k in keep}, "parameters": trainable}
        quality.emit({**line, "machine": quality.machine(checked.train.torch_threads or 1)}, args.out)


if __name__ == "__main__":
    main()
