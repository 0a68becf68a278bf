"""Chronological per-user sequences, truncation, duplicates and both splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rec_train.data.prepare import _index_items
from rec_train.data.sequences import (
    USER_ROW_SCHEMA,
    SequenceOptions,
    build_sequences,
    split_by_time,
    split_leave_one_out,
    truncate,
)


def events(rows: list[tuple[str, int, int]]) -> pa.Table:
    users, items, times = zip(*rows, strict=True)
    return pa.table(
        {
            "user_id": list(users),
            "item_index": pa.array(items, pa.int32()),
            "timestamp": pa.array(times, pa.int64()),
            "order": pa.array(range(len(rows)), pa.int64()),
        }
    )


def test_truncate_keeps_most_recent() -> None:
    items, times = truncate(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40]), max_len=2)
    assert items.tolist() == [3, 4] and times.tolist() == [30, 40]
    assert truncate(np.array([1, 2]), np.array([1, 2]), max_len=None)[0].tolist() == [1, 2]


def test_leave_one_out() -> None:
    assert split_leave_one_out(4) == (2, 2, 3)  # train items[:2], validation items[2], test items[3]
    assert split_leave_one_out(1) == (0, -1, 0)
    assert split_leave_one_out(0) == (0, -1, -1)


def test_split_by_time_uses_first_event_of_each_window() -> None:
    times = np.array([10, 20, 30, 40, 50])
    assert split_by_time(times, valid_cutoff=25, test_cutoff=40) == (2, 2, 3)
    assert split_by_time(times, 100, 200) == (5, -1, -1)


def test_values_follow_their_events_through_sorting_truncation_and_split() -> None:
    table = events([("u", 3, 30), ("u", 1, 10), ("u", 2, 20), ("u", 4, 40), ("v", 5, 1)]).append_column(
        "value", pa.array([3.0, 1.0, None, 4.0, 5.0])
    )
    u, v = build_sequences(table, SequenceOptions(max_seq_len=3)).to_pylist()
    assert u["items"] == [2, 3, 4] and u["values"][1:] == [3.0, 4.0] and np.isnan(u["values"][0])
    assert (u["valid_item"], u["valid_value"], u["test_item"], u["test_value"]) == (3, 3.0, 4, 4.0)
    assert (v["test_value"], v["valid_item"]) == (5.0, 0) and np.isnan(v["valid_value"])
    no_values = build_sequences(events([("u", 1, 1), ("u", 2, 2)]), SequenceOptions()).to_pylist()[0]
    assert np.isnan(no_values["values"]).all() and np.isnan(no_values["test_value"])


def test_build_sequences_orders_by_time_then_input_order() -> None:
    table = events([("u1", 3, 30), ("u2", 9, 5), ("u1", 1, 10), ("u1", 2, 10), ("u1", 4, 40)])
    rows = build_sequences(table, SequenceOptions(min_user_events=3))
    assert rows.schema == USER_ROW_SCHEMA
    u1, u2 = rows.to_pylist()
    assert u1["items"] == [1, 2, 3, 4] and u1["timestamps"] == [10, 10, 30, 40]
    assert (u1["train_items"], u1["valid_item"], u1["test_item"]) == ([1, 2], 3, 4)
    assert not u1["short"] and u2["short"] and u2["n_events"] == 1


def test_duplicates_are_counted_and_dropped_or_kept() -> None:
    table = events([("u", 1, 1), ("u", 1, 1), ("u", 2, 2), ("u", 1, 3)])
    dropped = build_sequences(table, SequenceOptions()).to_pylist()[0]
    assert dropped["items"] == [1, 2, 1] and dropped["n_duplicates"] == 1  # a later repeat is not a duplicate
    kept = build_sequences(table, SequenceOptions(drop_duplicates=False)).to_pylist()[0]
    assert kept["items"] == [1, 1, 2, 1] and kept["n_duplicates"] == 1


def test_truncation_before_split_and_counted() -> None:
    table = events([("u", i, i) for i in range(1, 8)])
    row = build_sequences(table, SequenceOptions(max_seq_len=4)).to_pylist()[0]
    assert row["items"] == [4, 5, 6, 7] and row["train_items"] == [4, 5]
    assert row["n_events"] == 7 and row["n_truncated"] == 3


def test_time_split_in_build_sequences() -> None:
    table = events([("u", 1, 1), ("u", 2, 5), ("u", 3, 6), ("u", 4, 9)])
    row = build_sequences(table, SequenceOptions(split="time", valid_cutoff=5, test_cutoff=9)).to_pylist()[0]
    assert (row["train_items"], row["valid_item"], row["test_item"]) == ([1], 2, 4)


def test_event_types_follow_their_events() -> None:
    table = events([("u", 2, 20), ("u", 1, 10), ("u", 3, 30)]).append_column(
        "event_type", pa.array(["click", None, "purchase"])
    )
    row = build_sequences(table, SequenceOptions()).to_pylist()[0]
    assert row["items"] == [1, 2, 3] and row["event_types"] == [None, "click", "purchase"]
    assert build_sequences(events([("u", 1, 1)]), SequenceOptions()).to_pylist()[0]["event_types"] == [None]


def test_build_sequences_keeps_users_whose_items_were_all_rare() -> None:
    rare = -1  # item_index of an item below the minimum count
    bucket = events([("a", 1, 1), ("d", rare, 2), ("a", 2, 3), ("d", rare, 4), ("e", 3, 5), ("a", rare, 6)])
    rows = {r["user_id"]: r for r in build_sequences(bucket, SequenceOptions(min_user_events=2)).to_pylist()}
    assert sorted(rows) == ["a", "d", "e"]
    assert rows["a"]["items"] == [1, 2] and rows["a"]["n_events"] == 2 and not rows["a"]["short"]
    assert rows["d"]["items"] == [] and rows["d"]["n_events"] == 0 and rows["d"]["short"]
    assert rows["e"]["items"] == [3] and rows["e"]["short"]


def test_user_buckets_hold_whole_users_and_are_stable() -> None:
    n = 40
    table = pa.table(
        {
            "user_id": [f"u{k % 7}" for k in range(n)],
            "item_id": [str(k % 5) for k in range(n)],
            "timestamp": pa.array(range(n), pa.int64()),
            "order": pa.array(range(n), pa.int64()),
            "value": pa.nulls(n, pa.float64()),
            "event_type": pa.nulls(n, pa.string()),
        }
    )
    vocab = pa.array([str(k) for k in range(5)]), np.arange(1, 6)

    def buckets(rows: pa.Table) -> list[tuple[str, int]]:
        out = _index_items(rows, *vocab, buckets=4)
        return list(zip(out["user_id"].to_pylist(), out["user_bucket"].to_pylist(), strict=True))

    first = dict(buckets(table))
    assert all(first[user] == b and 0 <= b < 4 for user, b in buckets(table))  # one bucket per user
    assert all(first[user] == b for user, b in buckets(table.slice(23)))  # same in another block
    assert len(set(first.values())) > 1
