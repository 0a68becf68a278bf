"""Item / user vocabularies, and keeping old item indices when new data arrives."""

from __future__ import annotations

import pyarrow as pa

from rec_train.data.vocab import (
    ITEMS_SCHEMA,
    Indexer,
    build_item_vocab,
    build_user_vocab,
    merge_item_vocab,
    natural_order,
)


def test_natural_order_is_numeric_for_integer_ids_else_textual() -> None:
    assert natural_order(pa.array(["10", "9", "100", "1"])).tolist() == [3, 1, 0, 2]
    assert natural_order(pa.array(["b", "10", "a"])).tolist() == [1, 2, 0]


def test_indexer_marks_unknown_ids() -> None:
    index = Indexer(pa.array(["a", "b"]), [5, 7])
    assert index(pa.array(["b", "zz", "a"])).tolist() == [7, -1, 5]


def test_item_vocab_starts_at_one_and_filters_rare_items() -> None:
    counts = pa.table({"item_id": ["30", "4", "100"], "count": pa.array([1, 5, 2], pa.int64())})
    titles = pa.table({"item_id": ["4", "100"], "title": ["Four", "Hundred"], "text": ["Four. X", None]})
    vocab, dropped = build_item_vocab(counts, titles, min_count=2)
    assert vocab.schema == ITEMS_SCHEMA
    assert vocab.to_pylist() == [
        {"item_index": 1, "item_id": "4", "count": 5, "title": "Four", "text": "Four. X"},
        {"item_index": 2, "item_id": "100", "count": 2, "title": "Hundred", "text": None},
    ]
    assert dropped == 1


def test_merge_keeps_old_indices_and_appends_new_items() -> None:
    old = pa.table(
        {
            "item_index": pa.array([1, 2, 3], pa.int32()),
            "item_id": ["m10", "m2", "m7"],
            "count": [9, 9, 9],
            "title": ["Ten", "Two", "Seven"],
            "text": ["Ten.", None, "Seven."],
        }
    )
    new = pa.table(
        {
            "item_id": ["m2", "m99", "m10", "m11"],
            "count": [1, 2, 3, 4],
            "title": ["Two (new)", None, None, "Eleven"],
            "text": [None, None, None, "Eleven."],
        }
    )
    merged = merge_item_vocab(old, new)
    rows = {r["item_id"]: r for r in merged.to_pylist()}
    assert [rows[i]["item_index"] for i in ("m10", "m2", "m7")] == [1, 2, 3]  # exactly as before
    assert rows["m11"]["item_index"] == 4 and rows["m99"]["item_index"] == 5  # appended, natural order
    assert rows["m7"]["count"] == 0 and rows["m10"]["count"] == 3  # counts of the new data
    assert rows["m2"]["title"] == "Two (new)" and rows["m10"]["title"] == "Ten"  # new text wins, else old
    assert merged["item_index"].to_pylist() == [1, 2, 3, 4, 5]


def test_build_item_vocab_with_old_items_keeps_rare_old_items() -> None:
    old = pa.table({"item_index": pa.array([1, 2], pa.int32()), "item_id": ["a", "b"]})
    counts = pa.table({"item_id": ["b", "c", "d"], "count": pa.array([1, 1, 3], pa.int64())})
    vocab, dropped = build_item_vocab(counts, None, min_count=2, old_items=old)
    assert dict(zip(vocab["item_id"].to_pylist(), vocab["item_index"].to_pylist(), strict=True)) == {
        "a": 1,
        "b": 2,
        "d": 3,
    }
    assert dropped == 1  # only the new rare item "c"


def test_user_vocab_is_dense_and_sorted() -> None:
    users = build_user_vocab(pa.chunked_array([["12", "3"], ["3", "100"]]))
    assert users.to_pylist() == [
        {"user_index": 0, "user_id": "3"},
        {"user_index": 1, "user_id": "12"},
        {"user_index": 2, "user_id": "100"},
    ]
