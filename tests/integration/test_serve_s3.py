"""A model exported to S3 (moto's real HTTP S3 server) loads and answers like the local folder."""

from __future__ import annotations

from pathlib import Path

from rec_serve.predictor import Predictor, RecommendRequest
from rec_serve.synthetic import write_tiny_model
from rec_train import storage


def test_predictor_loads_from_s3_like_from_a_local_folder(tmp_path: Path, s3_bucket: str) -> None:
    folder = write_tiny_model(tmp_path / "model", model_version="s3-v1")
    uri = f"s3://{s3_bucket}/models/tiny"
    storage.copy_dir(storage.resolve(str(folder)), storage.resolve(uri))
    remote = Predictor.load(uri, cache_dir=str(tmp_path / "cache"))
    local = Predictor.load(str(folder))
    assert remote.source == uri and remote.model_version == "s3-v1"
    requests = [RecommendRequest(user_id=f"u{u}", k=5, explain=True) for u in (1, 2, 3)]
    assert remote.recommend_batch(requests) == local.recommend_batch(requests)
    assert (tmp_path / "cache" / "model.safetensors").is_file()
