"""Named model sizes, and `rec-train params --size SIZE [key=value ...]` (parameter count as JSON).

The count builds the model on the meta device, so even `large` (a 10-million-item table) costs no memory.
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

import torch

from rec_train.config import ConfigError, parse_override
from rec_train.model.configuration import RecConfig, field_types

SIZES: dict[str, dict[str, Any]] = {
    # unit tests: seconds on a laptop CPU, deterministic (no dropout)
    "tiny": dict(
        num_items=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_seq_len=20,
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # the MovieLens-1M benchmark: 2 blocks of width 64 over 200 items, full softmax over 3,706 items
    "ml-1m": dict(
        num_items=3706,
        hidden_size=64,
        encoder="sasrec",
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        hidden_act="gelu",
        max_seq_len=200,
        embedding_dropout=0.2,
        hidden_dropout=0.2,
        attention_dropout=0.2,
        norm_eps=1e-8,
        loss="full_softmax",
    ),
    # one GPU node: a million items, a 512-wide Llama backbone, sampled softmax
    "base": dict(
        num_items=1_000_000,
        hidden_size=128,
        backbone_hidden_size=512,
        encoder="llama",
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=1408,
        max_seq_len=256,
        loss="sampled_softmax",
        negative_sampler="in_batch",
        num_negatives=512,
        l2_normalize=True,
        temperature=0.05,
        logq_correction=True,
    ),
    # a cluster with ZeRO-3: ten million items and a 24-block, 1024-wide backbone (~3.0e9 parameters)
    "large": dict(
        num_items=10_000_000,
        hidden_size=256,
        backbone_hidden_size=1024,
        encoder="llama",
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=2816,
        max_seq_len=512,
        loss="sampled_softmax",
        negative_sampler="in_batch",
        num_negatives=1024,
        l2_normalize=True,
        temperature=0.05,
        logq_correction=True,
    ),
}


def config_keys() -> list[str]:
    """The keys a model config accepts (those `RecConfig` defines itself, not the Hugging Face base ones)."""
    return sorted(field_types())


def build_config(size: str = "tiny", **overrides: Any) -> RecConfig:
    """`SIZES[size]` with `overrides` on top; unknown sizes or keys raise `ConfigError` naming the fix."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose from {', '.join(SIZES)}")
    valid = config_keys()
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (valid keys: {', '.join(valid)})"
            raise ConfigError(f"unknown model key {key!r}{hint}")
    try:
        return RecConfig(**{**SIZES[size], **overrides})
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def count_parameters(config: RecConfig) -> dict[str, int]:
    """Parameter counts by part, without allocating memory (meta device)."""
    from rec_train.model.modeling import RecModel

    with torch.device("meta"):
        model = RecModel(config)
    parts = {"items": model.items, "encoder": model.encoder}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["other"] = counts["total"] - counts["items"] - counts["encoder"]
    counts["item_table"] = (
        model.items.id_embeddings.weight.numel() if model.items.id_embeddings is not None else 0
    )
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="named model size")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="model config overrides, e.g. num_items=5000"
    )


def run(args: argparse.Namespace) -> int:
    overrides = {}
    for text in args.overrides:
        path, value = parse_override(text)
        overrides[".".join(path)] = value
    config = build_config(args.size, **overrides)
    counts = count_parameters(config)
    print(
        json.dumps(
            {
                "size": args.size,
                "num_items": config.num_items,
                "parameters": counts["total"],
                **{f"{k}_parameters": v for k, v in counts.items() if k != "total"},
            }
        )
    )
    return 0
