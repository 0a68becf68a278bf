"""Start the sequence encoder from a pretrained Hugging Face checkpoint: a decoder LM (Llama, Qwen2, GPT-2;
causal, next-item objective) or a BERT (bidirectional, masked-item objective), such as all-MiniLM-L6-v2.

`config_from_backbone` copies the checkpoint's architecture into a `RecConfig` (the item width
`hidden_size` stays free: projections bridge it to the backbone width); `load_backbone` copies
the transformer blocks' weights (and GPT-2's and BERT's learned positions) into a `RecModel` built from
that config.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

import torch

from rec_train import storage
from rec_train.config import ConfigError
from rec_train.model.configuration import ROTARY_ENCODERS, RecConfig
from rec_train.model.hf_checkpoint import backbone_folder, read_backbone_config
from rec_train.model.modeling import RecModel
from rec_train.model.sizes import build_config

# RecConfig keys the checkpoint fixes: an override may repeat them, not contradict them
ARCHITECTURE_KEYS = (
    "encoder", "backbone_hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "hidden_act",
)  # fmt: skip


def _architecture(hf: Any) -> dict[str, Any]:
    """The `RecConfig` keys of a checkpoint's encoder: its family, layers, heads, widths and norms."""
    shared = dict(
        backbone_hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
    )
    if hf.model_type in ROTARY_ENCODERS:
        return dict(
            shared,
            encoder=hf.model_type,
            num_key_value_heads=hf.num_key_value_heads,
            intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act,
            norm_eps=hf.rms_norm_eps,
            rope_theta=float(hf.rope_parameters["rope_theta"]),
        )
    if hf.model_type == "gpt2":
        return dict(
            shared,
            encoder="gpt2",
            intermediate_size=hf.n_inner or 4 * hf.hidden_size,
            hidden_act=hf.activation_function,
            norm_eps=hf.layer_norm_epsilon,
        )
    return dict(
        shared,
        encoder="bert",
        objective="masked_item",
        intermediate_size=hf.intermediate_size,
        hidden_act=hf.hidden_act,
        norm_eps=hf.layer_norm_eps,
    )


def config_from_backbone(path_or_uri: str, size: str = "tiny", **overrides: Any) -> RecConfig:
    """A `RecConfig` whose encoder matches the checkpoint's layers, heads and widths; an override that
    contradicts them is a `ConfigError`."""
    hf = read_backbone_config(path_or_uri)
    arch = _architecture(hf)
    for key in ARCHITECTURE_KEYS:
        if key in overrides and overrides[key] != arch.get(key):
            raise ConfigError(
                f"model.overrides.{key}={overrides[key]!r} contradicts backbone {path_or_uri!r}, whose {key} is "
                f"{arch.get(key)!r}: drop the override (the backbone fixes it; hidden_size, the item width, is "
                "free)"
            )
    config = build_config(size, **{**arch, "backbone_source": path_or_uri, **overrides})
    if config.encoder not in ROTARY_ENCODERS and config.max_seq_len + 1 > hf.max_position_embeddings:
        raise ConfigError(
            f"model.max_seq_len={config.max_seq_len} needs {config.max_seq_len + 1} positions; "
            f"backbone {path_or_uri!r} has {hf.max_position_embeddings}"
        )
    return config


def _rename(key: str, encoder: str) -> str | None:
    """Checkpoint key -> key under `RecModel.encoder`, or None when the key is not used."""
    if encoder in ROTARY_ENCODERS:  # Llama and Qwen2 name their blocks as the encoder does
        return key if key.startswith(("layers.", "norm.")) else None
    if encoder == "gpt2":
        if match := re.match(r"h\.(\d+)\.(.+)", key):
            return f"layers.{match[1]}.{match[2]}"
        return {
            "wpe.weight": "position_embeddings.weight",
            "ln_f.weight": "norm.weight",
            "ln_f.bias": "norm.bias",
        }.get(key)
    if match := re.match(r"encoder\.layer\.(\d+)\.(.+)", key):
        return f"layers.{match[1]}.{match[2]}"
    return {
        "embeddings.position_embeddings.weight": "position_embeddings.weight",
        "embeddings.LayerNorm.weight": "norm.weight",
        "embeddings.LayerNorm.bias": "norm.bias",
    }.get(key)


@torch.no_grad()
def load_backbone(model: RecModel, path_or_uri: str) -> list[str]:
    """Copy the checkpoint's blocks into `model.encoder`; returns the encoder keys that were loaded."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory(prefix="rayrec-backbone-") as tmp:
        source = AutoModel.from_pretrained(
            storage.local_folder(backbone_folder(path_or_uri), tmp, "backbone checkpoint"),
            use_safetensors=True,
        ).state_dict()
    target = model.encoder.state_dict()
    loaded = []
    for key, value in source.items():
        name = _rename(key, model.config.encoder)
        if name is None or name not in target:
            continue
        if name == "position_embeddings.weight":
            value = value[: target[name].shape[0]]  # the first max_seq_len + 1 positions
        if value.shape != target[name].shape:
            raise ConfigError(
                f"backbone {path_or_uri!r}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(target[name].shape)}; build the config with config_from_backbone"
            )
        target[name].copy_(value)
        loaded.append(name)
    missing = sorted(set(target) - set(loaded))
    if missing:
        raise ConfigError(f"backbone {path_or_uri!r} does not provide {', '.join(missing[:5])}")
    return sorted(loaded)
