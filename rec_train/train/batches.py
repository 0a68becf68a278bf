"""Rows of the sequences table (docs/formats.md) -> model tensors, built on each worker.

Training: one row per user; the input is the sequence without its last item and the labels are the
sequence shifted by one (`labels[b, t]` is the item after position t), both left-padded so the most
recent item sits at -1. Evaluation: the history and the held-out target of one split.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rec_train.data.collate import pad_left

TRAIN_COLUMNS = ["user_index", "train_items", "valid_item", "test_item"]
SPLITS = ("valid", "test")


def training_sequence(train_items: list[int], valid_item: int, include_valid: bool) -> list[int]:
    """The items a user trains on: `train_items`, plus the validation target under `include_valid`."""
    return [*train_items, valid_item] if include_valid and valid_item else list(train_items)


def training_batch(
    rows: pa.RecordBatch | pa.Table, max_len: int, include_valid: bool
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `labels`, each [B, L] with L <= max_len."""
    seqs = [
        training_sequence(items, valid, include_valid)[-(max_len + 1) :]
        for items, valid in zip(rows["train_items"].to_pylist(), rows["valid_item"].to_pylist(), strict=True)
    ]
    input_ids, attention_mask = pad_left([s[:-1] for s in seqs], max_len)  # [B, L]
    labels, _ = pad_left([s[1:] for s in seqs], max_len)  # [B, L], same L: equal lengths
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def trainable_rows(rows: pa.Table, include_valid: bool) -> pa.Table:
    """Users with at least two training items (one input, one label); the others give no loss."""
    length = pc.list_value_length(rows["train_items"]).fill_null(0)
    if include_valid:
        length = pc.add(length, pc.cast(pc.not_equal(rows["valid_item"], 0), pa.int32()))
    return rows.filter(pc.greater_equal(length, 2))


@dataclass
class EvalBatch:
    input_ids: torch.Tensor  # [B, L] history, left-padded, truncated to max_len
    attention_mask: torch.Tensor  # [B, L]
    seen: torch.Tensor  # [B, H] the whole history, excluded from the candidates
    targets: torch.Tensor  # [B]


def eval_batch(rows: pa.RecordBatch | pa.Table, split: str, max_len: int) -> EvalBatch | None:
    """History and target of `split` ("valid": history train_items; "test": train_items + [valid_item]).

    Users without a target for the split, or without any history, are not evaluated. None when no
    user of `rows` is.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    histories, targets = [], []
    for items, valid, test in zip(
        rows["train_items"].to_pylist(),
        rows["valid_item"].to_pylist(),
        rows["test_item"].to_pylist(),
        strict=True,
    ):
        history = training_sequence(items, valid, include_valid=split == "test")
        target = valid if split == "valid" else test
        if target and history:
            histories.append(history)
            targets.append(target)
    if not targets:
        return None
    input_ids, attention_mask = pad_left(histories, max_len)  # [B, L]
    seen, _ = pad_left(histories, max(len(h) for h in histories))  # [B, H]
    return EvalBatch(input_ids, attention_mask, seen, torch.tensor(targets, dtype=torch.long))
