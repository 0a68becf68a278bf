"""Rows of the sequences table (docs/formats.md) -> model tensors, built on each worker.

Training: one row per user (and, under `data.windows=all`, one per older window of a long history);
the input is the sequence without its last item and the labels are the sequence shifted by one
(`labels[b, t]` is the item after position t), both left-padded so the most recent item sits at -1.
Evaluation: the history and the held-out target of one split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rec_train.data.collate import pad_left

TRAIN_COLUMNS = ["user_index", "train_items", "valid_item", "test_item"]
VALUE_COLUMNS = ["values", "valid_value", "test_value"]  # pointwise fine-tuning also reads these
SPLITS = ("valid", "test")


def task_columns(task: str) -> list[str]:
    """The sequence columns a training task reads."""
    return TRAIN_COLUMNS if task == "next_item" else TRAIN_COLUMNS + VALUE_COLUMNS


def pointwise_target(value: float, task: str, click_threshold: float) -> float:
    """The regression target (rating) or 0/1 label (click) of an event value."""
    return value if task == "rating" else float(value >= click_threshold)


def training_sequence(train_items: list[int], valid_item: int, include_valid: bool) -> list[int]:
    """The items a user trains on: `train_items`, plus the validation target under `include_valid`."""
    return [*train_items, valid_item] if include_valid and valid_item else list(train_items)


def item_events(rows: pa.Table | pa.RecordBatch, num_items: int, include_valid: bool) -> np.ndarray:
    """Events per item index [num_items + 1] (int64) in the users' training sequences: `train_items`, plus
    the validation targets under `include_valid`. Test targets are never counted: what training (popularity
    negatives, logQ) and evaluation (popularity baseline, beyond-accuracy figures) call popularity."""
    flat = pc.list_flatten(rows["train_items"]).to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.bincount(flat, minlength=num_items + 1)
    if include_valid:
        counts += np.bincount(
            pc.fill_null(rows["valid_item"], 0).to_numpy(zero_copy_only=False).astype(np.int64),
            minlength=num_items + 1,
        )
    counts[0] = 0
    return counts[: num_items + 1]


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


def position_share(batch: dict[str, torch.Tensor], batch_size: int, max_len: int) -> float:
    """Labelled positions of a training batch (`labels`, or `candidates` of a pointwise batch) over the
    `batch_size * max_len` of a full batch: the weight of its mean loss under `train.loss_per=position`."""
    labelled = batch["labels"] if "labels" in batch else batch["candidates"]
    return int((labelled != 0).sum()) / (batch_size * max_len)


def pointwise_batch(
    rows: pa.RecordBatch | pa.Table, max_len: int, include_valid: bool, task: str, click_threshold: float
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `candidates`, `targets`, each [B, L]: the state after position t rates
    the next item `candidates[b, t]`; events without a value (NaN) get candidate 0 (no loss)."""
    inputs, candidates, targets = [], [], []
    columns = zip(
        rows["train_items"].to_pylist(), rows["valid_item"].to_pylist(),
        rows["values"].to_pylist(), rows["valid_value"].to_pylist(), strict=True,
    )  # fmt: skip
    for items, valid, values, valid_value in columns:
        seq = training_sequence(items, valid, include_valid)[-(max_len + 1) :]
        # `values` follows the user's whole sequence, of which `train_items` is the start
        vals = [*values[: len(items)], *([valid_value] if include_valid and valid else [])][-(max_len + 1) :]
        rated = [v is not None and math.isfinite(v) for v in vals[1:]]
        inputs.append(seq[:-1])
        candidates.append([i if ok else 0 for i, ok in zip(seq[1:], rated, strict=True)])
        targets.append(
            [
                pointwise_target(v, task, click_threshold) if ok else 0.0
                for v, ok in zip(vals[1:], rated, strict=True)
            ]
        )
    input_ids, attention_mask = pad_left(inputs, max_len)  # [B, L]
    candidate_ids, _ = pad_left(candidates, max_len)  # [B, L]
    width = input_ids.shape[1]
    target_values = torch.zeros(len(targets), width)  # [B, L]
    for b, t in enumerate(targets):
        if t:
            target_values[b, width - len(t) :] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "candidates": candidate_ids,
            "targets": target_values}  # fmt: skip


def training_lengths(rows: pa.Table, include_valid: bool) -> pa.Array:
    """Each row's number of training items: `train_items`, plus the validation item when it is trained on."""
    length = pc.list_value_length(rows["train_items"]).fill_null(0)
    if include_valid:
        length = pc.add(length, pc.cast(pc.not_equal(rows["valid_item"], 0).fill_null(False), pa.int32()))
    return length


def grouped_by_length(
    rows: pa.Table, batch_size: int, include_valid: bool, rng: np.random.Generator
) -> list[pa.Table]:
    """`rows` sorted by training length (longest first), cut into batches of `batch_size`, in the order of
    `rng`'s permutation: a batch pads less (`training_batch` pads to its longest row). With the same `rng`
    on every worker, equal shares of similar rows give every worker a batch of similar length at each step."""
    order = np.argsort(-training_lengths(rows, include_valid).to_numpy(), kind="stable")
    batches = [rows.take(order[i : i + batch_size]) for i in range(0, rows.num_rows, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def trainable_rows(rows: pa.Table, include_valid: bool, window: int | None = None) -> pa.Table:
    """Users with at least two training items (one input, one label); the others give no loss.

    With `window` (the model's max_seq_len), a longer training sequence also yields rows for its older
    events: windows of up to `window + 1` items going back from the newest `window + 1` (which
    `training_batch` takes from the user's own row), each ending on the item before the next window's
    labels start, so every item after the first is a label exactly once. Older rows have no
    validation or test target.
    """
    length = training_lengths(rows, include_valid)
    keep = pc.greater_equal(length, 2)
    rows = rows.filter(keep)
    if window is None:
        return rows
    older = older_windows(rows, length.filter(keep).to_pylist(), window)
    return pa.concat_tables([rows, older]) if older.num_rows else rows


def older_windows(rows: pa.Table, lengths: list[int], window: int) -> pa.Table:
    """The rows of `trainable_rows` before each user's newest window; `lengths` are the users' numbers
    of training items (`train_items`, plus the validation item when it is trained on)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    picked, starts, ends = [], [], []  # row index and [start, end) into train_items of each older window
    for r, n in enumerate(lengths):
        end = n - window  # labels of the window that ends here start `window` items later
        while end >= 2:
            picked.append(r), starts.append(max(0, end - window - 1)), ends.append(end)
            end -= window

    def sliced(name: str) -> pa.Array:
        column = rows[name].to_pylist()
        return pa.array(
            [column[r][a:b] for r, a, b in zip(picked, starts, ends, strict=True)], rows[name].type
        )

    out = {name: rows[name].take(pa.array(picked, pa.int64())) for name in rows.column_names}
    for name in rows.column_names:
        if name in ("train_items", "values"):  # `values` follows the sequence that `train_items` starts
            out[name] = sliced(name)
        elif name in ("valid_item", "test_item"):
            out[name] = pa.array([0] * len(picked), rows[name].type)
        elif name in ("valid_value", "test_value"):
            out[name] = pa.nulls(len(picked), rows[name].type)
    return pa.table(out, schema=rows.schema)


@dataclass
class EvalBatch:
    input_ids: torch.Tensor  # [B, L] history, left-padded, truncated to max_len
    attention_mask: torch.Tensor  # [B, L]
    seen: torch.Tensor  # [B, H] the whole history, excluded from the candidates
    targets: torch.Tensor  # [B]


@dataclass
class PointwiseEvalBatch:
    input_ids: torch.Tensor  # [B, L] history, left-padded
    attention_mask: torch.Tensor  # [B, L]
    candidates: torch.Tensor  # [B] the split's target item
    targets: torch.Tensor  # [B] its rating or 0/1 click


def pointwise_eval_batch(
    rows: pa.RecordBatch | pa.Table, split: str, max_len: int, task: str, click_threshold: float
) -> PointwiseEvalBatch | None:
    """History of `split` (as `eval_batch`) and the split's target item with its value; users whose target
    has no value are not evaluated. None when no user of `rows` is."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    histories, candidates, targets = [], [], []
    for items, valid, test, valid_value, test_value in zip(
        rows["train_items"].to_pylist(), rows["valid_item"].to_pylist(), rows["test_item"].to_pylist(),
        rows["valid_value"].to_pylist(), rows["test_value"].to_pylist(), strict=True,
    ):  # fmt: skip
        history = training_sequence(items, valid, include_valid=split == "test")
        target, value = (valid, valid_value) if split == "valid" else (test, test_value)
        if target and history and value is not None and math.isfinite(value):
            histories.append(history)
            candidates.append(target)
            targets.append(pointwise_target(value, task, click_threshold))
    if not targets:
        return None
    input_ids, attention_mask = pad_left(histories, max_len)  # [B, L]
    return PointwiseEvalBatch(input_ids, attention_mask, torch.tensor(candidates), torch.tensor(targets))


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
