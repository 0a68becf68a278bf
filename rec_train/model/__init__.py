"""The rayrec recommender: a Hugging Face `PreTrainedModel` (no Ray or DeepSpeed imports here)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from rec_train.model.configuration import RecConfig
from rec_train.model.modeling import RecModel, RecOutput
from rec_train.model.sizes import SIZES, build_config, count_parameters

AutoConfig.register(RecConfig.model_type, RecConfig, exist_ok=True)
AutoModel.register(RecConfig, RecModel, exist_ok=True)

__all__ = ["SIZES", "RecConfig", "RecModel", "RecOutput", "build_config", "count_parameters"]
