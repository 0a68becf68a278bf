"""Full-ranking metrics against hand-computed values; histograms add up exactly across splits."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from rec_train.ranking import target_ranks
from rec_train.train.evaluate import evaluate_popularity
from rec_train.train.metrics import metrics_from_histogram, rank_histogram


def test_target_rank_excludes_padding_and_history_but_not_the_target() -> None:
    # items 0..5; user 0 saw items 4 and 2 (2 is also the target), user 1 saw nothing yet (item 0 = pad)
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0, 8.0, 5.0], [9.0, 1.0, 3.0, 2.0, 8.0, 5.0]])
    targets = torch.tensor([2, 3])
    history = torch.tensor([[4, 2], [0, 0]])
    ranks = target_ranks(scores, targets, history)
    # user 0: candidates 1, 3, 5 (+ target 2): only 5 scores higher -> rank 2
    # user 1: item 0 is padding; 4, 5, 2 score higher than 3 -> rank 4
    assert ranks.tolist() == [2, 4]


def test_metrics_match_hand_computed_values() -> None:
    ranks = torch.tensor([1, 2, 4, 11])
    metrics = metrics_from_histogram(rank_histogram(ranks, num_items=20), ks=[1, 10])
    assert metrics["users"] == 4
    assert metrics["hr@1"] == pytest.approx(0.25)
    assert metrics["hr@10"] == pytest.approx(0.75)
    assert metrics["ndcg@1"] == pytest.approx(0.25)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11) / 4)


def test_split_histograms_sum_to_exactly_the_whole() -> None:
    ranks = torch.randint(1, 300, (1000,), generator=torch.Generator().manual_seed(0))
    whole = metrics_from_histogram(rank_histogram(ranks, 300), [10, 50])
    parts = rank_histogram(ranks[:337], 300) + rank_histogram(ranks[337:], 300)
    assert metrics_from_histogram(parts, [10, 50]) == whole  # bit-identical, not approximately


def test_popularity_baseline_ranks_by_training_counts() -> None:
    # test histories (train_items + valid_item) count items 1: 3, 2: 3, 4: 1, 5: 1, 3: 0
    table = pa.table(
        {
            "train_items": pa.array([[1, 2], [1, 2], [1, 4]], pa.list_(pa.int32())),
            "valid_item": pa.array([2, 5, 0], pa.int32()),
            "test_item": pa.array([1, 3, 0], pa.int32()),
        }
    )
    metrics = evaluate_popularity(table, num_items=5, split="test", ks=[1, 5])
    assert metrics["users"] == 2  # the third user has no test target
    # user 0 (saw 1, 2; target 1, still a candidate): only 3, 4, 5 compete -> rank 1
    # user 1 (saw 1, 2, 5; target 3, count 0): item 4 (count 1) is above it -> rank 2
    assert metrics["hr@1"] == pytest.approx(0.5)
    assert metrics["hr@5"] == pytest.approx(1.0)
    assert metrics["mrr"] == pytest.approx(0.75)


def test_popularity_baseline_ties_count_against_the_target() -> None:
    # valid split: counts 1: 2, 2: 2, 3: 1, 4: 0, 5: 0
    table = pa.table(
        {
            "train_items": pa.array([[1, 2], [1, 2], [3]], pa.list_(pa.int32())),
            "valid_item": pa.array([2, 1, 4], pa.int32()),
            "test_item": pa.array([0, 0, 0], pa.int32()),
        }
    )
    metrics = evaluate_popularity(table, num_items=5, split="valid", ks=[3])
    # users 0 and 1: their target (count 2) has no rival at or above it -> rank 1
    # user 2 (saw 3; target 4, count 0): 1 and 2 score higher and 5 ties with it -> rank 4, not 3
    assert metrics["hr@3"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 + 1 / 4) / 3)
    kept = evaluate_popularity(table, num_items=5, split="valid", ks=[3], history="keep")
    # keep: user 0's history items stay candidates; item 1 ties with the target 2 -> rank 2
    assert kept["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 5) / 3)
