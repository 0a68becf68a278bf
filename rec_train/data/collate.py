"""Turn item-index sequences into padded tensors (shared by training, evaluation and serving)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_left(seqs: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `max_len` items of each sequence and left-pad with 0.

    Returns `input_ids` [B, L] (int64) and `attention_mask` [B, L] (int64, 1 = real item), where
    L = min(max_len, longest sequence) and at least 1, so the most recent item is always at -1.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    length = max(1, min(max_len, max((len(s) for s in seqs), default=1)))
    input_ids = torch.zeros((len(seqs), length), dtype=torch.long)  # [B, L]
    for row, seq in enumerate(seqs):
        tail = list(seq)[-length:]
        if tail:
            input_ids[row, length - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
    return input_ids, (input_ids != 0).long()
