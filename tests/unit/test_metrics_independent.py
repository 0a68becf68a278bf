"""rayrec's evaluator against hand-computed ranks and an independent plain-NumPy computation.

The reference below ranks each user's target by looping over the candidate items in NumPy: every item
except padding (0) and the user's history, the target itself always kept; rank = 1 + candidates scoring
strictly higher. HR@K = share of users with rank <= K, NDCG@K = mean of 1/log2(rank + 1) over users
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
from rec_train.train.evaluate import evaluate_model, split_histogram
from rec_train.train.metrics import metrics_from_histogram

KS = [1, 5, 10, 20]


def numpy_metrics(
    scores: np.ndarray, histories: list[list[int]], targets: list[int], ks: list[int]
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR from scores [U, N + 1] by an explicit loop over users and candidate items."""
    ranks = []
    for user, (history, target) in enumerate(zip(histories, targets, strict=True)):
        excluded = set(history) - {target}
        higher = sum(
            1
            for item in range(1, scores.shape[1])
            if item not in excluded and scores[user, item] > scores[user, target]
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
    valid = metrics_from_histogram(split_histogram(score, [table], "valid", 10, 5), [1, 2])
    assert (valid["hr@1"], valid["hr@2"]) == (0.5, 1.0)
    assert valid["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    # test: user 0 excludes 3, 1, 4 -> candidates 2 (target, 1.0), 5 (3.0): rank 2
    #       user 1 excludes 2 (its valid item) but not 5, its own target -> 1, 3, 4 compete; 3 (4.0) wins: rank 2
    score, _ = fixed_scores(scores)
    test = metrics_from_histogram(split_histogram(score, [table], "test", 10, 5), [1, 2])
    assert (test["hr@1"], test["hr@2"]) == (0.0, 1.0)
    assert test["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_ties_count_in_the_targets_favour() -> None:
    table = pa.table(
        {
            "train_items": pa.array([[1]], pa.list_(pa.int32())),
            "valid_item": pa.array([3], pa.int32()),
            "test_item": pa.array([0], pa.int32()),
        }
    )
    scores = np.array([[0.0, 5.0, 2.0, 2.0, 2.0, 1.0]])  # items 2 and 4 tie with the target 3
    score, _ = fixed_scores(scores)
    metrics = metrics_from_histogram(split_histogram(score, [table], "valid", 10, 5), [1])
    assert metrics["hr@1"] == 1.0


@pytest.mark.parametrize("split", ["valid", "test"])
def test_random_scores_agree_with_numpy(split: str) -> None:
    num_items, table = 60, random_sequences(users=300, num_items=60, seed=1)
    scores = np.random.default_rng(2).standard_normal((table.num_rows, num_items + 1)).astype(np.float32)
    score, cursor = fixed_scores(scores)
    hist = split_histogram(score, table.to_batches(max_chunksize=37), split, 8, num_items)  # uneven batches
    assert cursor[0] == table.num_rows  # every user was scored once
    histories, targets = history_and_target(table, split)
    expected = numpy_metrics(scores, histories, targets, KS)
    assert metrics_from_histogram(hist, KS) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0.0 < expected["hr@10"] < 1.0  # the check is not vacuous


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
    assert got == pytest.approx(expected, abs=1e-9)
    assert expected["mrr"] > 0.0
