"""Build the model a run trains: from a named size, or from an earlier model whose vocabulary grows.

Continued pre-training and fine-tuning start from an exported model or a checkpoint. The dataset must
have been prepared with that model's vocabulary (`vocab_from`), so every known item keeps its index:
its rows are kept exactly and new items get new rows (from their text where the model uses text).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors

from rec_train import storage
from rec_train.errors import DataError, RayrecError
from rec_train.model import RecModel, build_config
from rec_train.train.config import FinetuneSection, TrainConfig

TEXT_EMBEDDINGS = "item_text_embeddings.safetensors"
FREEZE_POLICIES = {
    "none": (),
    "items": ("items.",),  # item table and text projection fixed: the sequence encoder adapts
    "encoder": ("encoder.", "in_proj.", "out_proj."),  # the encoder fixed: item vectors adapt
}


def read_text_embeddings(data_path: str) -> torch.Tensor:
    """`item_text_embeddings.safetensors` of a prepared dataset: float32 [num_items + 1, dim]."""
    loc = storage.resolve(data_path).join(TEXT_EMBEDDINGS)
    if not storage.exists(loc):
        raise DataError(f"{loc.uri} is missing: the model uses item text; run `rec-train embed-items` on the dataset")
    return load_safetensors(storage.read_bytes(loc))["embeddings"].float()


def item_counts(items: pa.Table, num_items: int) -> torch.Tensor:
    """Events per item index [num_items + 1] from `items.parquet`."""
    counts = torch.zeros(num_items + 1)
    index = torch.from_numpy(items["item_index"].to_numpy().astype("int64"))
    counts[index] = torch.from_numpy(items["count"].to_numpy().astype("float32"))
    return counts


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


def build_model(config: TrainConfig, num_items: int, max_seq_len: int, items: pa.Table, init_from: str | None) -> RecModel:
    """A fresh model of `config.model.size`, or the model at `init_from` grown to `num_items`."""
    if init_from is None:
        model_config = build_config(
            config.model.size, **{"num_items": num_items, "max_seq_len": max_seq_len, **config.model.overrides}
        )
        model = RecModel(model_config)
        if model_config.uses_text:
            model.set_item_text_embeddings(read_text_embeddings(config.data.path))
    else:
        from rec_train.train.checkpoint import load_model

        model, info = load_model(init_from)
        old = model.config.num_items
        if num_items < old:
            raise DataError(
                f"{config.data.path} has {num_items} items but {init_from} has {old}: prepare the data with "
                f"`vocab_from={init_from}` so the vocabulary only grows"
            )
        check_vocab(_source_items(init_from, info), items, init_from, config.data.path)
        if num_items > old:
            text = read_text_embeddings(config.data.path) if model.config.uses_text else None
            model.resize_items(num_items, text)
        model.train()
    if model.config.negative_sampler == "popularity" or model.config.logq_correction:
        model.set_item_counts(item_counts(items, model.config.num_items))
    return model


def apply_finetune_policy(model: RecModel, finetune: FinetuneSection) -> torch.nn.Module:
    """Freeze parameters by policy and, with `lora_rank > 0`, add LoRA adapters to the encoder's linear
    layers (peft). Returns the module to train (the model itself, or its peft wrapper)."""
    if finetune.freeze not in FREEZE_POLICIES:
        raise RayrecError(f"finetune.freeze={finetune.freeze!r} is not one of {', '.join(FREEZE_POLICIES)}")
    prefixes = FREEZE_POLICIES[finetune.freeze]
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    if finetune.lora_rank == 0:
        return model
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)})
    lora = LoraConfig(r=finetune.lora_rank, lora_alpha=finetune.lora_alpha, target_modules=targets, lora_dropout=0.0)
    for param in model.encoder.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(lora, model.encoder)
    return model


def merge_lora(state: dict[str, torch.Tensor], scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold LoRA factors into their base weights: W + (alpha / r) B A; keys become the plain model's."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            merged[f"{stem}.weight"] = value + scaling[stem] * (b @ a)  # [out, r] @ [r, in] -> [out, in]
        elif ".base_layer." in key:
            merged[key.replace(".base_layer.", ".")] = value
        else:
            merged[key] = value
    return merged


def lora_scaling(finetune: FinetuneSection | None, state: dict[str, torch.Tensor]) -> dict[str, float]:
    if finetune is None or finetune.lora_rank == 0:
        return {}
    stems = [k[: -len(".lora_A.default.weight")] for k in state if k.endswith(".lora_A.default.weight")]
    return dict.fromkeys(stems, finetune.lora_alpha / finetune.lora_rank)
