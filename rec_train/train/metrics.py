"""Full-ranking metrics: HR@K, NDCG@K and MRR, averaged over users.

Every metric is a function of the target's rank alone, so a split of the users is summarised by a
histogram of ranks (integers). Histograms from many workers add up exactly (an all-reduce of int64
counts), and the metrics computed from the sum are bit-identical to a single process's.
"""

from __future__ import annotations

import numpy as np
import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items, padding and the user's history excluded.

    scores [B, N+1] over item indices (0 = padding), targets [B], history [B, L] (0 = padding).
    A target the user already saw is still ranked; the other history items are not candidates.
    Ties count in the target's favour (rank = 1 + items scoring strictly higher).
    """
    target_score = scores.gather(1, targets[:, None])  # [B, 1]
    masked = scores.scatter(1, history, float("-inf"))  # [B, N+1]
    masked[:, 0] = float("-inf")
    return 1 + (masked > target_score).sum(dim=1)  # [B]


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
