"""An exported model whose weights are in safetensors shards (`rec-train export --max-shard-size`): the
Predictor, `load_model` and `from_pretrained` read it as they read one file, locally and from S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rec_serve.predictor import ModelFolderError, Predictor, RecommendRequest, check_model_folder
from rec_serve.synthetic import write_exported_model
from rec_train import exported, storage
from rec_train.cli import main
from rec_train.model import RecModel, build_config
from rec_train.train.saved_model import load_model


def folders(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = RecModel(build_config("tiny", num_items=400)).eval()
    whole = write_exported_model(tmp_path / "whole", model)
    sharded = write_exported_model(tmp_path / "sharded", model, max_shard_size="10KB")
    return whole, sharded


def test_a_sharded_model_serves_as_one_file_does(tmp_path: Path, s3_bucket: str) -> None:
    whole, sharded = folders(tmp_path)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    index = json.loads((sharded / exported.WEIGHTS_INDEX_FILE).read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (sharded / exported.WEIGHTS_FILE).exists()
    check_model_folder(str(sharded))

    uri = f"s3://{s3_bucket}/models/sharded"
    storage.copy_dir(storage.resolve(str(sharded)), storage.resolve(uri))
    reference = Predictor.load(str(whole))
    for predictor in (Predictor.load(str(sharded)), Predictor.load(uri)):
        torch.testing.assert_close(predictor.item_matrix, reference.item_matrix)
        request = RecommendRequest(user_id="u3", k=10)
        assert [r.item_id for r in predictor.recommend(request).items] == [
            r.item_id for r in reference.recommend(request).items
        ]
    model, _ = load_model(str(sharded))
    torch.testing.assert_close(model.item_embeddings(), reference.item_matrix)

    (sharded / shards[-1]).unlink()
    with pytest.raises(ModelFolderError, match="missing model.safetensors"):
        check_model_folder(str(sharded))


def test_a_bad_shard_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out"), "--max-shard-size"]
    assert main([*args, "lots"]) == 2
    assert "--max-shard-size 'lots' is not a size such as 2GB" in capsys.readouterr().err
