"""Predictor re-ranking knobs: `popularity_penalty` and `diversity` (MMR over item text vectors)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rec_serve.predictor import Predictor, RecommendRequest, RecommendResponse, RequestError
from rec_serve.schemas import RecommendBody
from rec_serve.synthetic import write_exported_model, write_tiny_model
from rec_train.data.collate import pad_left
from rec_train.model import RecModel, build_config

NUM_ITEMS = 40
USER = "u7"
K = 12


@pytest.fixture(scope="module")
def id_only(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.load(str(write_tiny_model(tmp_path_factory.mktemp("id") / "model")))


@pytest.fixture(scope="module")
def with_text(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """An id+text model whose scores ignore the text (zero text projection), so the text is ours to
    choose: one direction per item, except that USER's second-best item gets the best item's text."""
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    config = build_config("tiny", num_items=NUM_ITEMS, item_representation="id+text", text_dim=NUM_ITEMS + 1)
    model = RecModel(config)
    with torch.no_grad():
        model.items.text_proj.weight.zero_()
    text = torch.eye(NUM_ITEMS + 1)  # [num_items + 1, text_dim]: item i points along axis i
    text[0] = 0.0  # padding
    model.set_item_text_embeddings(text)
    first = Predictor.load(str(write_exported_model(root / "a", model)))
    best, second = indices(first, first.recommend(RecommendRequest(user_id=USER, k=K)))[:2]
    text[second] = text[best]
    model.set_item_text_embeddings(text)
    return Predictor.load(str(write_exported_model(root / "b", model)))


def indices(predictor: Predictor, response: RecommendResponse) -> list[int]:
    return [predictor.item_index[r.item_id] for r in response.items]


def listed(response: RecommendResponse) -> list[tuple[str, float]]:
    return [(r.item_id, r.score) for r in response.items]


def mean_pairwise_cosine(predictor: Predictor, items: list[int]) -> float:
    """Mean cosine similarity of the items' text vectors over all pairs of distinct positions."""
    unit = torch.nn.functional.normalize(predictor.model.items.text_embeddings[items], dim=-1)  # [n, t]
    sims = unit @ unit.T  # [n, n]
    return float((sims.sum() - sims.diagonal().sum()) / (len(items) * (len(items) - 1)))


@pytest.mark.parametrize("which", ["id_only", "with_text"])
def test_zero_knobs_give_todays_lists(which: str, request: pytest.FixtureRequest) -> None:
    predictor: Predictor = request.getfixturevalue(which)
    for user in ("u1", "u7", "u20"):
        default = predictor.recommend(RecommendRequest(user_id=user, k=10))
        zeros = predictor.recommend(
            RecommendRequest(user_id=user, k=10, popularity_penalty=0.0, diversity=0.0)
        )
        assert listed(zeros) == listed(default)
        input_ids, mask = pad_left([predictor.histories[user]], predictor.max_seq_len)
        want_ids, want_scores = predictor.model.score(input_ids, mask, k=10, exclude_history=True)
        assert indices(predictor, zeros) == want_ids[0].tolist()
        assert [r.score for r in zeros.items] == pytest.approx(want_scores[0].tolist(), abs=1e-5)


def test_a_large_popularity_penalty_moves_less_popular_items_up(id_only: Predictor) -> None:
    for user in ("u1", "u2", "u3", "u7", "u20"):
        plain = id_only.recommend(RecommendRequest(user_id=user, k=10))
        penalised = id_only.recommend(RecommendRequest(user_id=user, k=10, popularity_penalty=10.0))
        plain_counts = [id_only.counts[i] for i in indices(id_only, plain)]
        penalised_counts = [id_only.counts[i] for i in indices(id_only, penalised)]
        assert sum(penalised_counts) / 10 < sum(plain_counts) / 10
        # each item keeps the model's own score: the one a plain full list gives it
        full = dict(listed(id_only.recommend(RecommendRequest(user_id=user, k=NUM_ITEMS))))
        assert [r.score for r in penalised.items] == [full[r.item_id] for r in penalised.items]


def test_diversity_leaves_out_the_near_duplicate(with_text: Predictor) -> None:
    plain = with_text.recommend(RecommendRequest(user_id=USER, k=K))
    diverse = with_text.recommend(RecommendRequest(user_id=USER, k=K, diversity=1.0))
    plain_ids, diverse_ids = indices(with_text, plain), indices(with_text, diverse)
    assert diverse_ids[0] == plain_ids[0]  # the top-scored item stays first
    assert plain_ids[1] not in diverse_ids  # the best item's twin
    assert mean_pairwise_cosine(with_text, diverse_ids) < mean_pairwise_cosine(with_text, plain_ids)


@pytest.mark.parametrize("diversity", [0.3, 1.0])
def test_diverse_lists_start_with_the_best_item_and_keep_model_scores(
    with_text: Predictor, diversity: float
) -> None:
    for user in ("u1", "u4", "u9"):
        full = with_text.recommend(RecommendRequest(user_id=user, k=NUM_ITEMS))  # every candidate, best first
        diverse = with_text.recommend(RecommendRequest(user_id=user, k=8, diversity=diversity))
        assert len(diverse.items) == 8 and diverse.items[0].item_id == full.items[0].item_id
        assert listed(diverse) == [(r.item_id, dict(listed(full))[r.item_id]) for r in diverse.items]
        everything = with_text.recommend(RecommendRequest(user_id=user, k=NUM_ITEMS, diversity=diversity))
        assert sorted(listed(everything)) == sorted(listed(full))  # fewer candidates than k: all of them


def test_a_batch_with_mixed_knobs_equals_requests_one_by_one(with_text: Predictor) -> None:
    knobs = [(0.0, 0.0), (10.0, 0.0), (0.0, 1.0), (2.0, 0.5), (0.0, 0.0), (10.0, 0.0)]
    requests = [
        RecommendRequest(user_id=f"u{u}", k=3 + u, popularity_penalty=p, diversity=d)
        for u, (p, d) in enumerate(knobs, start=1)
    ]
    for request, response in zip(requests, with_text.recommend_batch(requests), strict=True):
        alone = with_text.recommend(request)
        assert [r.item_id for r in response.items] == [r.item_id for r in alone.items]
        assert [r.score for r in response.items] == pytest.approx([r.score for r in alone.items], abs=1e-5)


def test_the_popularity_fallback_ignores_the_knobs(with_text: Predictor) -> None:
    plain = with_text.recommend(RecommendRequest(history=[], k=5))
    knobs = with_text.recommend(RecommendRequest(history=[], k=5, popularity_penalty=10.0, diversity=1.0))
    assert knobs.fallback and listed(knobs) == listed(plain)


def test_describe_says_which_knobs_the_model_supports(id_only: Predictor, with_text: Predictor) -> None:
    assert id_only.describe()["rerank"] == {"popularity_penalty": True, "diversity": False}
    assert with_text.describe()["rerank"] == {"popularity_penalty": True, "diversity": True}


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"popularity_penalty": -0.1}, "popularity_penalty must be between 0 and 10, got -0.1"),
        ({"popularity_penalty": 11.0}, "popularity_penalty must be between 0 and 10, got 11"),
        ({"popularity_penalty": math.nan}, "popularity_penalty must be between 0 and 10, got nan"),
        ({"diversity": 1.5}, "diversity must be between 0 and 1, got 1.5"),
        ({"diversity": -0.5}, "diversity must be between 0 and 1, got -0.5"),
    ],
)
def test_out_of_range_knobs_are_request_errors(with_text: Predictor, knobs: dict, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        with_text.recommend(RecommendRequest(user_id="u1", **knobs))


def test_diversity_on_a_model_without_text_is_a_request_error(id_only: Predictor) -> None:
    with pytest.raises(
        RequestError, match=r"diversity needs item text vectors.*item_representation=id\+text"
    ):
        id_only.recommend(RecommendRequest(user_id="u1", diversity=0.5))
    assert id_only.recommend(RecommendRequest(user_id="u1", popularity_penalty=1.0)).items


def test_recommend_body_knob_limits() -> None:
    body = RecommendBody.model_validate({"user_id": "1", "popularity_penalty": 10, "diversity": 1})
    assert (body.popularity_penalty, body.diversity) == (10.0, 1.0)
    assert RecommendRequest(**body.model_dump()).diversity == 1.0
    for field, bad in (
        ("popularity_penalty", -1),
        ("popularity_penalty", 10.5),
        ("popularity_penalty", "1"),
        ("diversity", 2),
        ("diversity", True),
    ):
        with pytest.raises(ValidationError, match=field):
            RecommendBody.model_validate({"user_id": "1", field: bad})
