"""Predictor: loading an exported folder, top-k against the model itself, batching, fallbacks, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rec_serve.predictor import (
    ModelFolderError,
    NotFoundError,
    Predictor,
    RecommendRequest,
    RequestError,
)
from rec_serve.synthetic import item_id, write_tiny_model
from rec_train.data.collate import pad_left


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "v1", model_version="v1")


@pytest.fixture(scope="module")
def predictor(folder: Path) -> Predictor:
    return Predictor.load(str(folder))


def ids(response) -> list[str]:
    return [r.item_id for r in response.items]


def test_load_reads_version_metrics_items_and_histories(predictor: Predictor) -> None:
    info = predictor.describe()
    assert info["model_version"] == "v1"
    assert info["num_items"] == 40 and info["num_users"] == 50
    assert info["metrics"]["valid"] == {"ndcg@10": 0.0}
    assert predictor.item(item_id(1)) == {
        "item_id": "17",
        "title": "Item 1",
        "count": int(predictor.counts[1]),
    }
    assert predictor.item_matrix.shape == (41, 16)


def test_top_k_matches_the_models_own_score(predictor: Predictor) -> None:
    user = "u7"
    history = predictor.histories[user]
    input_ids, mask = pad_left([history], predictor.max_seq_len)
    want_ids, want_scores = predictor.model.score(input_ids, mask, k=10, exclude_history=True)
    [got] = predictor.recommend_batch([RecommendRequest(user_id=user, k=10)])
    assert ids(got) == [predictor.item_ids[i] for i in want_ids[0].tolist()]
    assert [r.score for r in got.items] == pytest.approx(want_scores[0].tolist(), abs=1e-5)
    assert not got.fallback and got.model_version == "v1"


def test_history_request_equals_user_request_with_the_same_items(predictor: Predictor) -> None:
    history = [predictor.item_ids[i] for i in predictor.histories["u3"]]
    by_user, by_history = predictor.recommend_batch(
        [RecommendRequest(user_id="u3", k=5), RecommendRequest(history=history, k=5)]
    )
    assert ids(by_user) == ids(by_history)


def test_a_batch_of_mixed_lengths_equals_requests_one_by_one(predictor: Predictor) -> None:
    requests = [RecommendRequest(user_id=f"u{u}", k=8) for u in range(1, 9)]
    batched = predictor.recommend_batch(requests)
    for request, response in zip(requests, batched, strict=True):
        [alone] = predictor.recommend_batch([request])
        assert ids(alone) == ids(response)
        assert [r.score for r in alone.items] == pytest.approx([r.score for r in response.items], abs=1e-5)


def test_exclusions(predictor: Predictor) -> None:
    history = predictor.histories["u5"]
    [plain] = predictor.recommend_batch([RecommendRequest(user_id="u5", k=40, exclude_history=False)])
    assert set(predictor.item_ids[i] for i in history) <= set(ids(plain))  # history items can come back
    [default] = predictor.recommend_batch([RecommendRequest(user_id="u5", k=40)])
    assert not set(predictor.item_ids[i] for i in history) & set(ids(default))
    assert len(default.items) == 40 - len(set(history))  # fewer candidates than k: all that remain
    banned = ids(default)[:3]
    [excluded] = predictor.recommend_batch([RecommendRequest(user_id="u5", k=5, exclude=banned)])
    assert not set(banned) & set(ids(excluded))
    assert ids(excluded) == ids(default)[3:8]


def test_explanations_name_history_items(predictor: Predictor) -> None:
    history = {predictor.item_ids[i] for i in predictor.histories["u9"]}
    [response] = predictor.recommend_batch([RecommendRequest(user_id="u9", k=5, explain=True)])
    for rec in response.items:
        assert rec.because and set(rec.because) <= history
    [quiet] = predictor.recommend_batch([RecommendRequest(user_id="u9", k=5)])
    assert all(rec.because is None for rec in quiet.items)


def test_unknown_history_items_are_listed_and_ignored(predictor: Predictor) -> None:
    [mixed] = predictor.recommend_batch([RecommendRequest(history=["nope", item_id(3)], k=5)])
    [clean] = predictor.recommend_batch([RecommendRequest(history=[item_id(3)], k=5)])
    assert mixed.unknown_items == ["nope"] and not mixed.fallback
    assert ids(mixed) == ids(clean)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (RecommendRequest(history=[], k=5), "the request has no history"),
        (RecommendRequest(history=["x", "y"], k=5), "none of the history items are known"),
        (RecommendRequest(user_id="u0", k=5), "this user has no history"),
    ],
)
def test_popularity_fallback_says_so(predictor: Predictor, request_: RecommendRequest, reason: str) -> None:
    [response] = predictor.recommend_batch([request_])
    assert response.fallback and reason in (response.message or "")
    counts = [predictor.counts[predictor.item_index[i]] for i in ids(response)]
    assert counts == sorted(counts, reverse=True)
    assert ids(response)[0] == predictor.item_ids[int(predictor.counts.argmax())]


def test_fallback_respects_exclusions(predictor: Predictor) -> None:
    [top] = predictor.recommend_batch([RecommendRequest(history=[], k=3)])
    [rest] = predictor.recommend_batch([RecommendRequest(history=[], k=3, exclude=ids(top)[:1])])
    assert ids(rest) == ids(top)[1:] + ids(rest)[2:]


def test_similar_items_are_ranked_by_cosine_and_exclude_the_item(predictor: Predictor) -> None:
    similar = predictor.similar_items(item_id(4), k=5)
    assert item_id(4) not in [s.item_id for s in similar]
    scores = [s.score for s in similar]
    assert scores == sorted(scores, reverse=True)
    unit = torch.nn.functional.normalize(predictor.model.item_embeddings().detach(), dim=-1)
    cosine = unit @ unit[4]  # [num_items + 1]
    cosine[[0, 4]] = -2.0  # padding and the item itself
    assert similar[0].item_id == item_id(int(cosine.argmax()))
    assert similar[0].score == pytest.approx(float(cosine.max()), abs=1e-5)


def test_errors(predictor: Predictor) -> None:
    with pytest.raises(NotFoundError, match="unknown user_id 'ghost'"):
        predictor.recommend_batch([RecommendRequest(user_id="ghost")])
    with pytest.raises(NotFoundError, match="unknown item_id"):
        predictor.similar_items("ghost")
    with pytest.raises(NotFoundError, match="unknown item_id"):
        predictor.item("ghost")
    with pytest.raises(RequestError, match="k must be at least 1"):
        predictor.recommend_batch([RecommendRequest(user_id="u1", k=0)])


def test_refuses_pickle_weights_and_incomplete_folders(folder: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pickle weights pytorch_model.bin, which are never loaded"):
        Predictor.load(str(pickled))
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "histories.parquet").unlink()
    with pytest.raises(ModelFolderError, match="missing histories.parquet"):
        Predictor.load(str(partial))
    with pytest.raises(ModelFolderError, match="no such model folder"):
        Predictor.load(str(tmp_path / "absent"))


def test_a_bf16_user_tower_ranks_as_fp32_does_up_to_rounding(folder: Path, predictor: Predictor) -> None:
    bf16 = Predictor.load(str(folder), user_tower="bf16")
    assert bf16.describe()["user_tower"] == "bf16" and predictor.describe()["user_tower"] == "fp32"
    users = [f"u{u}" for u in range(1, 50)]
    input_ids, mask = pad_left([predictor.histories[u] for u in users], predictor.max_seq_len)
    exact, rounded = predictor.encode(input_ids, mask), bf16.encode(input_ids, mask)  # [B, d] each
    assert rounded.dtype == torch.float32 and not torch.equal(exact, rounded)  # computed in bf16
    assert torch.allclose(exact, rounded, atol=0.05, rtol=0.05)
    requests = [RecommendRequest(user_id=u, k=10) for u in users]
    pairs = zip(predictor.recommend_batch(requests), bf16.recommend_batch(requests), strict=True)
    overlap = [len(set(ids(a)) & set(ids(b))) / 10 for a, b in pairs]
    assert sum(overlap) / len(overlap) >= 0.9, overlap
    with pytest.raises(ValueError, match="user_tower='int4' is not one of fp32, bf16, compiled"):
        Predictor.load(str(folder), user_tower="int4")


def test_a_compiled_user_tower_is_fp32_and_compiled_at_load(folder: Path, predictor: Predictor) -> None:
    from torch._dynamo.utils import counters

    compiled = Predictor.load(str(folder), user_tower="compiled")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and compiled.describe()["user_tower"] == "compiled"
    users = [f"u{u}" for u in range(1, 50)]
    for batch in ([users[0]], users[:5], users):  # 1, 5 and 49 histories of mixed lengths
        input_ids, mask = pad_left([predictor.histories[u] for u in batch], predictor.max_seq_len)
        torch.testing.assert_close(compiled.encode(input_ids, mask), predictor.encode(input_ids, mask))
    one = torch.tensor([[7]])  # a history of one item: padded to two positions, the same vector
    torch.testing.assert_close(
        compiled.encode(one, torch.ones_like(one)), predictor.encode(one, torch.ones_like(one))
    )
    assert counters["stats"]["unique_graphs"] == graphs  # no request compiled anything
    requests = [RecommendRequest(user_id=u, k=10) for u in users]
    pairs = zip(predictor.recommend_batch(requests), compiled.recommend_batch(requests), strict=True)
    assert sum(ids(a) == ids(b) for a, b in pairs) / len(users) >= 0.99


def test_a_user_tower_that_cannot_compile_fails_at_load(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config

    torch._dynamo.reset()  # nothing compiled before is reused
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    with pytest.raises(ModelFolderError, match="could not compile the user tower .*No working C.. compiler"):
        Predictor.load(str(folder), user_tower="compiled")
