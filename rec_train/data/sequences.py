"""Per-user chronological sequences, truncation and train / validation / test targets.

`build_sequences` turns indexed events of any set of users into one row per user. It runs inside
Ray Data's `groupby("user_id").map_groups` during `prepare`, and works on plain tables in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_index", pa.int32()),
        ("user_id", pa.string()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("train_items", pa.list_(pa.int32())),
        ("valid_item", pa.int32()),
        ("test_item", pa.int32()),
    ]
)
# Rows out of `build_sequences`: the sequence columns (no user_index yet) + bookkeeping per user.
USER_ROW_SCHEMA = pa.schema(
    [f for f in SEQUENCE_SCHEMA if f.name != "user_index"]
    + [
        pa.field("n_events", pa.int64()),  # after duplicates policy, before truncation
        pa.field("n_duplicates", pa.int64()),
        pa.field("n_truncated", pa.int64()),
        pa.field("short", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class SequenceOptions:
    max_seq_len: int | None = None
    split: str = "leave_one_out"  # or "time"
    valid_cutoff: int | None = None
    test_cutoff: int | None = None
    min_user_events: int = 1
    drop_duplicates: bool = True


def truncate(items: np.ndarray, timestamps: np.ndarray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the `max_len` most recent events (arrays are oldest first)."""
    if max_len is None or len(items) <= max_len:
        return items, timestamps
    return items[-max_len:], timestamps[-max_len:]


def split_leave_one_out(items: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(train_items, valid_item, test_item): last = test, second to last = validation; 0 = none."""
    test = int(items[-1]) if len(items) >= 1 else 0
    valid = int(items[-2]) if len(items) >= 2 else 0
    return items[:-2], valid, test


def split_by_time(
    items: np.ndarray, timestamps: np.ndarray, valid_cutoff: int, test_cutoff: int
) -> tuple[np.ndarray, int, int]:
    """Train: events before `valid_cutoff`; validation: first in [valid, test); test: first >= test."""
    train = items[timestamps < valid_cutoff]
    in_valid = np.flatnonzero((timestamps >= valid_cutoff) & (timestamps < test_cutoff))
    in_test = np.flatnonzero(timestamps >= test_cutoff)
    valid = int(items[in_valid[0]]) if len(in_valid) else 0
    test = int(items[in_test[0]]) if len(in_test) else 0
    return train, valid, test


def build_sequences(events: pa.Table, options: SequenceOptions) -> pa.Table:
    """Events (`user_id`, `item_index`, `timestamp`, `order`) -> one `USER_ROW_SCHEMA` row per user.

    Events are ordered by time, ties by input order; duplicates are repeated (item, timestamp)
    pairs of a user, counted per user and removed when `options.drop_duplicates`.
    """
    users, user_codes = np.unique(events["user_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    items = events["item_index"].to_numpy().astype(np.int32)
    times = events["timestamp"].to_numpy().astype(np.int64)
    order = events["order"].to_numpy()
    perm = np.lexsort((order, times, user_codes))
    user_codes, items, times = user_codes[perm], items[perm], times[perm]

    repeated = pd.DataFrame({"u": user_codes, "i": items, "t": times}).duplicated().to_numpy()
    n_duplicates = np.bincount(user_codes[repeated], minlength=len(users))
    if options.drop_duplicates:
        user_codes, items, times = user_codes[~repeated], items[~repeated], times[~repeated]
    bounds = np.searchsorted(user_codes, np.arange(len(users) + 1))  # user u: rows bounds[u]:bounds[u+1]

    seq_items, seq_times, train_items = [], [], []
    valid, test = np.zeros(len(users), np.int32), np.zeros(len(users), np.int32)
    n_events = np.diff(bounds)
    n_truncated = np.zeros(len(users), np.int64)
    for u in range(len(users)):
        user_items, user_times = truncate(
            items[bounds[u] : bounds[u + 1]], times[bounds[u] : bounds[u + 1]], options.max_seq_len
        )
        n_truncated[u] = n_events[u] - len(user_items)
        if options.split == "time":
            assert options.valid_cutoff is not None and options.test_cutoff is not None
            train, valid[u], test[u] = split_by_time(
                user_items, user_times, options.valid_cutoff, options.test_cutoff
            )
        else:
            train, valid[u], test[u] = split_leave_one_out(user_items)
        seq_items.append(user_items)
        seq_times.append(user_times)
        train_items.append(train)

    def lists(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
        values = np.concatenate(arrays) if arrays else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, dtype))

    return pa.Table.from_arrays(
        [
            pa.array(users.astype(str), pa.string()),
            lists(seq_items, pa.int32()),
            lists(seq_times, pa.int64()),
            lists(train_items, pa.int32()),
            pa.array(valid),
            pa.array(test),
            pa.array(n_events, pa.int64()),
            pa.array(n_duplicates, pa.int64()),
            pa.array(n_truncated),
            pa.array(n_events < options.min_user_events),
        ],
        schema=USER_ROW_SCHEMA,
    )
