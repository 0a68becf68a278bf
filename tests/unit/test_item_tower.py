"""The LM item tower: item vectors from item text by a trainable language model (a tiny BERT saved on the fly)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rec_train.config import ConfigError, load_config
from rec_train.model import RecModel
from rec_train.model.item_tower import freeze_item_tower, load_item_tower, load_tokenizer, tokenize_items
from rec_train.model.peft_utils import apply_lora, trainable_parameter_names
from rec_train.model.text import TextEncoder
from rec_train.train.config import TrainConfig, model_config
from rec_train.train.launch import launch
from tests.conftest import TEXTS

ITEM_TEXTS = [*TEXTS, "", "Toy Story (1995). Animation, Comedy"]  # item 4 has no text, item 5 repeats item 1
TOWER_KEYS = {"loss": "sampled_softmax", "negatives_per": "batch", "num_negatives": 4, "l2_normalize": True}


def tower_model(tiny_bert: Path, batch_size: int = 2, **overrides: object) -> RecModel:
    config = model_config(
        "tiny",
        None,
        None,
        {**TOWER_KEYS, "item_tower_batch_size": batch_size, **overrides},
        str(tiny_bert),
        num_items=len(ITEM_TEXTS),
    )
    model = RecModel(config)
    load_item_tower(model.items.tower, str(tiny_bert))
    model.set_item_tokens(
        *tokenize_items(load_tokenizer(str(tiny_bert)), ITEM_TEXTS, config.item_text_max_length)
    )
    return model


def test_the_tower_computes_what_the_language_model_computes(tiny_bert: Path) -> None:
    model = tower_model(tiny_bert).eval()
    assert model.config.text_dim == 16 and model.config.item_representation == "text"
    table = model.items.text_table()  # [N + 1, 16], in batches of 2
    expected = TextEncoder(str(tiny_bert), pooling="mean").encode(TEXTS, progress=False)
    torch.testing.assert_close(table[1:4], expected, atol=1e-5, rtol=0)
    assert torch.equal(table[0], torch.zeros(16)) and torch.equal(table[4], torch.zeros(16))
    torch.testing.assert_close(table[5], table[1])
    # one batch for every item gives the same table as batches of 2
    whole = tower_model(tiny_bert, batch_size=64).eval().items.text_table()
    torch.testing.assert_close(whole, table, atol=1e-6, rtol=0)


def test_the_table_is_cached_in_eval_mode_and_recomputed_after_training(tiny_bert: Path) -> None:
    model = tower_model(tiny_bert).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.item_embeddings()
    assert model.items.tower.table() is model.items.tower.table()  # cached
    weight = model.items.tower.lm.encoder.layer[1].output.dense.weight
    model.train()
    with torch.no_grad():
        weight.add_(torch.randn_like(weight))
    model.eval()
    assert not torch.allclose(model.item_embeddings(), first)  # training dropped the cached table
    model.load_state_dict(original)  # and so does loading weights
    torch.testing.assert_close(model.item_embeddings(), first)


def test_training_reaches_the_language_model(tiny_bert: Path) -> None:
    model = tower_model(tiny_bert).train()
    histories = torch.tensor([[0, 1, 2, 3], [1, 5, 2, 1]])
    labels = torch.tensor([[0, 2, 3, 5], [5, 2, 1, 3]])
    loss = model(histories, labels=labels).loss
    loss.backward()
    lm = model.items.tower.lm
    assert lm.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert lm.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert not any(name.startswith("pooler") for name, _ in lm.named_parameters())


def test_save_and_load_keep_the_tower_and_its_tokens(tiny_bert: Path, tmp_path: Path) -> None:
    model = tower_model(tiny_bert).eval()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = RecModel.from_pretrained(tmp_path / "m", use_safetensors=True).eval()
    assert torch.equal(loaded.items.tower.token_ids, model.items.tower.token_ids)
    torch.testing.assert_close(loaded.item_embeddings(), model.item_embeddings())
    histories = torch.tensor([[0, 1, 2], [2, 3, 1]])
    assert torch.equal(loaded.score(histories, k=3)[0], model.score(histories, k=3)[0])


def test_new_items_get_vectors_from_their_text(tiny_bert: Path) -> None:
    model = tower_model(tiny_bert, item_representation="id+text", fusion="gate").eval()
    before = model.item_embeddings()
    texts = [*ITEM_TEXTS, "The Matrix (1999). Action, Thriller", "Heat"]
    tokens = tokenize_items(load_tokenizer(str(tiny_bert)), texts, model.config.item_text_max_length)
    model.resize_items(len(texts), item_tokens=tokens)
    after = model.item_embeddings()
    assert after.shape == (len(texts) + 1, 16)
    torch.testing.assert_close(after[: before.shape[0]], before)
    text = model.items.text_table()
    torch.testing.assert_close(text[6], text[2])  # the same text, the same text vector
    with pytest.raises(ValueError, match="needs item_tokens"):
        model.resize_items(len(texts) + 1)


def test_top_layers_and_lora(tiny_bert: Path) -> None:
    model = tower_model(tiny_bert)
    trainable = freeze_item_tower(model.items.tower, 1)
    assert trainable and all(name.startswith("encoder.layer.1.") for name in trainable)
    assert freeze_item_tower(model.items.tower, 0) == []
    with pytest.raises(ConfigError, match="has 2 layers"):
        freeze_item_tower(model.items.tower, 3)

    model = tower_model(tiny_bert).eval()
    lora = apply_lora(model, r=2, alpha=4)
    names = trainable_parameter_names(lora)
    assert any(".items.tower.lm.encoder.layer.0.attention.self.query.lora_A" in n for n in names)
    assert any(".encoder.layers.0." in n and "lora_A" in n for n in names)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    histories = torch.tensor([[0, 1, 2], [2, 3, 1]])
    lora.eval()
    with torch.no_grad():
        expected = lora.base_model.model.encode_users(histories) @ lora.base_model.model.item_embeddings().T
    merged = lora.merge_and_unload().eval()
    merged.items.tower.train().eval()  # drop the table cached before the merge
    scores = merged.encode_users(histories) @ merged.item_embeddings().T
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_bad_item_towers_fail_when_the_config_loads(tiny_bert: Path, tmp_path: Path) -> None:
    def load(*overrides: str) -> TrainConfig:
        keys = "{loss: sampled_softmax, negatives_per: batch}"
        return load_config(TrainConfig, None, ["data.path=unused", f"model.overrides={keys}", *overrides])

    assert load(f"model.item_tower={tiny_bert}", "model.item_tower_layers=1").model.item_tower_layers == 1
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert, no_tokenizer)
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="model.item_tower: item tower .* has weights but no tokenizer"):
        load(f"model.item_tower={no_tokenizer}")
    with pytest.raises(ConfigError, match="model.item_tower: item tower .* is not a folder"):
        load(f"model.item_tower={tmp_path / 'missing'}")
    with pytest.raises(
        ConfigError, match="needs model.loss='sampled_softmax' and model.negatives_per='batch'"
    ):
        load_config(TrainConfig, None, ["data.path=unused", f"model.item_tower={tiny_bert}"])
    with pytest.raises(ConfigError, match="needs a model.item_tower"):
        load("model.item_tower_layers=1")
    with pytest.raises(ConfigError, match="text_dim=384 contradicts item tower .* width is 16"):
        load(f"model.item_tower={tiny_bert}", "model.overrides.text_dim=384")
    with pytest.raises(ConfigError, match="set it to 'text' or 'id\\+text'"):
        load(f"model.item_tower={tiny_bert}", "model.overrides.item_representation=id")
    with pytest.raises(ConfigError, match="model.item_tower=.* starts a new model, but --init-from"):
        launch(load(f"model.item_tower={tiny_bert}"), init_from=str(tmp_path))
