"""Item and user vocabularies: string ids <-> dense indices.

Item index 0 is padding; real items are 1..num_items. Users are 0..num_users-1. New ids are
numbered in natural order (numerically when every id is an integer, else as strings), so the
MovieLens movie 1 gets the first index. With an earlier vocabulary (`merge_item_vocab`) old items
keep their index exactly and new items are appended after the largest one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

ITEMS_SCHEMA = pa.schema(
    [
        ("item_index", pa.int32()),
        ("item_id", pa.string()),
        ("count", pa.int64()),
        ("title", pa.string()),
        ("text", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("user_index", pa.int32()), ("user_id", pa.string())])


def natural_order(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Positions that sort `ids`: by integer value when all are integers, else as strings."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    text = pc.cast(ids, pa.string())
    if pc.all(pc.match_substring_regex(text, r"^[+-]?\d{1,18}$")).as_py():
        return np.argsort(pc.cast(text, pa.int64()).to_numpy(), kind="stable")
    return np.asarray(pc.sort_indices(text))


class Indexer:
    """Maps ids to indices with one hash table built up front (reused for every batch)."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray, indices: np.ndarray) -> None:
        self._index = pd.Index(pc.cast(ids, pa.string()).to_pandas())
        self._values = np.asarray(indices, dtype=np.int32)

    def __call__(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Index of each id, -1 where the id is unknown."""
        pos = self._index.get_indexer(pc.cast(ids, pa.string()).to_pandas())
        if len(self._values) == 0:
            return np.full(len(pos), -1, dtype=np.int32)
        return np.where(pos >= 0, self._values[pos], -1).astype(np.int32)


def _strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    col = pc.cast(col, pa.string())
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def merge_item_vocab(old_items: pa.Table, new_items: pa.Table) -> pa.Table:
    """Old items keep their `item_index`; ids only in `new_items` get the next indices.

    `old_items` has at least `item_index` and `item_id`; `new_items` has `item_id` and optionally
    `count`, `title`, `text`. Counts come from `new_items` (0 for old items absent there); title and
    text come from `new_items` where given, else from `old_items`. Returns an `ITEMS_SCHEMA` table
    sorted by `item_index`.
    """
    old_ids, new_ids = _strings(old_items["item_id"]), _strings(new_items["item_id"])
    old_index = pc.cast(old_items["item_index"], pa.int32()).to_numpy()
    pos_in_old = Indexer(old_ids, np.arange(len(old_ids)))(new_ids)
    fresh = np.flatnonzero(pos_in_old < 0)
    fresh = fresh[natural_order(new_ids.take(fresh))]
    start = int(old_index.max()) + 1 if len(old_index) else 1
    n_old, n_new = len(old_ids), len(fresh)

    # for every output row (old items, then fresh ones): its row in new_items, -1 when absent
    at_new = np.full(n_old + n_new, -1, dtype=np.int64)
    at_new[pos_in_old[pos_in_old >= 0]] = np.flatnonzero(pos_in_old >= 0)
    at_new[n_old:] = fresh
    take_new = pa.array(at_new, mask=at_new < 0)

    def column(name: str, dtype: pa.DataType) -> pa.Array:
        new = new_items[name].take(take_new) if name in new_items.column_names else pa.nulls(len(at_new))
        old = old_items[name] if name in old_items.column_names else pa.nulls(n_old)
        old = pa.concat_arrays([_strings(old) if dtype == pa.string() else old, pa.nulls(n_new, dtype)])
        return pc.coalesce(pc.cast(new, dtype), pc.cast(old, dtype))

    counts = pa.array(np.zeros(len(at_new), dtype=np.int64))
    if "count" in new_items.column_names:
        counts = pc.fill_null(pc.cast(new_items["count"].take(take_new), pa.int64()), 0)
    index = np.concatenate([old_index, np.arange(start, start + n_new)]).astype(np.int32)
    merged = pa.Table.from_arrays(
        [
            pa.array(index),
            pa.concat_arrays([old_ids, new_ids.take(fresh)]),
            counts,
            column("title", pa.string()),
            column("text", pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )
    return merged.sort_by("item_index")


def build_item_vocab(
    counts: pa.Table, item_table: pa.Table | None, min_count: int, old_items: pa.Table | None = None
) -> tuple[pa.Table, int]:
    """Items with at least `min_count` events (all old items are kept) -> (vocabulary, events dropped).

    `counts` has `item_id` and `count` (raw events per item); `item_table` optionally `item_id`,
    `title`, `text`. The returned `count` is the raw count; the caller replaces it with the
    count in the prepared data.
    """
    keep = pc.greater_equal(counts["count"], min_count)
    if old_items is not None:
        keep = pc.or_(keep, pc.is_in(counts["item_id"], value_set=pc.cast(old_items["item_id"], pa.string())))
    dropped = int(pc.sum(pc.filter(counts["count"], pc.invert(keep))).as_py() or 0)
    kept = counts.filter(keep)
    new_items = kept.select(["item_id", "count"])
    if item_table is not None:
        new_items = new_items.join(item_table, "item_id", join_type="left outer")
    if old_items is None:
        old_items = pa.table({"item_index": pa.array([], pa.int32()), "item_id": pa.array([], pa.string())})
    return merge_item_vocab(old_items, new_items), dropped


def build_user_vocab(user_ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Distinct user ids in natural order -> `user_index` 0..n-1."""
    ids = pc.unique(_strings(user_ids))
    ids = pc.take(ids, pa.array(natural_order(ids), pa.int64()))
    return pa.Table.from_arrays([pa.array(np.arange(len(ids), dtype=np.int32)), ids], schema=USERS_SCHEMA)
