"""Encoder states: a user's history continued from the keys and values of its earlier positions equals the
whole history encoded again, and the serving cache of those states (hits, extensions, eviction by bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rec_serve.predictor import Predictor, RecommendRequest
from rec_serve.synthetic import item_id, write_exported_model
from rec_serve.user_state import StateCache
from rec_train.model import RecModel, build_config

STATEFUL = [
    ("llama", {"num_key_value_heads": 1}),
    ("qwen2", {}),
    ("gpt2", {}),
    ("sasrec", {"scale_embedding": True}),
    (
        "llama",
        {
            "backbone_hidden_size": 24,
            "num_attention_heads": 2,
            "item_representation": "id+text",
            "text_dim": 8,
        },
    ),
]


def model(encoder: str, **overrides: object) -> RecModel:
    torch.manual_seed(0)
    m = RecModel(build_config("tiny", num_items=50, encoder=encoder, max_seq_len=20, **overrides))
    if m.config.uses_text:
        m.set_item_text_embeddings(torch.cat([torch.zeros(1, 8), torch.randn(50, 8)]))
    return m.eval()


@pytest.mark.parametrize(("encoder", "overrides"), STATEFUL, ids=lambda v: str(v))
def test_continuing_a_history_equals_encoding_it_again(encoder: str, overrides: dict) -> None:
    m = model(encoder, **overrides)
    assert m.keeps_user_state
    history = torch.randint(1, 51, (20,))
    state = None
    for start, end in (
        (0, 1),
        (1, 12),
        (12, 13),
        (13, 14),
        (14, 17),
        (17, 20),
    ):  # one item: a path of its own
        vector, state = m.extend_user(history[start:end], state)
        full = m.encode_users(history[None, :end])[0]  # [d]
        torch.testing.assert_close(vector, full, atol=1e-5, rtol=0)
    assert state.length == 20 and state.nbytes() > 0


@pytest.mark.parametrize("encoder", ["hstu", "bert"])
def test_encoders_without_state(encoder: str) -> None:
    overrides = {"objective": "masked_item"} if encoder == "bert" else {}
    m = model(encoder, **overrides)
    assert not m.keeps_user_state
    with pytest.raises(ValueError, match="needs eval mode and a causal encoder with state"):
        m.extend_user(torch.tensor([1, 2]))


def test_the_cache_extends_reuses_and_evicts() -> None:
    m = model("llama")
    cache = StateCache(m, max_bytes=10**9)
    history = [3, 7, 9, 11]
    cache.vector("a", history)
    cache.vector("a", history)  # the same history: the stored vector
    vector = cache.vector("a", [*history, 5, 6])  # two new items encoded
    torch.testing.assert_close(vector, m.encode_users(torch.tensor([[*history, 5, 6]]))[0], atol=1e-5, rtol=0)
    cache.vector("a", [4, 4])  # another history: encoded from the start
    assert cache.counts == {"hits": 1, "extended": 1, "encoded": 2, "evicted": 0}
    one_user = cache.nbytes
    small = StateCache(m, max_bytes=int(2.5 * one_user))  # room for two users of two items
    for user in "xyz":
        small.vector(user, [4, 4])
    assert (
        list(small.entries) == ["y", "z"] and small.counts["evicted"] == 1 and small.nbytes <= small.max_bytes
    )
    small.vector("y", [4, 4])  # y is now the most recent
    small.vector("w", [1, 2])
    assert list(small.entries) == ["y", "w"]


def test_the_predictor_answers_the_same_with_the_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = write_exported_model(tmp_path / "m", RecModel(build_config("tiny", num_items=40)))
    plain, cached = Predictor.load(str(folder)), Predictor.load(str(folder), state_cache_mb=8)
    assert plain.describe()["state_cache"] is None
    for user in ["u1", "u2", "u3"]:
        for events in ([], [item_id(5)], [item_id(5), item_id(9)]):
            request = RecommendRequest(user_id=user, events=events, k=10)
            a, b = plain.recommend(request).items, cached.recommend(request).items
            assert [r.item_id for r in a] == [r.item_id for r in b]
            assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-5)
    described = cached.describe()["state_cache"]
    assert described["users"] == 3 and described["encoded"] == 3 and described["extended"] == 6
    # a user the model never saw, known by their events only
    fresh = cached.recommend(RecommendRequest(user_id="new", events=[item_id(1), item_id(2)], k=5)).items
    assert [r.item_id for r in fresh] == [
        r.item_id for r in plain.recommend(RecommendRequest(history=[item_id(1), item_id(2)], k=5)).items
    ]
    assert Predictor.load(str(folder), state_cache_mb=8, user_tower="bf16").states is None  # fp32 states only
