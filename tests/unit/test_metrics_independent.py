"""rayrec's evaluator against hand-computed ranks and an independent plain-NumPy computation.

The reference below ranks each user's target by looping over the candidate items in NumPy: every item
except padding (0) and (under history "exclude") the user's history, the target itself always kept;
rank = 1 + the other candidates scoring at least as high (ties count against the target). HR@K = share of users with rank <= K, NDCG@K = mean of 1/log2(rank + 1) over users
with rank <= K (0 otherwise), MRR = mean of 1/rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch

from rec_train.model import RecModel, build_config
from rec_train.train.batches import EvalBatch
from rec_train.train.evaluate import evaluate_model, rank_split
from rec_train.train.metrics import Catalogue, NonFiniteScoresError, RankingAccumulator, summarise

KS = [1, 5, 10, 20]


def numpy_metrics(
    scores: np.ndarray,
    histories: list[list[int]],
    targets: list[int],
    ks: list[int],
    history: str = "exclude",
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR from scores [U, N + 1] by an explicit loop over users and candidate items."""
    ranks = []
    for user, (seen, target) in enumerate(zip(histories, targets, strict=True)):
        excluded = set(seen) if history == "exclude" else set()
        higher = sum(
            1
            for item in range(1, scores.shape[1])
            if item != target and item not in excluded and scores[user, item] >= scores[user, target]
        )
        ranks.append(1 + higher)
    r = np.array(ranks, dtype=np.float64)
    out = {"users": float(len(r))}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(r <= k))
        out[f"ndcg@{k}"] = float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)))
    out["mrr"] = float(np.mean(1.0 / r))
    return out


def random_sequences(users: int, num_items: int, seed: int) -> pa.Table:
    """A sequences table (docs/formats.md columns the evaluator reads) with histories of 1..30 items."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for _ in range(users):
        n = int(rng.integers(1, 31))
        seq = rng.integers(1, num_items + 1, size=n + 2).tolist()  # repeats allowed, as in real logs
        train.append(seq[:-2])
        valid.append(seq[-2])
        test.append(seq[-1])
    return pa.table(
        {
            "user_index": pa.array(range(users), pa.int32()),
            "train_items": pa.array(train, pa.list_(pa.int32())),
            "valid_item": pa.array(valid, pa.int32()),
            "test_item": pa.array(test, pa.int32()),
        }
    )


def history_and_target(table: pa.Table, split: str) -> tuple[list[list[int]], list[int]]:
    rows = table.to_pylist()
    if split == "valid":
        return [r["train_items"] for r in rows], [r["valid_item"] for r in rows]
    return [r["train_items"] + [r["valid_item"]] for r in rows], [r["test_item"] for r in rows]


def fixed_scores(scores: np.ndarray) -> tuple[Callable[[EvalBatch], torch.Tensor], list[int]]:
    """A score function handing out the rows of `scores` in the order the evaluator asks for users."""
    cursor = [0]

    def score(batch: EvalBatch) -> torch.Tensor:
        start = cursor[0]
        cursor[0] += len(batch.targets)
        return torch.from_numpy(scores[start : cursor[0]])  # [B, N + 1]

    return score, cursor


def ranked(
    score: Callable[[EvalBatch], torch.Tensor],
    batches: list[pa.Table] | list[pa.RecordBatch],
    split: str,
    num_items: int,
    ks: list[int],
    history: str = "exclude",
) -> dict[str, float]:
    """Accuracy figures of `score` through the evaluator's one ranking pass (uniform popularity)."""
    catalogue = Catalogue(torch.ones(num_items + 1))
    accumulator = rank_split(score, batches, split, 10, RankingAccumulator(ks, catalogue, history))
    figures = summarise(accumulator.state(), ks, catalogue)
    return {k: figures[k] for k in ["users", "mrr", *(f"{m}@{k}" for m in ("hr", "ndcg") for k in ks)]}


def test_hand_computed_ranks_through_the_split_evaluator() -> None:
    # 5 items. user 0: history [3, 1], valid 4, test 2; user 1: history [5], valid 2, test 5 (a repeat)
    table = pa.table(
        {
            "train_items": pa.array([[3, 1], [5]], pa.list_(pa.int32())),
            "valid_item": pa.array([4, 2], pa.int32()),
            "test_item": pa.array([2, 5], pa.int32()),
        }
    )
    #                    pad  1    2    3    4    5
    scores = np.array([[9.0, 8.0, 1.0, 7.0, 2.0, 3.0], [9.0, 1.0, 6.0, 4.0, 2.0, 3.0]])
    # valid: user 0 excludes 3, 1 -> candidates 2 (1.0), 4 (target, 2.0), 5 (3.0): rank 2
    #        user 1 excludes 5 -> candidates 1 (1.0), 2 (target, 6.0), 3 (4.0), 4 (2.0): rank 1
    score, _ = fixed_scores(scores)
    valid = ranked(score, [table], "valid", 5, [1, 2])
    assert (valid["hr@1"], valid["hr@2"]) == (0.5, 1.0)
    assert valid["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    # test: user 0 excludes 3, 1, 4 -> candidates 2 (target, 1.0), 5 (3.0): rank 2
    #       user 1 excludes 2 (its valid item) but not 5, its own target -> 1, 3, 4 compete; 3 (4.0) wins: rank 2
    score, _ = fixed_scores(scores)
    test = ranked(score, [table], "test", 5, [1, 2])
    assert (test["hr@1"], test["hr@2"]) == (0.0, 1.0)
    assert test["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_ties_count_against_the_target() -> None:
    table = pa.table(
        {
            "train_items": pa.array([[1]], pa.list_(pa.int32())),
            "valid_item": pa.array([3], pa.int32()),
            "test_item": pa.array([0], pa.int32()),
        }
    )
    scores = np.array([[0.0, 5.0, 2.0, 2.0, 2.0, 1.0]])  # items 2 and 4 tie with the target 3
    score, _ = fixed_scores(scores)
    metrics = ranked(score, [table], "valid", 5, [1, 3])
    assert (metrics["hr@1"], metrics["hr@3"]) == (0.0, 1.0)  # rank 3: behind both of its equals
    assert metrics["mrr"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("history", ["exclude", "keep"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_random_scores_with_planted_ties_agree_with_numpy(split: str, history: str) -> None:
    num_items, table = 60, random_sequences(users=300, num_items=60, seed=1)
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 8, (table.num_rows, num_items + 1)).astype(np.float32)  # ~8 ties per value
    scores[::3] = rng.standard_normal((len(scores[::3]), num_items + 1))  # and rows without ties
    score, cursor = fixed_scores(scores)
    got = ranked(score, table.to_batches(max_chunksize=37), split, num_items, KS, history)  # uneven batches
    assert cursor[0] == table.num_rows  # every user was scored once
    histories, targets = history_and_target(table, split)
    expected = numpy_metrics(scores, histories, targets, KS, history)
    assert got == pytest.approx(expected, rel=0, abs=1e-9)
    assert 0.0 < expected["hr@10"] < 1.0  # the check is not vacuous


def test_a_constant_score_model_ranks_no_target_in_the_top_10() -> None:
    num_items, table = 500, random_sequences(users=200, num_items=500, seed=4)
    score, _ = fixed_scores(np.full((table.num_rows, num_items + 1), 0.5, dtype=np.float32))
    metrics = ranked(score, [table], "test", num_items, [10])
    # every candidate ties with the target, so each target ranks last among them: far from HR@10 = 1
    assert metrics["hr@10"] <= 10 / (num_items - 32)  # at least num_items - 32 candidates per user
    assert metrics["mrr"] < 1 / (num_items - 32) + 1e-12


def test_a_nan_model_is_an_error_naming_the_model_split_and_users() -> None:
    torch.manual_seed(0)
    model = RecModel(build_config("tiny", num_items=30, max_seq_len=6)).eval()
    table = random_sequences(users=40, num_items=30, seed=5)
    with torch.no_grad():
        model.items.id_embeddings.weight[7] = float("nan")  # every user scores item 7 as NaN
    with pytest.raises(
        NonFiniteScoresError, match=r"runs/m: 40 of 40 users got NaN or infinite scores on the valid split"
    ):
        evaluate_model(model, table, "valid", [10], name="runs/m")


def test_evaluate_model_agrees_with_numpy_scoring_one_user_at_a_time() -> None:
    """The model's own scores, one unpadded user at a time (last max_seq_len items as input, the whole
    history excluded), ranked in NumPy: the batched, left-padded evaluator gives the same metrics."""
    torch.manual_seed(0)
    num_items, max_len = 40, 6
    model = RecModel(build_config("tiny", num_items=num_items, max_seq_len=max_len)).eval()
    table = random_sequences(users=120, num_items=num_items, seed=3)
    histories, targets = history_and_target(table, "test")
    with torch.no_grad():
        items = model.item_embeddings().float().numpy()  # [N + 1, d]
        users = np.stack(
            [model.encode_users(torch.tensor([h[-max_len:]]), torch.ones(1, len(h[-max_len:]), dtype=torch.long))[0].numpy()
             for h in histories]
        )  # fmt: skip  # [U, d]
    expected = numpy_metrics(users @ items.T, histories, targets, KS)
    got = evaluate_model(model, table, "test", KS, batch_size=32)
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert expected["mrr"] > 0.0
