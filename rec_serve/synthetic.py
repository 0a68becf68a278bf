"""Write an exported model folder (docs/formats.md) around any `RecModel`, with made-up items and users.

Tests build a tiny model this way and benchmarks a MovieLens-1M-sized one with random weights:
serving cost depends on the sizes, not on what the weights learned.

    write_exported_model("/tmp/model", RecModel(build_config("ml-1m")), num_users=6040)
    write_tiny_model("/tmp/tiny", model_version="v2", seed=1)   # 40 items, for tests
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rec_train.exported import DEFAULT_SHARD_SIZE, write_model_folder
from rec_train.model import RecModel, build_config


def item_id(index: int) -> str:
    """Item ids as users know them differ from the dense indices, so a mix-up shows in tests."""
    return str(index * 10 + 7)


def write_exported_model(
    out: str | Path,
    model: RecModel,
    num_users: int = 50,
    max_history: int = 20,
    model_version: str = "v1",
    seed: int = 0,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Save `model` (in safetensors shards of at most `max_shard_size`) plus items, histories, rayrec.json and
    metrics.json into `out`; returns it.

    Users are named `u0`, `u1`, ...; `u0` has an empty history. Item `i` has id `item_id(i)`,
    title `Item i` (none for every 5th item) and a Zipf-like event count.
    """
    out = Path(out)
    num_items = int(model.item_embeddings().shape[0]) - 1
    rng = np.random.default_rng(seed)

    counts = (1000 / np.arange(1, num_items + 1)).astype(np.int64) + 1
    rng.shuffle(counts)
    items = pa.table(
        {
            "item_index": pa.array(np.arange(1, num_items + 1), pa.int32()),
            "item_id": [item_id(i) for i in range(1, num_items + 1)],
            "count": pa.array(counts, pa.int64()),
            "title": [None if i % 5 == 0 else f"Item {i}" for i in range(1, num_items + 1)],
            "text": [None if i % 5 == 0 else f"Item {i}. Genre {i % 3}" for i in range(1, num_items + 1)],
        }
    )
    probs = counts / counts.sum()
    histories = [[]] + [
        rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(1, max_history + 1)), p=probs).tolist()
        for _ in range(1, num_users)
    ]
    users = pa.table(
        {"user_id": [f"u{u}" for u in range(num_users)], "items": pa.array(histories, pa.list_(pa.int32()))}
    )
    info = {"model_version": model_version, "config": {"synthetic": True, "seed": seed}, "dataset": {}}
    metrics = {"valid": {"ndcg@10": 0.0}, "test": {"ndcg@10": 0.0}}
    write_model_folder(out, model, items, users, info, metrics, max_shard_size)
    return out


def write_tiny_model(out: str | Path, model_version: str = "v1", num_items: int = 40, seed: int = 0) -> Path:
    """A tiny random model (`build_config("tiny")`) saved as an exported folder; seconds on a CPU."""
    torch.manual_seed(seed)
    model = RecModel(build_config("tiny", num_items=num_items))
    return write_exported_model(out, model, model_version=model_version, seed=seed)
