"""The exported model folder (docs/formats.md, "Exported model"): its file names, its writer and what
marks a folder as one. `rec-train export` and the synthetic models of tests and benchmarks write it with
`write_model_folder`; the Predictor, `--init-from`, `rec-train evaluate` and the dataset readers read it.

    config.json, model.safetensors   save_pretrained (safetensors only); a model past `max_shard_size`:
                                     model.safetensors.index.json and model-0000i-of-0000n.safetensors
    items.parquet                    item_index, item_id, count, title, text
    histories.parquet                user_id, items: every known user's history
    rayrec.json                      model_version, config, dataset manifest, checkpoint, ...
    metrics.json                     validation / test figures of exactly these weights
    item_tokenizer/                  a model with an LM item tower: its tokenizer (`rec-train add-items`)
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rec_train import storage

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights: which shard holds each tensor
DEFAULT_SHARD_SIZE = "5GB"
ITEMS_FILE = "items.parquet"
HISTORIES_FILE = "histories.parquet"
INFO_FILE = "rayrec.json"
METRICS_FILE = "metrics.json"
TOKENIZER_DIR = "item_tokenizer"
REQUIRED_FILES = (CONFIG_FILE, ITEMS_FILE, HISTORIES_FILE, INFO_FILE)  # and the weights: `weight_files`
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")  # never loaded


def is_model_folder(loc: storage.Location) -> bool:
    """True when `loc` holds an exported model (its `rayrec.json`), not a prepared dataset or checkpoint."""
    return storage.exists(loc.join(INFO_FILE))


def has_weights(loc: storage.Location) -> bool:
    """True when `loc` holds safetensors weights: one file, or an index of shards and every shard it names."""
    if storage.is_file(loc.join(WEIGHTS_FILE)):
        return True
    if not storage.is_file(loc.join(WEIGHTS_INDEX_FILE)):
        return False
    shards = set(storage.read_json(loc.join(WEIGHTS_INDEX_FILE))["weight_map"].values())
    return all(storage.is_file(loc.join(shard)) for shard in shards)


def write_model_folder(
    folder: Path,
    model: Any,
    items: pa.Table,
    histories: pa.Table,
    info: dict[str, Any],
    metrics: dict[str, Any],
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Write every file of the folder into the local `folder`; returns `info` as written. `model` is a
    `RecModel` (saved with `save_pretrained`, safetensors, in shards of at most `max_shard_size`); without
    `info["model_version"]` the version is the UTC time and the weights' SHA-256, so the same weights
    exported twice differ only in time. (A model with an item tower also needs its tokenizer in
    `TOKENIZER_DIR`: `item_tower.save_tokenizer`.)"""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    if not info.get("model_version"):
        digest = hashlib.sha256()
        for shard in sorted(folder.glob("model*.safetensors")):  # one file, or every shard in order
            with shard.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        info = {
            **info,
            "model_version": f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{digest.hexdigest()[:12]}",
        }
    pq.write_table(items, folder / ITEMS_FILE)
    pq.write_table(histories, folder / HISTORIES_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info
