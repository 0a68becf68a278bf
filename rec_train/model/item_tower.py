"""The LM item tower: item text -> item vectors with a trainable Hugging Face language model (as HLLM and
RecFormer do), instead of the fixed vectors of `rec-train embed-items`.

Every item's text is tokenized once into two buffers of the model, `token_ids` [N + 1, T] (right-padded)
and `token_counts` [N + 1] (0 for the padding row and for an item without text), so an exported model
carries its items' text and serving needs no tokenizer. Item vectors are the L2-normalised mean of the
LM's last hidden states over the item's tokens; an item without text gets zeros. In training the LM runs
once per call on the distinct items asked for; in eval mode the whole table is computed in batches of
`item_tower_batch_size` and cached until the model trains again or loads weights.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rec_train import storage
from rec_train.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
# The transformer blocks of each family's base model (AutoModel), for "train the top N layers".
LAYER_RE = re.compile(r"^(?:encoder\.layer|layers|h)\.(\d+)\.")
FINAL_NORMS = ("norm.", "ln_f.")  # Llama / Qwen2, GPT-2; BERT has none after its blocks


def read_tower_config(path_or_uri: str) -> Any:
    """The item LM's `transformers` config, with the checks of a backbone (folder, config.json, a supported
    family, safetensors weights) and a tokenizer, which the tower needs to read item text."""
    from rec_train.model.hf_checkpoint import backbone_folder, read_backbone_config

    hf = read_backbone_config(path_or_uri, role="item tower")
    loc = storage.resolve(backbone_folder(path_or_uri))
    if not any(storage.is_file(loc.join(name)) for name in TOKENIZER_FILES):
        raise ConfigError(
            f"item tower {path_or_uri!r} has weights but no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer into the same folder (tokenizer.save_pretrained(folder))"
        )
    return hf


def tower_keys(path_or_uri: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The `RecConfig` keys of an item tower started from `path_or_uri`: its architecture, its width as
    `text_dim`, and item_representation 'text' unless the overrides choose 'id+text'."""
    hf = read_tower_config(path_or_uri)
    if "text_dim" in overrides and overrides["text_dim"] != hf.hidden_size:
        raise ConfigError(
            f"model.overrides.text_dim={overrides['text_dim']!r} contradicts item tower {path_or_uri!r}, whose "
            f"width is {hf.hidden_size}: drop the override"
        )
    return {
        "item_tower": hf.to_dict(),
        "item_tower_source": path_or_uri,
        "text_dim": hf.hidden_size,
        "item_representation": overrides.get("item_representation", "text"),
    }


def load_tokenizer(path_or_uri: str) -> Any:
    """The tokenizer of a tower checkpoint or of an exported model's `item_tokenizer` folder (local or S3)."""
    from transformers import AutoTokenizer

    from rec_train.model.hf_checkpoint import backbone_folder

    with tempfile.TemporaryDirectory(prefix="rayrec-tokenizer-") as tmp:
        folder = storage.local_folder(backbone_folder(path_or_uri), tmp, "item tokenizer")
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a tokenizer from {path_or_uri!r}: {exc}") from exc


def tokenize_items(
    tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts of items 1..N -> (token_ids [N + 1, max_length], token_counts [N + 1]); row 0 and an empty
    text get no tokens."""
    ids = torch.zeros(len(texts) + 1, max_length, dtype=torch.long)
    counts = torch.zeros(len(texts) + 1, dtype=torch.long)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    for row, (text, tokens) in enumerate(zip(texts, encoded, strict=True), start=1):
        if text:
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            counts[row] = len(tokens)
    return ids, counts


class ItemTower(nn.Module):
    """Item indices [...] -> text vectors [..., text_dim] computed by the language model `lm`."""

    def __init__(self, config: Any) -> None:
        from transformers import AutoConfig, AutoModel

        super().__init__()
        spec = dict(config.item_tower)
        lm_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        extra = {"add_pooling_layer": False} if lm_config.model_type == "bert" else {}
        self.lm = AutoModel.from_config(lm_config, **extra)
        rows, length = config.num_items + 1, config.item_text_max_length
        self.register_buffer("token_ids", torch.zeros(rows, length, dtype=torch.long))
        self.register_buffer("token_counts", torch.zeros(rows, dtype=torch.long))
        self.batch_size = config.item_tower_batch_size
        self._table: torch.Tensor | None = None

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Item indices [U] -> [U, text_dim]: one forward pass of the LM over their tokens."""
        counts = self.token_counts[rows]  # [U]
        length = max(int(counts.max()), 1) if len(rows) else 1
        mask = torch.arange(length, device=rows.device) < counts[:, None]  # [U, T]
        attend = mask.clone()
        attend[:, 0] = True  # an item without text attends to one pad token, then its vector is zeroed
        hidden = self.lm(
            input_ids=self.token_ids[rows, :length], attention_mask=attend.long()
        ).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [U, T, 1]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [U, D]
        return F.normalize(pooled, dim=-1) * (counts > 0).unsqueeze(-1).to(pooled.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.table()[ids]
        rows, inverse = ids.unique(return_inverse=True)
        return self.encode(rows)[inverse]

    def table(self) -> torch.Tensor:
        """[N + 1, text_dim] for every item, in batches; cached in eval mode."""
        if self._table is not None and not self.training:
            return self._table
        rows = torch.arange(self.token_ids.shape[0], device=self.token_ids.device)
        with torch.no_grad():
            table = torch.cat([self.encode(chunk) for chunk in rows.split(self.batch_size)])
        if not self.training:
            self._table = table
        return table

    def set_tokens(self, token_ids: torch.Tensor, token_counts: torch.Tensor) -> None:
        """Replace the items' tokens (e.g. from `tokenize_items`), growing or keeping the number of rows."""
        length = self.token_ids.shape[1]
        if token_ids.shape[1] != length or token_counts.shape[0] != token_ids.shape[0]:
            raise ValueError(
                f"item tokens have shape {tuple(token_ids.shape)} with {token_counts.shape[0]} counts; the model "
                f"needs [rows, {length}] and one count per row (model.item_text_max_length={length})"
            )
        device = self.token_ids.device
        self.token_ids = token_ids.to(device=device, dtype=torch.long).clone()
        self.token_counts = token_counts.to(device=device, dtype=torch.long).clone()
        self._table = None

    def train(self, mode: bool = True) -> ItemTower:
        self._table = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._table = None
        super()._load_from_state_dict(*args, **kwargs)


@torch.no_grad()
def load_item_tower(tower: ItemTower, path_or_uri: str) -> None:
    """Copy the checkpoint's weights into `tower.lm` (BERT's pooler, which the tower does not use, aside)."""
    from transformers import AutoModel

    from rec_train.model.hf_checkpoint import backbone_folder

    with tempfile.TemporaryDirectory(prefix="rayrec-item-tower-") as tmp:
        source = AutoModel.from_pretrained(
            storage.local_folder(backbone_folder(path_or_uri), tmp, "item tower checkpoint"),
            use_safetensors=True,
        ).state_dict()
    state = {k: v for k, v in source.items() if not k.startswith("pooler.")}
    missing, unexpected = tower.lm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"item tower {path_or_uri!r} does not match its own config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    tower._table = None


def freeze_item_tower(tower: ItemTower, top_layers: int) -> list[str]:
    """Only the LM's top `top_layers` blocks (and its final norm) train; 0 freezes the LM. Returns the
    names of its trainable parameters."""
    blocks = sorted({int(m[1]) for name, _ in tower.lm.named_parameters() if (m := LAYER_RE.match(name))})
    if top_layers > len(blocks):
        raise ConfigError(
            f"model.item_tower_layers={top_layers} but the item tower has {len(blocks)} layers; give at most "
            f"{len(blocks)} (or null for all of it)"
        )
    top = set(blocks[len(blocks) - top_layers :])
    trainable = []
    for name, param in tower.lm.named_parameters():
        match = LAYER_RE.match(name)
        train = (match is not None and int(match[1]) in top) or (
            top_layers > 0 and name.startswith(FINAL_NORMS)
        )
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable


def save_tokenizer(source: str, folder: str) -> None:
    """Write the tokenizer of `source` (tower checkpoint or earlier export) into the local `folder`."""
    load_tokenizer(source).save_pretrained(folder)
