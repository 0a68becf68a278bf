"""Beyond-accuracy figures of the top-K lists and re-ranking, against an independent NumPy computation."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rec_train.ranking import candidate_scores, listed_ranks, mmr, penalise_popularity, top_k
from rec_train.train.batches import item_events, training_batch
from rec_train.train.evaluate import rank_split
from rec_train.train.metrics import Catalogue, RankingAccumulator, Rerank, gini, merge_states, summarise
from tests.unit.test_metrics_independent import fixed_scores, history_and_target, random_sequences

KS = [5, 10]


def numpy_beyond(
    scores: np.ndarray,
    histories: list[list[int]],
    targets: list[int],
    popularity: np.ndarray,
    vectors: np.ndarray,
    k: int,
) -> dict[str, float]:
    """The list figures at K by loops: each user's top-K candidates (history excluded) from a sort."""
    n = len(popularity) - 1
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    info = -np.log2((popularity + 1.0) / (popularity[1:].sum() + n))
    exposure = np.zeros(n + 1)
    pop, nov, ild, hist_pop, ranks = [], [], [], [], []
    for user, (seen, target) in enumerate(zip(histories, targets, strict=True)):
        candidates = [i for i in range(1, n + 1) if i not in set(seen)]
        top = sorted(candidates, key=lambda i: -scores[user, i])[:k]
        exposure[top] += 1
        pop.append(np.mean(popularity[top]))
        nov.append(np.mean(info[top]))
        sims = [unit[a] @ unit[b] for x, a in enumerate(top) for b in top[x + 1 :]]
        ild.append(1.0 - np.mean(sims))
        hist_pop.append(np.mean(popularity[seen]))
        rivals = [i for i in candidates if i != target]
        ranks.append(1 + sum(scores[user, i] >= scores[user, target] for i in rivals))
    x = np.sort(exposure[1:])
    ranks_arr = np.array(ranks, dtype=np.float64)
    lengths = np.array([len(h) for h in histories])
    low, high = np.quantile(lengths, [1 / 3, 2 / 3], method="lower")
    order = np.argsort(-popularity[1:], kind="stable")
    before = np.cumsum(popularity[1:][order]) - popularity[1:][order]
    head_items = set((order[before < 0.2 * popularity[1:].sum()] + 1).tolist())
    gain = np.where(ranks_arr <= k, 1.0 / np.log2(ranks_arr + 1.0), 0.0)
    is_head = np.array([t in head_items for t in targets])
    return {
        f"coverage@{k}": float((exposure[1:] > 0).sum() / n),
        f"gini@{k}": float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum())),
        f"popularity@{k}": float(np.mean(pop)),
        f"popularity_ratio@{k}": float(np.mean(pop) / np.mean(hist_pop)),
        f"novelty@{k}": float(np.mean(nov)),
        f"diversity@{k}": float(np.mean(ild)),
        f"ndcg@{k}_short": float(gain[lengths <= low].mean()),
        f"ndcg@{k}_long": float(gain[lengths > high].mean()),
        f"ndcg@{k}_head": float(gain[is_head].mean()),
        f"ndcg@{k}_tail": float(gain[~is_head].mean()),
    }


def test_list_figures_agree_with_numpy_over_uneven_batches() -> None:
    num_items, table = 50, random_sequences(users=240, num_items=50, seed=7)
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((table.num_rows, num_items + 1)).astype(np.float32)
    scores[:, 1:] += np.linspace(
        2.0, 0.0, num_items, dtype=np.float32
    )  # low indices favoured: skewed exposure
    vectors = rng.standard_normal((num_items + 1, 6))
    popularity = torch.from_numpy(item_events(table, num_items, include_valid=True)).double()
    catalogue = Catalogue(popularity, torch.from_numpy(vectors))
    score, _ = fixed_scores(scores)
    accumulator = RankingAccumulator(KS, catalogue)
    rank_split(score, table.to_batches(max_chunksize=29), "test", 10, accumulator)
    got = summarise(accumulator.state(), KS, catalogue)
    histories, targets = history_and_target(table, "test")
    for k in KS:
        expected = numpy_beyond(scores, histories, targets, popularity.numpy(), vectors, k)
        assert {name: got[name] for name in expected} == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert got["users_short"] + got["users_medium"] + got["users_long"] == table.num_rows
    assert got["users_head"] + got["users_tail"] == table.num_rows
    assert 0.0 < got["coverage@5"] <= got["coverage@10"] <= 1.0
    assert 0.0 < got["gini@5"] < 1.0


def test_worker_states_merge_into_exactly_the_whole() -> None:
    num_items, table = 40, random_sequences(users=150, num_items=40, seed=9)
    scores = np.random.default_rng(10).standard_normal((table.num_rows, num_items + 1)).astype(np.float32)
    catalogue = Catalogue(torch.from_numpy(item_events(table, num_items, include_valid=False)).double())

    def state(rows: pa.Table, block: np.ndarray) -> dict:
        score, _ = fixed_scores(block)
        return rank_split(score, [rows], "valid", 10, RankingAccumulator(KS, catalogue)).state()

    whole = summarise(state(table, scores), KS, catalogue)
    parts = merge_states([state(table.slice(0, 61), scores[:61]), state(table.slice(61), scores[61:])])
    assert summarise(parts, KS, catalogue) == whole  # exact: concatenations and sums of the same numbers


def test_gini_and_the_head_of_the_catalogue_by_hand() -> None:
    assert gini(np.array([3, 3, 3, 3])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n - 1) / n for one item taking all
    # events 50, 30, 10, 10: the head holds the first 20 % (10 of 100 events): only item 1
    catalogue = Catalogue(torch.tensor([0.0, 50.0, 30.0, 10.0, 10.0]))
    assert catalogue.head.tolist() == [False, True, False, False, False]


def test_training_counts_never_see_a_test_target() -> None:
    rows = {
        "user_index": pa.array([0, 1], pa.int32()),
        "train_items": pa.array([[1, 2, 3], [2, 3]], pa.list_(pa.int32())),
        "valid_item": pa.array([4, 1], pa.int32()),
        "test_item": pa.array([5, 5], pa.int32()),
    }
    table = pa.table(rows)
    changed = pa.table({**rows, "test_item": pa.array([6, 1], pa.int32())})
    for include_valid in (False, True):
        assert (
            item_events(table, 6, include_valid).tolist() == item_events(changed, 6, include_valid).tolist()
        )
        batch, other = training_batch(table, 5, include_valid), training_batch(changed, 5, include_valid)
        assert all(torch.equal(batch[name], other[name]) for name in batch)
    assert item_events(table, 6, include_valid=True).tolist() == [
        0,
        2,
        2,
        2,
        1,
        0,
        0,
    ]  # 5 is a test item only


def test_a_zero_penalty_and_zero_diversity_change_nothing() -> None:
    scores = torch.randn(8, 31, generator=torch.Generator().manual_seed(0))
    counts = torch.randint(0, 100, (31,), generator=torch.Generator().manual_seed(1)).double()
    masked = candidate_scores(scores, torch.tensor([[3, 4]] * 8))
    plain = top_k(masked, 10)
    adjusted = top_k(penalise_popularity(masked, counts, 0.0), 10, torch.randn(31, 4), 0.0)
    assert torch.equal(plain[0], adjusted[0])


def test_popularity_penalty_and_diversity_trade_accuracy_for_the_catalogue() -> None:
    num_items, table = 80, random_sequences(users=200, num_items=80, seed=11)
    rng = np.random.default_rng(12)
    popularity = torch.from_numpy(item_events(table, num_items, include_valid=True)).double()
    vectors = torch.from_numpy(
        np.repeat(rng.standard_normal((8, 5)), 11, axis=0)[: num_items + 1]
    )  # 8 clusters
    # scores that follow popularity and favour one cluster: low coverage and diversity without re-ranking
    base = np.log1p(popularity.numpy())[None, :] + vectors[:, 0].numpy()[None, :]
    scores = (base + 0.3 * rng.standard_normal((table.num_rows, num_items + 1))).astype(np.float32)
    catalogue = Catalogue(popularity, vectors)

    def figures(rerank: Rerank) -> dict[str, float]:
        score, _ = fixed_scores(scores)
        accumulator = RankingAccumulator([10], catalogue, rerank=rerank)
        return summarise(rank_split(score, [table], "test", 10, accumulator).state(), [10], catalogue)

    plain, penalised, diverse = figures(Rerank()), figures(Rerank(2.0, 0.0)), figures(Rerank(0.0, 0.9))
    assert penalised["popularity@10"] < plain["popularity@10"]
    assert penalised["novelty@10"] > plain["novelty@10"]
    assert diverse["diversity@10"] > plain["diversity@10"]
    assert diverse["hr@10"] < plain["hr@10"]  # the price: fewer targets in the list


def test_mmr_keeps_the_best_item_first_and_spreads_the_rest() -> None:
    unit = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=-1
    )
    relevance, ids = torch.tensor([[3.0, 2.9, 1.0]]), torch.tensor([[1, 2, 3]])
    assert mmr(relevance, ids, unit, 0.0, 3).tolist() == [[0, 1, 2]]
    # item 3 differs from item 1, item 2 does not: with weight on diversity, 3 comes second
    assert mmr(relevance, ids, unit, 0.8, 2).tolist() == [[0, 2]]


def test_targets_ranked_in_a_reordered_list() -> None:
    ids = torch.tensor([[4, 2, 9], [1, 3, 5]])
    assert listed_ranks(torch.tensor([9, 7]), ids, torch.tensor([1, 2])).tolist() == [3, 4]


def test_rerank_values_are_checked() -> None:
    with pytest.raises(ValueError, match="popularity_penalty"):
        Rerank(popularity_penalty=-0.5)
    with pytest.raises(ValueError, match="diversity"):
        Rerank(diversity=1.5)
    assert math.isclose(Rerank(1.0, 0.5).diversity, 0.5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--diversity", "1.5"], "--diversity must be a number in [0, 1], got '1.5'"),
        (["--popularity-penalty", "-1"], "--popularity-penalty must be a number in [0, 10], got '-1'"),
        (["--history", "all"], "argument --history: invalid choice: 'all'"),
        (["--ks", "10", "0"], "K must be a positive integer, got '0'"),
    ],
)
def test_evaluate_flags_are_checked_before_any_work(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rec_train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "no/such/model", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_diversity_without_text_vectors_says_how_to_get_them() -> None:
    from rec_train.errors import RayrecError

    with pytest.raises(RayrecError, match="diversity needs item text vectors: run `rec-train embed-items"):
        RankingAccumulator([10], Catalogue(torch.ones(6)), rerank=Rerank(0.0, 0.5))
