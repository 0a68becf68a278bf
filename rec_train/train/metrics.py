"""Full-ranking metrics: HR@K, NDCG@K and MRR, and what the top-K lists do to the catalogue.

Every accuracy metric is a function of the target's rank alone, so a split of the users is summarised by
a histogram of ranks (integers); histograms from many workers add up exactly. `RankingAccumulator`
collects, in the one scoring pass over the users, each user's rank, history length and target, and the
top-K lists' exposure, popularity, novelty and diversity sums; the states of many workers merge exactly
(concatenation and sums), and `summarise` turns a merged state into the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rec_train.errors import RayrecError
from rec_train.ranking import (
    candidate_scores,
    check_history_mode,
    listed_ranks,
    nonfinite_users,
    penalise_popularity,
    target_ranks,
    top_k,
    unit_rows,
)

HEAD_SHARE = 0.2  # head items: the most popular ones, together holding the first 20 % of events
ACTIVITY_GROUPS = ("short", "medium", "long")  # thirds of the users by history length


class NonFiniteScoresError(RayrecError):
    """A model gave NaN or infinite scores: its figures would be meaningless."""


@dataclass(frozen=True)
class Rerank:
    """Re-ranking of the top-K lists: `popularity_penalty` >= 0 (standard deviations of score per
    standard deviation of log popularity), `diversity` in [0, 1] (MMR weight of text dissimilarity)."""

    popularity_penalty: float = 0.0
    diversity: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.popularity_penalty <= 10.0:
            raise ValueError(f"popularity_penalty must be in [0, 10], got {self.popularity_penalty}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {self.diversity}")


@dataclass
class Catalogue:
    """What the top-K lists of one split are measured against: the events per item that the model
    could have learnt from (`popularity` [N + 1]) and, when the items have them, text vectors."""

    popularity: torch.Tensor  # [N + 1] float64, row 0 padding
    unit_vectors: torch.Tensor | None = None  # [N + 1, d], unit rows (zero for an item without text)

    def __post_init__(self) -> None:
        self.popularity = self.popularity.double()
        if self.unit_vectors is not None:
            self.unit_vectors = unit_rows(self.unit_vectors)
        counts = self.popularity[1:]
        order = torch.argsort(counts, descending=True, stable=True)
        before = torch.cumsum(counts[order], 0) - counts[order]  # events of the more popular items
        head = torch.zeros(len(counts) + 1, dtype=torch.bool)
        head[order[before < HEAD_SHARE * counts.sum()] + 1] = True
        self.head = head  # [N + 1]
        total, n = float(counts.sum()), len(counts)
        self.self_information = -torch.log2((self.popularity + 1.0) / (total + n))  # [N + 1], smoothed


class RankingAccumulator:
    """Ranks and top-K list figures of one split, batch by batch (`add`), mergeable across workers."""

    def __init__(
        self, ks: list[int], catalogue: Catalogue, history: str = "exclude", rerank: Rerank | None = None
    ) -> None:
        check_history_mode(history)
        self.ks, self.catalogue, self.history = sorted(set(ks)), catalogue, history
        self.rerank = rerank or Rerank()
        if self.rerank.diversity and catalogue.unit_vectors is None:
            raise RayrecError(
                "diversity needs item text vectors: run `rec-train embed-items --data DATASET` first"
            )
        n_k, rows = len(self.ks), len(catalogue.popularity)
        self.ranks: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.exposure = np.zeros((n_k, rows), dtype=np.int64)  # times each item is in a top-K list
        self.sums = np.zeros(
            (4, n_k)
        )  # per K: popularity, self-information, diversity, users with 2+ vectors
        self.history_popularity = 0.0  # sum over users of their history items' mean popularity
        self.nonfinite = 0

    @torch.no_grad()
    def add(self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor) -> None:
        """scores [B, N + 1] (float), targets [B], history [B, H] (the user's items, 0-padded)."""
        scores = scores.float().cpu()
        targets, history = targets.cpu().long(), history.cpu().long()
        bad = nonfinite_users(scores)
        if bad.any():
            self.nonfinite += int(bad.sum())
            scores, targets, history = scores[~bad], targets[~bad], history[~bad]
        if not len(targets):
            return
        cat, rerank = self.catalogue, self.rerank
        exclude = history if self.history == "exclude" else None
        if rerank.popularity_penalty:
            scores = penalise_popularity(
                candidate_scores(scores, None), cat.popularity, rerank.popularity_penalty
            )
        ranks = target_ranks(scores, targets, exclude)  # [B]
        ids, values = top_k(
            candidate_scores(scores, exclude), max(self.ks), cat.unit_vectors, rerank.diversity
        )
        if rerank.diversity:
            ranks = listed_ranks(targets, ids, ranks)
        self.ranks.append(ranks.numpy())
        self.lengths.append((history != 0).sum(dim=1).numpy())
        self.targets.append(targets.numpy())
        seen = (history != 0).double()  # [B, H]
        self.history_popularity += float(
            ((cat.popularity[history] * seen).sum(1) / seen.sum(1).clamp(min=1)).sum()
        )
        listed = torch.isfinite(values)  # [B, P]: fewer candidates than P leave -inf slots
        for j, k in enumerate(self.ks):
            top, ok = ids[:, :k], listed[:, :k].double()  # [B, k]
            n = ok.sum(1).clamp(min=1)
            self.exposure[j] += np.bincount(top[listed[:, :k]].numpy(), minlength=self.exposure.shape[1])
            self.sums[0, j] += float(((cat.popularity[top] * ok).sum(1) / n).sum())
            self.sums[1, j] += float(((cat.self_information[top] * ok).sum(1) / n).sum())
            if cat.unit_vectors is not None:
                v = cat.unit_vectors[top].double() * ok[:, :, None]  # [B, k, d]
                # mean pairwise cosine of m unit vectors = (|sum v|^2 - sum |v|^2) / (m (m - 1))
                m = (v.norm(dim=-1) > 0).sum(1).double()  # [B] items with a text vector
                pairs = (v.sum(1).norm(dim=-1) ** 2 - (v.norm(dim=-1) ** 2).sum(1)) / (m * (m - 1)).clamp(
                    min=1
                )
                two = m >= 2
                self.sums[2, j] += float((1.0 - pairs)[two].sum())
                self.sums[3, j] += float(two.sum())

    def state(self) -> dict[str, Any]:
        """This accumulator's figures as plain arrays (to all-gather)."""
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        return {
            "ranks": cat(self.ranks), "lengths": cat(self.lengths), "targets": cat(self.targets),
            "exposure": self.exposure, "sums": self.sums, "history_popularity": self.history_popularity,
            "nonfinite": self.nonfinite,
        }  # fmt: skip


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The state of all users from the states of disjoint shares (concatenated, summed)."""
    out = dict(states[0])
    for name in ("ranks", "lengths", "targets"):
        out[name] = np.concatenate([s[name] for s in states])
    for name in ("exposure", "sums", "history_popularity", "nonfinite"):
        out[name] = sum(s[name] for s in states)
    return out


def check_finite(state: dict[str, Any], model: str, split: str) -> None:
    """Raise when any user got a NaN or infinite score: the figures of such a model mean nothing."""
    bad = int(state["nonfinite"])
    if bad:
        users = bad + len(state["ranks"])
        raise NonFiniteScoresError(
            f"{model}: {bad} of {users} users got NaN or infinite scores on the {split} split; the weights or"
            " inputs are broken (look for a NaN training loss; lower optim.lr or set optim.grad_clip)"
        )


def summarise(
    state: dict[str, Any], ks: list[int], catalogue: Catalogue, prefix: str = ""
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR and `users`; per K coverage, Gini of exposure, mean recommended popularity and
    its ratio to the histories' (`popularity_ratio@K`), novelty (mean self-information, bits),
    intra-list diversity (1 - mean pairwise cosine of text vectors, when the items have them); NDCG@K of
    users with short / medium / long histories (thirds by length) and of head / tail targets."""
    ks = sorted(set(ks))
    ranks, lengths, targets = state["ranks"], state["lengths"], state["targets"]
    num_items = len(catalogue.popularity) - 1
    out = metrics_from_histogram(rank_histogram(torch.from_numpy(ranks), num_items), ks, prefix)
    users = len(ranks)
    if not users:
        return out
    history_pop = state["history_popularity"] / users
    for j, k in enumerate(ks):
        exposure = state["exposure"][j, 1:]
        out[f"{prefix}coverage@{k}"] = float((exposure > 0).sum() / num_items)
        out[f"{prefix}gini@{k}"] = gini(exposure)
        out[f"{prefix}popularity@{k}"] = float(state["sums"][0, j] / users)
        out[f"{prefix}popularity_ratio@{k}"] = float(state["sums"][0, j] / users / max(history_pop, 1e-12))
        out[f"{prefix}novelty@{k}"] = float(state["sums"][1, j] / users)
        if catalogue.unit_vectors is not None and state["sums"][3, j]:
            out[f"{prefix}diversity@{k}"] = float(state["sums"][2, j] / state["sums"][3, j])
    out[f"{prefix}history_popularity"] = float(history_pop)
    low, high = np.quantile(lengths, [1 / 3, 2 / 3], method="lower")
    head = catalogue.head.numpy()[targets]
    groups = {
        "short": lengths <= low, "medium": (lengths > low) & (lengths <= high), "long": lengths > high,
        "head": head, "tail": ~head,
    }  # fmt: skip
    for name, members in groups.items():
        figures = metrics_from_histogram(rank_histogram(torch.from_numpy(ranks[members]), num_items), ks)
        out[f"{prefix}users_{name}"] = figures["users"]
        for k in ks:
            out[f"{prefix}ndcg@{k}_{name}"] = figures[f"ndcg@{k}"]
    out[f"{prefix}short_max_history"] = int(low)
    out[f"{prefix}long_min_history"] = int(high) + 1
    return out


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when all are equal, near 1 when one item has them all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def rank_histogram(ranks: torch.Tensor, num_items: int) -> torch.Tensor:
    """counts[r] = users whose target has rank r, r in 1..num_items (int64 [num_items + 1])."""
    return torch.bincount(ranks.long().cpu(), minlength=num_items + 1)[: num_items + 1]


def metrics_from_histogram(
    hist: torch.Tensor | np.ndarray, ks: list[int], prefix: str = ""
) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item: 1 / log2(rank + 1) within the top K) and MRR, plus `users`."""
    counts = np.asarray(hist, dtype=np.int64)
    users = int(counts.sum())
    ranks = np.arange(len(counts), dtype=np.float64)
    ranks[0] = 1.0  # never counted: rank 0 does not exist
    out: dict[str, float] = {f"{prefix}users": users}
    for k in sorted(set(ks)):
        top = counts[: k + 1].astype(np.float64)
        out[f"{prefix}hr@{k}"] = float(top.sum() / users) if users else 0.0
        out[f"{prefix}ndcg@{k}"] = (
            float((top / np.log2(ranks[: k + 1] + 1.0)).sum() / users) if users else 0.0
        )
    out[f"{prefix}mrr"] = float((counts / ranks).sum() / users) if users else 0.0
    return out


def pointwise_metrics(
    logits: np.ndarray, targets: np.ndarray, task: str, prefix: str = ""
) -> dict[str, float]:
    """rating: RMSE and MAE of the predicted values; click: ROC AUC (ties count half) and log loss of the
    logits against 0/1 labels. Plus `rated_users` (one target each)."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    out: dict[str, float] = {f"{prefix}rated_users": len(targets)}
    if len(targets) == 0:
        return out
    if task == "rating":
        error = logits - targets
        out[f"{prefix}rmse"] = float(np.sqrt(np.mean(error**2)))
        out[f"{prefix}mae"] = float(np.mean(np.abs(error)))
        return out
    # log loss from logits: log(1 + e^-z) for clicks, log(1 + e^z) otherwise
    out[f"{prefix}logloss"] = float(np.mean(np.logaddexp(0.0, np.where(targets > 0.5, -logits, logits))))
    positives = targets > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos and n_neg:  # Mann-Whitney U from average ranks
        values, inverse, counts = np.unique(logits, return_inverse=True, return_counts=True)
        average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
        u = average_rank[inverse][positives].sum() - n_pos * (n_pos + 1) / 2.0
        out[f"{prefix}auc"] = float(u / (n_pos * n_neg))
    return out
