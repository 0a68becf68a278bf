"""Per-user chronological sequences, truncation and train / validation / test targets.

`build_sequences` turns indexed events of any set of users into one row per user. It runs inside
Ray Data's `groupby("user_bucket").map_groups` during `prepare`, and works on plain tables in tests.
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
        ("values", pa.list_(pa.float32())),  # rating / weight per event of `items`; NaN where none
        ("valid_value", pa.float32()),
        ("test_value", pa.float32()),
        ("event_types", pa.list_(pa.string())),  # kind of each event of `items`; null where none
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


def truncate(items: np.ndarray, *aligned: np.ndarray, max_len: int | None) -> tuple[np.ndarray, ...]:
    """Keep the `max_len` most recent events of `items` and of each aligned array (oldest first)."""
    if max_len is None or len(items) <= max_len:
        return (items, *aligned)
    return tuple(a[-max_len:] for a in (items, *aligned))


def split_leave_one_out(n: int) -> tuple[int, int, int]:
    """(training prefix length, validation position, test position) of n events; -1 = none.
    The last event is the test target, the one before it the validation target."""
    return max(n - 2, 0), (n - 2 if n >= 2 else -1), (n - 1 if n >= 1 else -1)


def split_by_time(timestamps: np.ndarray, valid_cutoff: int, test_cutoff: int) -> tuple[int, int, int]:
    """Like `split_leave_one_out` for time-ordered events: training = before `valid_cutoff`, validation =
    the first event in [valid_cutoff, test_cutoff), test = the first at or after `test_cutoff`."""
    in_valid = np.flatnonzero((timestamps >= valid_cutoff) & (timestamps < test_cutoff))
    in_test = np.flatnonzero(timestamps >= test_cutoff)
    n_train = int(np.count_nonzero(timestamps < valid_cutoff))
    return n_train, (int(in_valid[0]) if len(in_valid) else -1), (int(in_test[0]) if len(in_test) else -1)


def build_sequences(events: pa.Table, options: SequenceOptions) -> pa.Table:
    """Events (`user_id`, `item_index`, `timestamp`, `order`, optional `value` and `event_type`) -> one
    `USER_ROW_SCHEMA` row per user.

    Events are ordered by time, ties by input order; duplicates are repeated (item, timestamp)
    pairs of a user, counted per user and removed when `options.drop_duplicates`. Events of items
    outside the vocabulary (`item_index` -1) are left out; a user with only those gets an empty row.
    """
    users, user_codes = np.unique(events["user_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    known = events["item_index"].to_numpy() >= 0
    events, user_codes = events.filter(pa.array(known)), user_codes[known]
    items = events["item_index"].to_numpy().astype(np.int32)
    times = events["timestamp"].to_numpy().astype(np.int64)
    order = events["order"].to_numpy()
    if "value" in events.column_names:
        values = events["value"].to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    else:
        values = np.full(len(items), np.nan, np.float32)
    if "event_type" in events.column_names:
        kinds = events["event_type"].to_numpy(zero_copy_only=False).astype(object)
    else:
        kinds = np.full(len(items), None, object)
    perm = np.lexsort((order, times, user_codes))
    user_codes, items, times, values, kinds = (a[perm] for a in (user_codes, items, times, values, kinds))

    repeated = pd.DataFrame({"u": user_codes, "i": items, "t": times}).duplicated().to_numpy()
    n_duplicates = np.bincount(user_codes[repeated], minlength=len(users))
    if options.drop_duplicates:
        user_codes, items, times, values, kinds = (
            a[~repeated] for a in (user_codes, items, times, values, kinds)
        )
    bounds = np.searchsorted(user_codes, np.arange(len(users) + 1))  # user u: rows bounds[u]:bounds[u+1]

    seq_items, seq_times, seq_values, seq_kinds, train_items = [], [], [], [], []
    valid, test = np.zeros(len(users), np.int32), np.zeros(len(users), np.int32)
    valid_value, test_value = np.full(len(users), np.nan, np.float32), np.full(len(users), np.nan, np.float32)
    n_events = np.diff(bounds)
    n_truncated = np.zeros(len(users), np.int64)
    for u in range(len(users)):
        rows = slice(bounds[u], bounds[u + 1])
        user_items, user_times, user_values, user_kinds = truncate(
            items[rows], times[rows], values[rows], kinds[rows], max_len=options.max_seq_len
        )
        n_truncated[u] = n_events[u] - len(user_items)
        if options.split == "time":
            assert options.valid_cutoff is not None and options.test_cutoff is not None
            n_train, v, t = split_by_time(user_times, options.valid_cutoff, options.test_cutoff)
        else:
            n_train, v, t = split_leave_one_out(len(user_items))
        if v >= 0:
            valid[u], valid_value[u] = user_items[v], user_values[v]
        if t >= 0:
            test[u], test_value[u] = user_items[t], user_values[t]
        seq_items.append(user_items)
        seq_times.append(user_times)
        seq_values.append(user_values)
        seq_kinds.append(user_kinds)
        train_items.append(user_items[:n_train])

    def lists(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
        values = np.concatenate(arrays) if arrays else []
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, dtype))

    return pa.Table.from_arrays(
        [
            pa.array(users.astype(str), pa.string()),
            lists(seq_items, pa.int32()),
            lists(seq_times, pa.int64()),
            lists(train_items, pa.int32()),
            pa.array(valid),
            pa.array(test),
            lists(seq_values, pa.float32()),
            pa.array(valid_value),
            pa.array(test_value),
            lists(seq_kinds, pa.string()),
            pa.array(n_events, pa.int64()),
            pa.array(n_duplicates, pa.int64()),
            pa.array(n_truncated),
            pa.array(n_events < options.min_user_events),
        ],
        schema=USER_ROW_SCHEMA,
    )
