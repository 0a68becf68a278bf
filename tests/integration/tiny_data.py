"""Small prepared datasets written directly in the format of docs/formats.md, for training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEQ_SCHEMA = pa.schema(
    [
        ("user_index", pa.int32()), ("user_id", pa.string()), ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())), ("train_items", pa.list_(pa.int32())),
        ("valid_item", pa.int32()), ("test_item", pa.int32()),
    ]
)  # fmt: skip


def write_dataset(
    out: Path,
    items: int,
    step: int,
    seed: int,
    users: int = 200,
    length: int = 12,
    texts: list[str] | None = None,
) -> Path:
    """A prepared dataset (docs/formats.md): each user walks the items `step` at a time, 10% random jumps;
    item i's text is `texts[i - 1]` (default "Item i")."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        cur, seq = rng.randrange(1, items + 1), []
        for _ in range(length):
            seq.append(cur)
            cur = (cur - 1 + step) % items + 1 if rng.random() < 0.9 else rng.randrange(1, items + 1)
        rows.append(
            {"user_index": u, "user_id": f"u{u}", "items": seq, "timestamps": list(range(length)),
             "train_items": seq[:-2], "valid_item": seq[-2], "test_item": seq[-1]}
        )  # fmt: skip
    (out / "sequences").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SEQ_SCHEMA), out / "sequences" / "part-00000.parquet")
    counts = [0] * (items + 1)
    for row in rows:
        for i in row["items"]:
            counts[i] += 1
    ids = list(range(1, items + 1))
    pq.write_table(
        pa.table(
            {"item_index": pa.array(ids, pa.int32()), "item_id": [f"i{i}" for i in ids],
             "count": pa.array(counts[1:], pa.int64()), "title": [f"Item {i}" for i in ids],
             "text": texts or [f"Item {i}" for i in ids]}
        ),
        out / "items.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table(
            {"user_index": pa.array(range(users), pa.int32()), "user_id": [f"u{u}" for u in range(users)]}
        ),
        out / "users.parquet",
    )
    manifest = {
        "schema_version": 1, "kind": "rayrec.dataset", "max_seq_len": 20, "split": {"kind": "leave_one_out"},
        "counts": {"users": users, "items": items, "events": users * length, "skipped": {}},
        "source": "tests", "config": {}, "created": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
