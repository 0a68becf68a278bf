"""`prepare` on a real local Ray cluster: tiny files for the policies, splits and vocabulary reuse,
and the real MovieLens data in ../shared/data for the published counts."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rec_train.config import validate
from rec_train.data import dataset
from rec_train.data.config import PrepareConfig
from rec_train.data.prepare import prepare
from rec_train.data.synth import SynthConfig, synth
from rec_train.errors import DataError

pytestmark = pytest.mark.usefixtures("ray_shared")


def run(tmp_path: Path, name: str, **settings) -> tuple[dict, str]:
    out = str(tmp_path / name)
    summary = prepare(validate(PrepareConfig, {"output": out, **settings}))
    return summary, out


def by_user(out: str) -> dict[str, dict]:
    return {r["user_id"]: r for r in dataset.read_sequences(out).to_pylist()}


def test_policies_counts_and_layout(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(
        "user_id,item_id,timestamp\n"
        + "".join(f"a,i{k},{k}\n" for k in range(6))  # 6 events
        + "a,i5,5\n"  # a duplicate of the last one
        + "b,i0,1\nb,i1,2\n"  # short user (2 events < 3)
        + "c,i2,3\nc,rare,4\nc,i3,5\nc,i4,6\n"  # "rare" has 1 event < min_item_count 2
    )
    summary, out = run(tmp_path, "ds", format="csv", events=str(log), min_item_count=2, max_seq_len=4)
    assert (summary["users"], summary["items"], summary["events"]) == (2, 6, 7)
    assert summary["skipped"] == {
        "rare_item_events": 1,
        "duplicates": 1,
        "short_users": 1,
        "short_user_events": 2,
        "truncated_events": 2,
    }
    root = Path(out)
    assert sorted(p.name for p in root.iterdir()) == [
        "items.parquet",
        "manifest.json",
        "sequences",
        "users.parquet",
    ]
    assert all(p.name.startswith("part-") for p in (root / "sequences").iterdir())
    manifest = dataset.load_manifest(out)
    assert (
        manifest["counts"]["events"] == 7
        and manifest["max_seq_len"] == 4
        and manifest["kind"] == "rayrec.dataset"
    )
    items = dataset.read_items(out).to_pylist()
    assert [(r["item_id"], r["item_index"], r["count"]) for r in items] == [
        ("i0", 1, 0), ("i1", 2, 0), ("i2", 3, 2), ("i3", 4, 2), ("i4", 5, 2), ("i5", 6, 1),
    ]  # fmt: skip
    rows = by_user(out)
    assert rows["a"]["items"] == [3, 4, 5, 6] and rows["a"]["timestamps"] == [2, 3, 4, 5]
    assert (rows["a"]["train_items"], rows["a"]["valid_item"], rows["a"]["test_item"]) == ([3, 4], 5, 6)
    assert rows["c"]["items"] == [3, 4, 5] and rows["c"]["train_items"] == [3]
    assert pq.read_table(Path(out) / "users.parquet").to_pylist() == [
        {"user_index": 0, "user_id": "a"},
        {"user_index": 1, "user_id": "c"},
    ]
    assert {r["user_id"]: r["user_index"] for r in rows.values()} == {"a": 0, "c": 1}
    assert dataset.ray_dataset(out).count() == 2


def test_event_types_are_kept_per_event_and_filtered_with_a_count(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(
        "user_id,item_id,timestamp,kind,stars\n"
        "a,i1,1,view,\na,i2,2,purchase,5\na,i3,3,view,\na,i4,4,purchase,4\n"
        "b,i1,1,purchase,3\nb,i2,2,purchase,2\nb,i3,3,purchase,1\n"
    )
    columns = {"event_type": "kind", "value": "stars"}
    _, out = run(tmp_path, "all", format="csv", events=str(log), columns=columns)
    rows = by_user(out)
    assert rows["a"]["event_types"] == ["view", "purchase", "view", "purchase"]
    assert rows["a"]["values"][1] == 5.0 and rows["a"]["test_value"] == 4.0
    summary, out = run(
        tmp_path, "bought", format="csv", events=str(log), columns=columns, event_types=["purchase"]
    )
    assert summary["skipped"]["other_event_types"] == 2 and summary["events"] == 3
    assert summary["users"] == 1 and summary["skipped"]["short_users"] == 1  # a: 2 purchases < 3
    assert by_user(out)["b"]["event_types"] == ["purchase"] * 3


def test_error_policies_and_bad_rows_stop_the_run(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\na,x,1\na,x,1\na,y,2\na,z,3\nb,x,1\n")
    with pytest.raises(DataError, match=r"1 duplicate events .* e.g. user 'a'; set duplicates=drop"):
        run(tmp_path, "dup", format="csv", events=str(log), duplicates="error")
    with pytest.raises(DataError, match=r"1 users have fewer than 3 events, e.g. user 'b'"):
        run(tmp_path, "short", format="csv", events=str(log), short_users="error")
    assert (
        not (tmp_path / "dup" / "manifest.json").exists()
        and not (tmp_path / "short" / "manifest.json").exists()
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\na,x,1\na,y,later\n")
    with pytest.raises(DataError) as info:  # raised inside a Ray task, reported as the plain message
        run(tmp_path, "bad", format="csv", events=str(bad))
    assert (
        str(info.value)
        == f"{bad}: column 'timestamp': 1 row are not parseable timestamps (use integers or ISO 8601) (first at line 3: 'later')"
    )
    assert not (tmp_path / "bad" / "manifest.json").exists()
    # what a crash half way through leaves behind: shards without a manifest
    (tmp_path / "bad" / "sequences").mkdir(parents=True)
    (tmp_path / "bad" / "sequences" / "part-00000.parquet").write_bytes(b"partial")
    with pytest.raises(DataError, match="is not empty; choose a new folder or pass --overwrite"):
        run(tmp_path, "bad", format="csv", events=str(log))
    with pytest.raises(DataError, match="manifest.json is missing"):
        dataset.read_sequences(str(tmp_path / "bad"))
    summary, out = run(tmp_path, "bad", format="csv", events=str(log), overwrite=True)
    assert summary["users"] == 1 and dataset.read_sequences(out).num_rows == 1


def test_time_split_keep_policies_and_vocab_from(tmp_path: Path) -> None:
    first = tmp_path / "first.csv"
    first.write_text("user_id,item_id,timestamp\nu1,m3,10\nu1,m1,20\nu1,m2,30\nu2,m2,15\n")
    old, old_out = run(tmp_path, "old", format="csv", events=str(first), min_user_events=1)
    old_index = {r["item_id"]: r["item_index"] for r in dataset.read_items(old_out).to_pylist()}
    assert old_index == {"m1": 1, "m2": 2, "m3": 3}

    second = tmp_path / "second.csv"
    second.write_text("user_id,item_id,timestamp\nv1,m9,100\nv1,m2,200\nv1,m2,200\nv1,m4,300\nv1,m3,400\n")
    summary, out = run(
        tmp_path, "new", format="csv", events=str(second), vocab_from=old_out, duplicates="keep",
        split={"kind": "time", "valid_cutoff": 250, "test_cutoff": 400},
    )  # fmt: skip
    items = {r["item_id"]: r for r in dataset.read_items(out).to_pylist()}
    assert {k: items[k]["item_index"] for k in old_index} == old_index  # old indices exactly
    assert (items["m4"]["item_index"], items["m9"]["item_index"]) == (4, 5)  # new ones appended
    assert items["m1"]["count"] == 0 and items["m2"]["count"] == 2
    assert summary["skipped"]["duplicates_kept"] == 1 and summary["events"] == 5
    row = by_user(out)["v1"]
    assert row["items"] == [5, 2, 2, 4, 3]
    assert (row["train_items"], row["valid_item"], row["test_item"]) == ([5, 2, 2], 4, 3)
    assert dataset.load_manifest(out)["source"]["vocab_from"] == old_out


def test_synthetic_parquet_with_default_columns(tmp_path: Path) -> None:
    raw = synth(
        validate(SynthConfig, {"output": str(tmp_path / "raw"), "users": 200, "items": 100, "events": 4000})
    )
    summary, out = run(
        tmp_path, "ds", format="parquet", events=str(tmp_path / "raw" / "events.parquet"),
        items=str(tmp_path / "raw" / "items.parquet"),
    )  # fmt: skip
    assert (summary["users"], summary["events"]) == (200, raw["events"])
    raw_items = {r["item_id"]: r for r in pq.read_table(tmp_path / "raw" / "items.parquet").to_pylist()}
    for item in dataset.read_items(out).to_pylist():
        raw_item = raw_items[item["item_id"]]
        assert item["text"] == f"{raw_item['title']}. {raw_item['genres']}"


REAL = {
    "ml-100k": (
        {"format": "movielens", "events": "ml-100k/u.data", "items": "ml-100k/u.item"},
        (943, 1682, 100_000),
    ),
    "ml-1m": (
        {"format": "sequences", "events": "ml-1m/sequences.txt.gz", "items": "ml-1m/movies.dat"},
        (6040, 3706, 1_000_209),
    ),
    "ml-latest-small": (
        {
            "format": "movielens",
            "events": "ml-latest-small/ratings.csv",
            "items": "ml-latest-small/movies.csv",
        },
        (610, 9724, 100_836),
    ),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_movielens_counts(name: str, shared_data: Path, tmp_path: Path) -> None:
    settings, expected = REAL[name]
    paths = {k: str(shared_data / v) if k in ("events", "items") else v for k, v in settings.items()}
    summary, out = run(tmp_path, name, **paths)
    assert (summary["users"], summary["items"], summary["events"]) == expected
    assert summary["raw_events"] == expected[2] and not any(summary["skipped"].values())
    sequences = dataset.read_sequences(out, columns=["items", "train_items", "valid_item", "test_item"])
    assert sequences.num_rows == expected[0]
    assert sum(len(x) for x in sequences["items"].to_pylist()) == expected[2]
    items = dataset.read_items(out)
    assert items["item_index"].to_pylist() == list(range(1, expected[1] + 1))
    assert items["count"].to_numpy().sum() == expected[2] and items["text"].null_count == 0
    if name == "ml-1m":  # user 1's last line in the file is their test item, the one before validation
        with gzip.open(shared_data / "ml-1m" / "sequences.txt.gz", "rt") as f:
            user1 = [line.split()[1] for line in f if line.split()[0] == "1"]
        index = dict(zip(items["item_id"].to_pylist(), items["item_index"].to_pylist(), strict=True))
        row = by_user(out)["1"]
        assert row["items"] == [index[i] for i in user1]
        assert (row["valid_item"], row["test_item"]) == (index[user1[-2]], index[user1[-1]])
