"""Exact and approximate (faiss IVF, HNSW) top-k behind one interface, the index stored in the model folder,
and the Predictor and `rec-serve index` using it (S3 through moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rec_serve.cli import main as serve_main
from rec_serve.predictor import Predictor, RecommendRequest, RequestError
from rec_serve.retrieval import ExactRetriever, IndexParams, index_files, make_retriever
from rec_serve.synthetic import write_tiny_model
from rec_train import storage


def clustered(items: int, dim: int = 16, clusters: int = 50, seed: int = 0) -> torch.Tensor:
    """[items + 1, dim] unit vectors around `clusters` centres (row 0 padding), as trained item vectors are."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    rows = centres[torch.randint(clusters, (items,), generator=g)] + 0.3 * torch.randn(
        items, dim, generator=g
    )
    return torch.cat([torch.zeros(1, dim), torch.nn.functional.normalize(rows, dim=-1)])


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (
        sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)) / truth.numel()
    )


@pytest.mark.parametrize(
    ("kind", "score_error", "least_recall"),
    [("ivf", 0.0, 0.9), ("hnsw", 0.0, 0.9), ("fp16", 1e-3, 0.99), ("int8", 0.03, 0.95)],
)  # fmt: skip
def test_an_index_finds_what_exact_search_finds(
    kind: str, score_error: float, least_recall: float, tmp_path: Path
) -> None:
    matrix = clustered(5000)
    users = clustered(64, seed=1)[1:]
    exclude = torch.randint(1, 5001, (64, 20))
    exact_ids, exact_scores = ExactRetriever(matrix).search(users, 10, exclude)
    ids, scores = make_retriever(kind, matrix, IndexParams(nprobe=16)).search(users, 10, exclude)
    assert ids.shape == scores.shape == (64, 10)
    assert recall(ids, exact_ids) >= least_recall
    assert not (ids[:, :, None] == exclude[:, None, :]).any() and (ids > 0).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    found = ids == exact_ids
    # the model's own scores; fp16 / int8 rows: up to their rounding, not more
    torch.testing.assert_close(scores[found], exact_scores[found], atol=score_error or 1e-5, rtol=0)
    if score_error:
        assert not torch.equal(scores[found], exact_scores[found])

    # fewer candidates than k: -inf (id 0) past them
    small = clustered(30)
    ids, scores = make_retriever(kind, small).search(users[:2], 40, torch.arange(1, 11).repeat(2, 1))
    assert (scores[:, :20] > float("-inf")).all() and (scores[:, 20:] == float("-inf")).all()
    assert set(ids[0, :20].tolist()) == set(range(11, 31))


def test_the_index_is_stored_in_the_folder_and_rebuilt_for_another_model(tmp_path: Path) -> None:
    matrix = clustered(2000)
    make_retriever("ivf", matrix, folder=tmp_path, model_version="v1", writable=True)
    stored, meta = (tmp_path / name for name in index_files("ivf"))
    assert json.loads(meta.read_text()) == {
        "kind": "ivf",
        "model_version": "v1",
        "items": 2000,
        "dim": 16,
        "nlist": 51,
    }
    written = stored.stat().st_mtime_ns
    users = clustered(8, seed=2)[1:]
    again = make_retriever("ivf", matrix, folder=tmp_path, model_version="v1", writable=True)
    assert stored.stat().st_mtime_ns == written  # read, not rebuilt
    assert recall(again.search(users, 10, None)[0], ExactRetriever(matrix).search(users, 10, None)[0]) >= 0.9
    make_retriever("ivf", clustered(1500), folder=tmp_path, model_version="v2", writable=True)
    assert json.loads(meta.read_text())["model_version"] == "v2"  # another model: rebuilt and replaced
    make_retriever("hnsw", matrix, folder=tmp_path, model_version="v1", writable=False)
    assert not (tmp_path / index_files("hnsw")[0]).exists()
    with pytest.raises(ValueError, match="not one of exact, ivf, hnsw, fp16, int8"):
        make_retriever("lsh", matrix)


def test_the_predictor_with_an_index(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "model", num_items=40)
    exact = Predictor.load(str(folder))
    hnsw = Predictor.load(str(folder), retrieval="hnsw")
    for user in [u for u, h in exact.histories.items() if h][:20]:
        request = RecommendRequest(user_id=user, k=10, explain=True)
        a, b = exact.recommend(request), hnsw.recommend(request)
        assert [r.item_id for r in b.items] == [r.item_id for r in a.items]  # 40 items: the graph is exact
        assert [r.because for r in b.items] == [r.because for r in a.items]
    with pytest.raises(RequestError, match="retrieval=hnsw does not compute"):
        hnsw.recommend(RecommendRequest(user_id="u1", popularity_penalty=1.0))
    described = hnsw.describe()
    assert described["retrieval"] == {"kind": "hnsw", "ef_search": 128}
    assert described["rerank"] == {"popularity_penalty": False, "diversity": False}
    assert exact.describe()["retrieval"] == {"kind": "exact"}
    int8 = Predictor.load(str(folder), retrieval="int8")
    assert int8.describe()["retrieval"] == {"kind": "int8", "bytes_per_item": exact.item_matrix.shape[1]}
    assert (folder / "index-int8.faiss").is_file()  # built at load, kept for the next replica


def test_rec_serve_index_local_and_s3(tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture) -> None:
    folder = write_tiny_model(tmp_path / "model", num_items=40)
    assert serve_main(["index", "--model", str(folder), "--retrieval", "ivf", "--nlist", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 40 and out["nlist"] == 1 and (folder / "index-ivf.faiss").is_file()
    assert (
        Predictor.load(str(folder), retrieval="ivf").describe()["retrieval"]["nlist"] == 1
    )  # the stored one

    uri = f"s3://{s3_bucket}/models/tiny"
    storage.copy_dir(
        storage.resolve(str(write_tiny_model(tmp_path / "s3model", num_items=40))), storage.resolve(uri)
    )
    assert serve_main(["index", "--model", uri, "--retrieval", "hnsw"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == f"{uri}/index-hnsw.faiss"
    assert storage.is_file(storage.resolve(f"{uri}/index-hnsw.json"))
    served = Predictor.load(uri, retrieval="hnsw")
    assert served.recommend(RecommendRequest(user_id="u3", k=5)).items

    assert serve_main(["index", "--model", str(folder), "--retrieval", "ivf", "--nlist", "0"]) == 2
    assert "--nlist must be >= 1" in capsys.readouterr().err
    assert serve_main(["index", "--model", str(tmp_path / "missing"), "--retrieval", "ivf"]) == 2
