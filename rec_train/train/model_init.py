"""Build the model a run trains: from a named size, or from an earlier model whose vocabulary grows.

Continued pre-training and fine-tuning start from an exported model or a checkpoint. The dataset must
have been prepared with that model's vocabulary (`vocab_from`), so every known item keeps its index:
its rows are kept exactly and new items get new rows (from their text where the model uses text).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rec_train import storage
from rec_train.errors import DataError
from rec_train.model import RecConfig, RecModel
from rec_train.model.item_tower import freeze_item_tower, load_item_tower, load_tokenizer, tokenize_items
from rec_train.model.pretrained import load_backbone
from rec_train.train.config import FinetuneSection, TrainConfig, model_config


def check_vocab(old_items: pa.Table, new_items: pa.Table, source: str, data_path: str) -> None:
    """Every item of the earlier model must have the same index in the new dataset."""
    old = dict(zip(old_items["item_index"].to_pylist(), old_items["item_id"].to_pylist(), strict=True))
    new = dict(zip(new_items["item_index"].to_pylist(), new_items["item_id"].to_pylist(), strict=True))
    moved = [(i, item) for i, item in old.items() if new.get(i) != item]
    if moved:
        i, item = moved[0]
        raise DataError(
            f"{data_path}: {len(moved)} items of {source} have another index in this dataset (e.g. item {item!r} "
            f"was index {i}, now {new.get(i)!r} is); prepare the data with `vocab_from={source}` so known items "
            "keep their rows"
        )


def _source_items(source: str, info: dict[str, Any]) -> pa.Table:
    from rec_train.data.dataset import read_items

    loc = storage.resolve(source)
    if storage.exists(loc.join("items.parquet")):
        return read_items(source)
    return read_items(info["data_path"])


def read_text_embeddings(data_path: str) -> torch.Tensor:
    from rec_train.model.text import read_item_text_embeddings

    return read_item_text_embeddings(data_path)[0].float()


def item_tokens(
    tokenizer_from: str, data_path: str, model_config: RecConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The item tower's input for every item of the dataset: (token_ids [N + 1, T], token_counts [N + 1])."""
    from rec_train.model.text import read_item_texts

    texts, _ = read_item_texts(data_path)
    return tokenize_items(load_tokenizer(tokenizer_from), texts, model_config.item_text_max_length)


def tokenizer_source(model_uri: str) -> str:
    """Where the item tokenizer of an earlier model is: its exported folder's copy, else the tower's source."""
    from rec_train.exported import TOKENIZER_DIR
    from rec_train.train.saved_model import saved_config

    loc = storage.resolve(model_uri).join(TOKENIZER_DIR)
    return loc.uri if storage.is_dir(loc) else saved_config(model_uri)["item_tower_source"]


def fresh_model_config(config: TrainConfig, num_items: int, max_seq_len: int | None) -> RecConfig:
    """The config of a new model: `config.model.size` (or its backbone's architecture) with the dataset's
    figures, then the overrides."""
    model = config.model
    return model_config(
        model.size, model.backbone, max_seq_len, model.overrides, model.item_tower, num_items=num_items
    )


def build_model(
    config: TrainConfig,
    num_items: int,
    max_seq_len: int | None,
    items: pa.Table,
    init_from: str | None,
    target_mean: float | None = None,
    popularity: np.ndarray | None = None,
) -> RecModel:
    """A fresh model of `config.model.size`, or the model at `init_from` grown to `num_items`; for a
    pointwise task, with a head of that kind (a new one starts at `target_mean`, the mean target).
    `popularity` [num_items + 1]: training events per item (`batches.item_events`), for popularity
    negatives and the logQ correction; never items.parquet's `count`, which holds the test events too."""
    if init_from is None:
        model_config = fresh_model_config(config, num_items, max_seq_len)
        model = RecModel(model_config)
        if config.model.backbone is not None and config.model.backbone_weights:
            load_backbone(model, config.model.backbone)
        if config.model.item_tower is not None:
            load_item_tower(model.items.tower, config.model.item_tower)
            model.set_item_tokens(*item_tokens(config.model.item_tower, config.data.path, model_config))
        elif model_config.uses_text:
            model.set_item_text_embeddings(read_text_embeddings(config.data.path))
    else:
        from rec_train.train.saved_model import load_model

        model, info = load_model(init_from)
        old = model.config.num_items
        if num_items < old:
            raise DataError(
                f"{config.data.path} has {num_items} items but {init_from} has {old}: prepare the data with "
                f"`vocab_from={init_from}` so the vocabulary only grows"
            )
        check_vocab(_source_items(init_from, info), items, init_from, config.data.path)
        if num_items > old and model.items.tower is not None:
            tokens = item_tokens(tokenizer_source(init_from), config.data.path, model.config)
            model.resize_items(num_items, item_tokens=tokens)
        elif num_items > old:
            text = read_text_embeddings(config.data.path) if model.config.uses_text else None
            model.resize_items(num_items, text)
        model.train()
    if config.model.item_tower_layers is not None:
        freeze_item_tower(model.items.tower, config.model.item_tower_layers)
    if config.task != "next_item" and model.config.pointwise_head != config.task:
        mean = 0.0 if target_mean is None else target_mean
        if config.task == "click":  # the head outputs a logit: start at the log-odds of a click
            rate = min(max(mean, 1e-4), 1 - 1e-4)
            mean = math.log(rate / (1 - rate))
        model.add_pointwise_head(config.task, mean)
    if model.config.negative_sampler == "popularity" or model.config.logq_correction:
        if popularity is None:
            raise ValueError("a model with popularity negatives or logQ correction needs `popularity` counts")
        model.set_item_counts(torch.from_numpy(np.asarray(popularity, dtype=np.float32)))
    return model


def apply_finetune_policy(model: RecModel, finetune: FinetuneSection) -> torch.nn.Module:
    """Freeze by policy, or (lora_rank > 0) wrap in peft LoRA; returns the module to train."""
    from rec_train.model.peft_utils import apply_freeze_policy, apply_lora

    if finetune.lora_rank > 0:
        return apply_lora(model, r=finetune.lora_rank, alpha=finetune.lora_alpha)
    apply_freeze_policy(model, finetune.freeze, finetune.top_n)
    return model
