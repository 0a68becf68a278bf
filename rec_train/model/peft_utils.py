"""Parameter-efficient fine-tuning: freeze policies and LoRA (through `peft`) on attention + MLP, of the
sequence encoder and of the LM item tower."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rec_train.model.modeling import RecModel

FREEZE_POLICIES = ("none", "embeddings", "backbone", "all_but_top_n")

DECODER_PROJECTIONS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(
    f"mlp.{p}_proj" for p in ("gate", "up", "down")
)  # Llama and Qwen2 blocks
# Attention and MLP projections inside `encoder.layers.*`, per encoder.
LORA_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": DECODER_PROJECTIONS,
    "qwen2": DECODER_PROJECTIONS,
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "sasrec": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "up_proj", "down_proj"),
    "hstu": ("uvqk_proj", "o_proj"),
    "bert": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
}


def apply_freeze_policy(model: RecModel, policy: str, top_n: int = 1) -> list[str]:
    """Set `requires_grad` by policy; returns the names of the trainable parameters.

    - `none`: everything trains.
    - `embeddings`: the item representation (ID table, text projection, fusion) is frozen.
    - `backbone`: the transformer blocks (`encoder`) are frozen; items, projections and heads train.
    - `all_but_top_n`: only the top `top_n` blocks, the encoder's final norm, the output projection
      and the heads train.
    The pointwise head, when present, always trains.
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze policy {policy!r} is not one of {', '.join(FREEZE_POLICIES)}")
    layers = len(model.encoder.layers)
    if policy == "all_but_top_n" and not 1 <= top_n <= layers:
        raise ValueError(f"top_n={top_n} must be between 1 and the number of blocks ({layers})")
    top = {f"encoder.layers.{i}." for i in range(layers - top_n, layers)}
    for name, param in model.named_parameters():
        if policy == "embeddings":
            train = not name.startswith("items.")
        elif policy == "backbone":
            train = not name.startswith("encoder.")
        elif policy == "all_but_top_n":
            train = name.startswith(("encoder.norm.", "out_proj.", "mask_embedding")) or any(
                name.startswith(prefix) for prefix in top
            )
        else:
            train = True
        param.requires_grad_(train or name.startswith("pointwise."))
    return trainable_parameter_names(model)


# The blocks of an item tower's language model (a Hugging Face base model), per family.
TOWER_BLOCKS = {"bert": r"encoder\.layer", "llama": "layers", "qwen2": "layers", "gpt2": "h"}


def _alternatives(projections: tuple[str, ...]) -> str:
    return "|".join(p.replace(".", r"\.") for p in projections)


def lora_target_pattern(model: RecModel) -> str:
    """A regex (peft matches it against full module names) for the attention + MLP projections of the
    sequence encoder's blocks and, when the model has one, of its item tower's."""
    pattern = rf"encoder\.layers\.\d+\.(?:{_alternatives(LORA_PROJECTIONS[model.config.encoder])})"
    if model.items.tower is None:
        return pattern
    family = model.config.item_tower["model_type"]
    tower = rf"items\.tower\.lm\.{TOWER_BLOCKS[family]}\.\d+\.(?:{_alternatives(LORA_PROJECTIONS[family])})"
    return rf"(?:{pattern}|{tower})"


def _conv1d_weights(model: RecModel) -> bool:
    """True when LoRA's targets are GPT-2's Conv1D projections (weights stored transposed), which peft
    cannot mix with Linear ones in one adapter."""
    gpt2 = {model.config.encoder == "gpt2"}
    if model.items.tower is not None:
        gpt2.add(model.config.item_tower["model_type"] == "gpt2")
    if len(gpt2) > 1:
        raise ValueError(
            "LoRA cannot adapt a GPT-2 sequence encoder together with a non-GPT-2 item tower (or the reverse): "
            "GPT-2 stores its projections transposed; fine-tune with a freeze policy (finetune.lora_rank=0)"
        )
    return gpt2.pop()


def apply_lora(model: RecModel, r: int = 8, alpha: int = 16, dropout: float = 0.0) -> nn.Module:
    """Wrap `model` in a `peft` LoRA model: rank-r adapters on the projections, all else frozen but
    the pointwise head (trained and saved in full). `merge_and_unload()` gives back a `RecModel`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(model),
        fan_in_fan_out=_conv1d_weights(model),
        modules_to_save=["pointwise"] if model.pointwise is not None else None,
    )
    return get_peft_model(model, config)


def load_weights(
    model: RecModel, state: Mapping[str, Any], lora_rank: int = 0, lora_alpha: int = 0
) -> RecModel:
    """`model` with the weights of `state`: a state dict of `model` itself or, with `lora_rank`, of its
    LoRA model (`apply_lora(model, lora_rank, lora_alpha)`), whose adapters peft's `merge_and_unload`
    then folds into the base weights (and whose trained pointwise head it keeps). The values are copied in
    one at a time, so a lazy state (tensors made on access, or objects with `contiguous()` such as
    DeepSpeed's gathered ZeRO shards) never exists whole beside the model. A buffer missing from `state`
    keeps its value; any other missing or unexpected key, or a shape that differs, is a ValueError."""
    target = apply_lora(model, r=lora_rank, alpha=lora_alpha) if lora_rank else model
    own = target.state_dict(keep_vars=True)
    buffers = {name for name, _ in target.named_buffers()}
    missing = [k for k in own if k not in state and k not in buffers]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name in state:
            value = state[name]
            value = value if isinstance(value, torch.Tensor) else value.contiguous()
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} where the model has {tuple(own[name].shape)}"
                )
            own[name].copy_(value)
            del value
    return target.merge_and_unload() if lora_rank else model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)
