"""`RecConfig`: everything that defines a rayrec model, saved as `config.json` next to the weights."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from pydantic import TypeAdapter, ValidationError
from transformers import PretrainedConfig

ENCODERS = ("llama", "qwen2", "gpt2", "bert", "sasrec", "hstu")
CAUSAL_ENCODERS = ("llama", "qwen2", "gpt2", "sasrec", "hstu")
ROTARY_ENCODERS = ("llama", "qwen2")  # rotary positions: any history length
ITEM_REPRESENTATIONS = ("id", "text", "id+text")
FUSIONS = ("sum", "concat", "gate")
OBJECTIVES = ("next_item", "masked_item")
LOSSES = ("full_softmax", "sampled_softmax")
NEGATIVE_SAMPLERS = ("in_batch", "uniform", "popularity")
NEGATIVES_PER = ("batch", "position")
POINTWISE_HEADS = ("rating", "click")


class RecConfig(PretrainedConfig):
    """A sequential recommender: item representation -> transformer encoder -> user vector . item vectors.

    `hidden_size` (d) is the width of item and user vectors; the transformer runs at
    `backbone_hidden_size` (D, default d) with linear projections in and out where the two differ,
    so a pretrained language-model backbone can sit between item vectors of any width.
    """

    model_type = "rayrec"

    # items
    num_items: int = 1000
    hidden_size: int = 64
    item_representation: str = "id"
    fusion: str = "sum"
    text_dim: int = 0
    # the LM item tower (item_tower.py): the item LM's Hugging Face config, set from model.item_tower
    item_tower: dict[str, Any] | None = None
    item_tower_source: str | None = None
    item_text_max_length: int = 32  # tokens kept per item text
    item_tower_batch_size: int = 256  # items per LM forward pass when the whole item table is computed
    # sequence encoder
    encoder: str = "llama"
    backbone_hidden_size: int | None = None
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int | None = None
    intermediate_size: int = 256
    hidden_act: str = "silu"
    max_seq_len: int = 200
    scale_embedding: bool = False  # item vectors x sqrt(d) before the encoder, as SASRec
    embedding_dropout: float = 0.1
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hstu_num_buckets: int = 32
    initializer_range: float = 0.02
    backbone_source: str | None = None
    # objective
    objective: str = "next_item"
    loss: str = "full_softmax"
    negative_sampler: str = "in_batch"
    num_negatives: int = 128
    negatives_per: str = "batch"  # batch: K negatives shared by the batch; position: K for every position
    temperature: float = 1.0
    l2_normalize: bool = False
    logq_correction: bool = False
    exclude_history: bool = False  # full softmax: items up to position t are not negatives of position t
    mask_prob: float = 0.2
    pointwise_head: str | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.convert_types()
        self.check()

    def convert_types(self) -> None:
        """Give each key its annotated type, converted as the training config converts its own keys
        ("64" -> 64, "1e-8" -> 1e-08, 64.0 -> 64); raise `ValueError` naming a key whose value has none."""
        for key, (written, adapter) in field_types().items():
            value = getattr(self, key)
            try:
                setattr(self, key, adapter.validate_python(value))
            except ValidationError:
                raise ValueError(f"model.{key}={value!r} is not a valid {written}") from None

    def check(self) -> None:
        """Raise `ValueError` naming the key, its value and the allowed values."""
        choices = {
            "encoder": ENCODERS,
            "item_representation": ITEM_REPRESENTATIONS,
            "fusion": FUSIONS,
            "objective": OBJECTIVES,
            "loss": LOSSES,
            "negative_sampler": NEGATIVE_SAMPLERS,
            "negatives_per": NEGATIVES_PER,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.pointwise_head is not None and self.pointwise_head not in POINTWISE_HEADS:
            raise ValueError(
                f"model.pointwise_head={self.pointwise_head!r} is not one of {', '.join(POINTWISE_HEADS)} or null"
            )
        for key in (
            "num_items",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_seq_len",
            "intermediate_size",
            "num_negatives",
            "item_text_max_length",
            "item_tower_batch_size",
        ):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.uses_text and self.text_dim < 1:
            raise ValueError(
                f"model.item_representation={self.item_representation!r} needs model.text_dim (the width of "
                "item_text_embeddings.safetensors, e.g. 384 for all-MiniLM-L6-v2); run `rec-train embed-items` first"
            )
        if self.item_tower is not None:
            self.check_item_tower()
        width = self.backbone_width
        if width % self.num_attention_heads:
            raise ValueError(
                f"the backbone width {width} is not divisible by model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.objective == "masked_item" and self.encoder != "bert":
            raise ValueError(
                f"model.objective='masked_item' needs a bidirectional encoder: set model.encoder='bert' "
                f"(got {self.encoder!r})"
            )
        if self.encoder == "bert" and self.objective != "masked_item":
            raise ValueError(
                "model.encoder='bert' sees the whole sequence: set model.objective='masked_item'"
            )
        if self.exclude_history and (self.loss != "full_softmax" or self.objective != "next_item"):
            raise ValueError(
                "model.exclude_history=true needs model.loss='full_softmax' and model.objective='next_item' "
                f"(got loss={self.loss!r}, objective={self.objective!r}); set it to false for other losses"
            )
        if not self.temperature > 0.0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"model.mask_prob must be in [0, 1), got {self.mask_prob}")

    def check_item_tower(self) -> None:
        """The LM item tower runs on the items a batch needs, so the loss must not need every item's vector."""
        if not self.uses_text:
            raise ValueError(
                f"model.item_tower computes text vectors, but model.item_representation="
                f"{self.item_representation!r} uses none: set it to 'text' or 'id+text'"
            )
        if self.loss != "sampled_softmax" or self.negatives_per != "batch":
            raise ValueError(
                "model.item_tower needs model.loss='sampled_softmax' and model.negatives_per='batch' (got "
                f"loss={self.loss!r}, negatives_per={self.negatives_per!r}): the full softmax and per-position "
                "negatives would run the item language model over the whole catalogue at every step"
            )

    @property
    def uses_ids(self) -> bool:
        return self.item_representation in ("id", "id+text")

    @property
    def uses_text(self) -> bool:
        return self.item_representation in ("text", "id+text")

    @property
    def backbone_width(self) -> int:
        return self.backbone_hidden_size or self.hidden_size

    @property
    def is_causal(self) -> bool:
        return self.encoder in CAUSAL_ENCODERS


@functools.cache
def field_types() -> dict[str, tuple[str, TypeAdapter]]:
    """key -> (its type as written, a validator of that type), for the keys `RecConfig` defines itself."""
    written = inspect.get_annotations(RecConfig)
    types = inspect.get_annotations(RecConfig, eval_str=True)
    return {key: (written[key], TypeAdapter(types[key])) for key in types}
