"""Scores over the whole catalogue -> ranks and top-k lists: the one place both evaluation and serving use.

Scores are [B, N + 1] over item indices; column 0 is padding and never a candidate. A user's history is
either left out of the candidates (`history="exclude"`, the published MovieLens protocol) or kept
(`"keep"`, the RecBole / UniSRec convention, for catalogues where items come back). Ranks count ties
against the target, so a model whose scores collapsed to a constant ranks every target last among its
equals instead of first. No Ray or DeepSpeed import: `rec_serve` reads this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HISTORY_MODES = ("exclude", "keep")
MMR_POOL_FACTOR, MMR_MIN_POOL = 5, 100  # diversity picks the top k from this many best candidates


def check_history_mode(history: str) -> None:
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")


def candidate_scores(scores: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """A copy of scores [B, N + 1] with padding and the items of `exclude` [B, E] (0-padded) at -inf."""
    masked = scores.clone()
    if exclude is not None and exclude.numel():
        masked.scatter_(1, exclude.to(scores.device).long(), float("-inf"))
    masked[:, 0] = float("-inf")
    return masked


def nonfinite_users(scores: torch.Tensor) -> torch.Tensor:
    """[B] bool: users with a NaN or infinite score for any real item (column 0 is padding)."""
    return ~torch.isfinite(scores[:, 1:]).all(dim=1)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """1-based rank [B] of each target: 1 + the other candidates scoring at least as high.

    scores [B, N + 1], targets [B], exclude [B, H] (the history under `history="exclude"`, else None). A
    target the user already saw is still ranked; ties count against it. Check `nonfinite_users` first:
    a NaN score compares false with everything.
    """
    target_score = scores.gather(1, targets[:, None])  # [B, 1]
    others = candidate_scores(scores, exclude)
    others.scatter_(1, targets[:, None], float("-inf"))  # the target is not one of its rivals
    return 1 + (others >= target_score).sum(dim=1)


def penalise_popularity(scores: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores [B, N + 1] standardised per user over the finite candidates, minus `penalty` times the
    standardised log(1 + events) of each item (counts [N + 1]); -inf stays -inf. At penalty 0 the order
    is unchanged; the units are standard deviations, so one penalty means the same for any model."""
    finite = torch.isfinite(scores)
    values = scores.double().masked_fill(~finite, 0.0)
    n = finite.sum(dim=1, keepdim=True).clamp(min=1)
    mean = values.sum(dim=1, keepdim=True) / n
    std = (((values - mean) * finite) ** 2).sum(dim=1, keepdim=True).div(n).sqrt().clamp(min=1e-12)
    log_pop = torch.log1p(counts.double().to(scores.device))  # [N + 1]
    real = log_pop[1:]
    pop_z = (log_pop - real.mean()) / real.std(unbiased=False).clamp(min=1e-12)
    adjusted = (values - mean) / std - penalty * pop_z[None, :]
    return adjusted.masked_fill(~finite, float("-inf")).to(scores.dtype)


def mmr(
    relevance: torch.Tensor, ids: torch.Tensor, unit_vectors: torch.Tensor, diversity: float, k: int
) -> torch.Tensor:
    """Maximal marginal relevance: k picks from a candidate pool, each the item maximising
    (1 - diversity) * relevance - diversity * (highest cosine similarity to the items already picked).

    relevance [B, P] (sorted descending; min-max scaled to [0, 1] here; -inf where there is no
    candidate, such slots come last), ids [B, P], unit_vectors [N + 1, d] -> pool positions [B, k].
    """
    b, p = relevance.shape
    valid = torch.isfinite(relevance)
    low = relevance.masked_fill(~valid, float("inf")).min(dim=1, keepdim=True).values
    high = relevance.masked_fill(~valid, float("-inf")).max(dim=1, keepdim=True).values
    rel = ((relevance - low) / (high - low).clamp(min=1e-12)).masked_fill(~valid, 0.0).float()  # [B, P]
    vectors = unit_vectors[ids].float()  # [B, P, d]
    closest = torch.zeros(b, p)  # highest similarity to a picked item (0 before the first pick)
    taken = torch.zeros(b, p, dtype=torch.bool)
    order = torch.zeros(b, k, dtype=torch.long)
    rows = torch.arange(b)
    for step in range(k):
        value = (1.0 - diversity) * rel - diversity * closest
        value = value.masked_fill(~valid, -1e30).masked_fill(taken, float("-inf"))
        pick = value.argmax(dim=1)  # [B]
        order[:, step] = pick
        taken[rows, pick] = True
        similarity = (vectors @ vectors[rows, pick][:, :, None]).squeeze(-1)  # [B, P]
        closest = similarity if step == 0 else torch.maximum(closest, similarity)
    return order


def top_k(
    scores: torch.Tensor, k: int, unit_vectors: torch.Tensor | None = None, diversity: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates per user, (ids [B, k], scores [B, k]); -inf where fewer exist.

    scores [B, N + 1] with non-candidates at -inf (`candidate_scores`, after `penalise_popularity` when
    popularity is penalised). With `diversity` in (0, 1] the k are picked by `mmr` over `unit_vectors`
    [N + 1, d] from the best max(MMR_POOL_FACTOR * k, MMR_MIN_POOL) candidates; their scores follow them.
    """
    k = min(k, scores.shape[1] - 1)
    if not diversity:
        values, ids = scores.topk(k, dim=1)  # [B, k]
        return ids, values
    if unit_vectors is None:
        raise ValueError("diversity needs item vectors")
    pool = min(max(MMR_POOL_FACTOR * k, MMR_MIN_POOL), scores.shape[1] - 1)
    values, ids = scores.topk(pool, dim=1)  # [B, P]
    order = mmr(values, ids, unit_vectors, diversity, k)  # [B, k]
    return ids.gather(1, order), values.gather(1, order)


def listed_ranks(targets: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Ranks [B] of the targets in re-ranked lists ids [B, k]: the position in the list where the target is
    in it, else its rank before, at least k + 1. Exact for every cut-off up to k (MRR counts a target
    outside the list at that bound)."""
    hit = ids == targets[:, None]  # [B, P]
    position = hit.float().argmax(dim=1) + 1
    return torch.where(hit.any(dim=1), position, ranks.clamp(min=ids.shape[1] + 1))


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows, e.g. padding or an item without text, stay zero)."""
    return F.normalize(vectors.float(), dim=-1)
