"""The LM item tower end to end on the session's shared local Ray: `rec-train pretrain` with `model.item_tower`
(a tiny BERT and its tokenizer) on 2 Ray Train workers with DeepSpeed ZeRO-2, only the tower's top layer
training; `rec-train export` (with the tokenizer); `rec-train add-items`; and Ray Serve over HTTP moving from
the trained version to the one with the new item, which it recommends without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from local_cluster import free_port
from ray import serve
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
train: {epochs: 2, batch_size: 32}
eval: {ks: [10]}
scaling: {num_workers: 2}
run: {name: tower, storage: runs}
"""


def last_json(capsys: pytest.CaptureFixture) -> dict:
    """The JSON summary a command prints last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_an_item_tower_trains_exports_and_serves_new_items(
    ray_shared: None,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    texts = item_texts(60)
    write_dataset(tmp_path / "data", items=60, step=1, seed=0, users=64, texts=texts)
    (tmp_path / "tower.yaml").write_text(CONFIG.replace("TOWER", str(tiny_bert)))
    monkeypatch.chdir(tmp_path)  # relative data and run paths, as a user types them
    assert main(["pretrain", "--config", "tower.yaml", "--no-progress"]) == 0
    result = last_json(capsys)
    assert 0 < result["trainable_parameters"] < result["parameters"]
    assert main(["export", "--checkpoint", result["checkpoint"], "--output", "v1"]) == 0
    exported_figures = last_json(capsys)  # after DeepSpeed's own lines

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
    assert single["ndcg@10"] == result["test_ndcg@10"] == exported_figures["test_ndcg@10"]

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
