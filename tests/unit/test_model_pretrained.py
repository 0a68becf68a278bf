"""The sequence encoder initialised from a pretrained Hugging Face checkpoint saved to a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from rec_train.config import ConfigError
from rec_train.model import RecModel
from rec_train.model.pretrained import config_from_backbone, load_backbone


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_llama_backbone_with_projection(tiny_llama: Path) -> None:
    config = config_from_backbone(str(tiny_llama), size="tiny")
    assert (config.encoder, config.backbone_hidden_size, config.hidden_size) == ("llama", 32, 16)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    model = RecModel(config).eval()
    loaded = load_backbone(model, str(tiny_llama))
    source = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert "layers.1.self_attn.k_proj.weight" in loaded and "norm.weight" in loaded
    assert torch.equal(model.encoder.layers[1].mlp.up_proj.weight, source.model.layers[1].mlp.up_proj.weight)
    assert model.in_proj.weight.shape == (32, 16) and model.out_proj.weight.shape == (16, 32)
    ids, scores = model.score(torch.tensor([[0, 1, 2, 3]]), k=5)
    assert ids.shape == (1, 5) and torch.isfinite(scores).all()


def test_bert_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=20,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path)
    config = config_from_backbone(str(tmp_path), size="tiny")
    assert (config.encoder, config.objective) == ("bert", "masked_item")
    model = RecModel(config)
    load_backbone(model, str(tmp_path))
    source = BertModel.from_pretrained(tmp_path)
    assert torch.equal(
        model.encoder.position_embeddings.weight, source.embeddings.position_embeddings.weight[:21]
    )
    assert torch.equal(
        model.encoder.layers[0].attention.self.query.weight,
        source.encoder.layer[0].attention.self.query.weight,
    )


def test_mismatched_backbone_is_an_error(tiny_llama: Path) -> None:
    model = RecModel(config_from_backbone(str(tiny_llama), size="tiny", num_key_value_heads=4))
    with pytest.raises(ConfigError, match="k_proj.weight has shape"):
        load_backbone(model, str(tiny_llama))
