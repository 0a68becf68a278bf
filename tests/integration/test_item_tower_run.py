"""The LM item tower end to end on the session's shared local Ray: `rec-train pretrain` with `model.item_tower`
(a tiny BERT and its tokenizer) on 2 Ray Train workers with DeepSpeed ZeRO-2, only the tower's top layer
training; `rec-train export` (with the tokenizer); `rec-train add-items`; and Ray Serve over HTTP moving from
the trained version to the one with the new item, which it recommends without retraining."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from local_cluster import free_port
from ray import serve
from safetensors.torch import load_file
from tiny_data import write_dataset
from transformers import BertModel

from rec_serve.app import APP_NAME, build_app
from rec_train import exported
from rec_train.cli import main
from rec_train.data.dataset import read_sequences
from rec_train.model import RecModel
from rec_train.train.evaluate import evaluate_model
from tests.unit.test_add_items import item_texts

CONFIG = """\
data: {path: data}
model:
  size: tiny
  item_tower: TOWER
  item_tower_layers: 1
  overrides: {loss: sampled_softmax, negatives_per: batch, num_negatives: 16, l2_normalize: true, temperature: 0.1}
optim: {lr: 0.01, warmup_ratio: 0.0}
deepspeed: {zero_stage: 2}
train: {epochs: 1, batch_size: 32}
eval: {ks: [10]}
scaling: {num_workers: 2}
run: {name: tower, storage: runs}
"""


def last_json(out: pytest.CaptureFixture | io.StringIO) -> dict:
    """The JSON summary a command printed last."""
    text = out.getvalue() if isinstance(out, io.StringIO) else out.readouterr().out
    return json.loads(text.strip().splitlines()[-1])


@dataclass
class Trained:
    root: Path  # the command's directory: data, runs, v1 (the exported model)
    texts: list[str]
    result: dict  # what `rec-train pretrain` printed
    exported: dict  # what `rec-train export` printed


@pytest.fixture(scope="module")
def trained(ray_shared: None, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """`rec-train pretrain` with the item tower, from the CLI, then `rec-train export` to v1."""
    root = tmp_path_factory.mktemp("tower")
    texts = item_texts(60)
    write_dataset(root / "data", items=60, step=1, seed=0, users=64, texts=texts)
    (root / "tower.yaml").write_text(CONFIG.replace("TOWER", str(tiny_bert)))
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(io.StringIO()) as out:
        mp.chdir(root)  # relative data and run paths, as a user types them
        assert main(["pretrain", "--config", "tower.yaml", "--no-progress"]) == 0
        result = last_json(out)
        assert main(["export", "--checkpoint", result["checkpoint"], "--output", "v1"]) == 0
        yield Trained(root, texts, result, last_json(out))


def test_an_item_tower_trains_exports_and_serves_new_items(
    trained: Trained, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tmp_path, texts, result = trained.root, trained.texts, trained.result
    monkeypatch.chdir(tmp_path)
    assert 0 < result["trainable_parameters"] < result["parameters"]
    model = RecModel.from_pretrained(tmp_path / "v1", use_safetensors=True).eval()
    assert (
        model.config.item_tower_source == str(tiny_bert)
        and (tmp_path / "v1" / exported.TOKENIZER_DIR).is_dir()
    )
    source = BertModel.from_pretrained(tiny_bert).state_dict()
    tower = model.items.tower.lm.state_dict()
    for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(tower[name], source[name])  # frozen: item_tower_layers=1
    assert not torch.equal(
        tower["encoder.layer.1.output.dense.weight"], source["encoder.layer.1.output.dense.weight"]
    )
    # the workers' evaluation (the tower's table under ZeRO-2) is the exported model's, scored in one process
    single = evaluate_model(model, read_sequences(str(tmp_path / "data")), "test", [10])
    assert single["ndcg@10"] == result["test_ndcg@10"] == trained.exported["test_ndcg@10"]

    (tmp_path / "new.csv").write_text(f"item_id,title\nnew-1,{texts[4]}\n")  # item 5's text
    assert main(["add-items", "--model", "v1", "--items", "new.csv", "--output", "v2"]) == 0
    v2 = last_json(capsys)["model_version"]
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": str(tmp_path / "v1")}), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            body = {"history": ["i1", "i2", "i3"], "k": 61}
            before = client.post("/v1/recommend", json=body).json()
            assert "new-1" not in [item["item_id"] for item in before["items"]]
            serve.run(build_app({"model": str(tmp_path / "v2")}), name=APP_NAME, route_prefix="/")
            assert client.get("/v1/model").json()["model_version"] == v2
            after = client.post("/v1/recommend", json=body).json()
            scores = {item["item_id"]: item["score"] for item in after["items"]}
            assert scores["new-1"] == pytest.approx(scores["i5"])  # placed by its text: item 5's twin
            similar = client.post("/v1/similar-items", json={"item_id": "new-1", "k": 1}).json()
            assert similar["items"][0]["item_id"] == "i5"
    finally:
        serve.shutdown()


@pytest.mark.e2e
def test_lora_on_the_tower_and_the_encoder_under_zero3(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rec-train finetune` with LoRA on 2 ZeRO-3 workers: adapters on the item tower's and the encoder's
    projections, merged at export by peft, which then scores what the workers reported."""
    monkeypatch.chdir(trained.root)
    (trained.root / "lora.yaml").write_text(
        CONFIG.replace("  item_tower: TOWER\n  item_tower_layers: 1\n", "").replace(
            "tower, storage", "lora, storage"
        )
        + "finetune: {lora_rank: 4, lora_alpha: 8}\n"
    )
    out = io.StringIO()
    with redirect_stdout(out):
        args = [
            "finetune",
            "--config",
            "lora.yaml",
            "--from",
            "v1",
            "--no-progress",
            "deepspeed.zero_stage=3",
        ]
        assert main(args) == 0
        tuned = last_json(out)
        assert main(["export", "--checkpoint", tuned["checkpoint"], "--output", "v1-lora"]) == 0
    assert 0 < tuned["trainable_parameters"] < tuned["parameters"] / 2
    before = load_file(str(trained.root / "v1" / "model.safetensors"))
    after = load_file(str(trained.root / "v1-lora" / "model.safetensors"))
    changed = {k for k in before if not before[k].equal(after[k])}
    assert any(k.startswith("items.tower.lm.encoder.layer.0.attention.self.") for k in changed)
    assert any(k.startswith("encoder.layers.") for k in changed)
    assert all(".layer." in k or ".layers." in k for k in changed), changed  # adapters merged into the blocks
    assert set(after) == set(before) and (trained.root / "v1-lora" / exported.TOKENIZER_DIR).is_dir()
    model = RecModel.from_pretrained(trained.root / "v1-lora", use_safetensors=True).eval()
    single = evaluate_model(model, read_sequences(str(trained.root / "data")), "test", [10])
    assert single["ndcg@10"] == pytest.approx(tuned["test_ndcg@10"], abs=1e-9)
