"""Raw formats -> canonical events and item tables; every validation error names file, column, rows."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_train.data import formats
from rec_train.data.config import PrepareConfig
from rec_train.errors import DataError


def config(fmt: str, events: Path, items: Path | None = None, **extra) -> PrepareConfig:
    return PrepareConfig.model_validate(
        {
            "format": fmt,
            "events": str(events),
            "items": str(items) if items else None,
            "output": "unused",
            **extra,
        }
    )


def read_all(cfg: PrepareConfig) -> pa.Table:
    tables = [t for task in formats.plan_reads(cfg) for t in formats.read_events(task)]
    return pa.concat_tables(tables)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_movielens_ratings_dat(tmp_path: Path) -> None:
    events = write(
        tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    table = read_all(config("movielens", events))
    assert table.schema == formats.EVENT_SCHEMA
    assert table["user_id"].to_pylist() == ["1", "1", "2"]
    assert table["item_id"].to_pylist() == ["1193", "661", "1193"]
    assert table["timestamp"].to_pylist() == [978300760, 978302109, 978298413]
    assert table["value"].to_pylist() == [5.0, 3.0, 4.0]


def test_movielens_u_data_tab_separated(tmp_path: Path) -> None:
    events = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    table = read_all(config("movielens", events))
    assert table["user_id"].to_pylist() == ["196", "186"]
    assert table["timestamp"].to_pylist() == [881250949, 891717742]


def test_movielens_ratings_csv_with_header(tmp_path: Path) -> None:
    events = write(
        tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
    )
    table = read_all(config("movielens", events))
    assert table["item_id"].to_pylist() == ["1", "3"]
    assert table["value"].to_pylist() == [4.0, 4.5]


def test_sequences_gz_use_line_order_as_time(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt.gz"
    path.write_bytes(gzip.compress(b"1 3186\n1 1721\n2 5\n2 007\n"))
    table = read_all(config("sequences", path, integer_ids=True))
    assert table["user_id"].to_pylist() == ["1", "1", "2", "2"]
    assert table["item_id"].to_pylist() == ["3186", "1721", "5", "7"]  # "007" normalised like other ids
    assert table["timestamp"].to_pylist() == [0, 1, 2, 3]
    assert table["value"].null_count == 4


def test_generic_csv_with_configured_columns_and_iso_times(tmp_path: Path) -> None:
    events = write(
        tmp_path / "log.csv", "who;what;when\nalice;book-1;2024-01-02T03:04:05Z\nbob;book-2;1700000000\n"
    )
    cfg = config(
        "csv", events, columns={"user": "who", "item": "what", "timestamp": "when"}, csv={"delimiter": ";"}
    )
    table = read_all(cfg)
    assert table["user_id"].to_pylist() == ["alice", "bob"]
    assert table["timestamp"].to_pylist() == [1704164645, 1700000000]


def test_generic_parquet_folder_with_timestamp_type(tmp_path: Path) -> None:
    folder = tmp_path / "events"
    folder.mkdir()
    times = pa.array([0, 60], pa.timestamp("ms"))
    pq.write_table(
        pa.table({"user_id": [10, 11], "item_id": ["a", "b"], "timestamp": times}), folder / "p0.parquet"
    )
    pq.write_table(pa.table({"user_id": [12], "item_id": ["c"], "timestamp": pa.array([120_000], pa.timestamp("ms"))}),
                   folder / "p1.parquet")  # fmt: skip
    (folder / "_SUCCESS").write_text("")
    table = read_all(config("parquet", folder))
    assert table["user_id"].to_pylist() == ["10", "11", "12"]
    assert table["timestamp"].to_pylist() == [0, 0, 120]
    assert table["order"].to_pylist()[2] == 1 << formats.FILE_ORDER_SHIFT  # second file sorts after the first


def test_item_tables_of_every_movielens_layout(tmp_path: Path) -> None:
    dat = write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat: Cut (1995)::Action\n",
                "latin-1")  # fmt: skip
    flags = ["0"] * 19
    flags[1] = flags[15] = "1"
    uitem = write(
        tmp_path / "u.item", "1|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n", "latin-1"
    )
    csv = write(
        tmp_path / "movies.csv", 'movieId,title,genres\n1,"Toy Story, The (1995)",(no genres listed)\n'
    )
    events = write(tmp_path / "u.data", "1\t1\t5\t1\n")

    items = formats.read_item_table(config("movielens", events, dat))
    assert items.to_pylist()[1] == {
        "item_id": "2",
        "title": "Heat: Cut (1995)",
        "text": "Heat: Cut (1995). Action",
    }
    assert items["text"][0].as_py() == "Toy Story (1995). Animation, Children's, Comedy"
    assert formats.read_item_table(config("movielens", events, uitem))["text"].to_pylist() == [
        "GoldenEye (1995). Action, Sci-Fi"
    ]
    assert formats.read_item_table(config("movielens", events, csv))["text"].to_pylist() == [
        "Toy Story, The (1995)"
    ]
    seq = write(tmp_path / "seq.txt", "1 1\n")
    assert formats.read_item_table(config("sequences", seq, dat))["item_id"].to_pylist() == ["1", "2"]


def test_csv_item_table_of_sequences_reads_item_columns(tmp_path: Path) -> None:
    """Amazon Beauty's items.csv: string ids (all-digit ASINs keep their leading zero), title as text."""
    items = write(tmp_path / "items.csv", 'item_id,title\n0123456789,"Gel, 1oz"\nB004756YJA,\n')
    events = write(tmp_path / "seq.txt", "u1 0123456789\n")
    cfg = config("sequences", events, items, item_columns={"text": ["title"]})
    assert formats.read_item_table(cfg).to_pylist() == [
        {"item_id": "0123456789", "title": "Gel, 1oz", "text": "Gel, 1oz"},
        {"item_id": "B004756YJA", "title": None, "text": None},
    ]
    with pytest.raises(DataError, match=r"missing column 'genres'.*item_columns\.text\[1\]"):
        formats.read_item_table(config("sequences", events, items))  # default text: [title, genres]


def test_generic_item_table_joins_text_columns(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["Alpha", None], "genres": ["X", "Y"]}), path)
    items = formats.read_item_table(config("parquet", tmp_path / "e.parquet", path))
    assert items.to_pylist() == [
        {"item_id": "a", "title": "Alpha", "text": "Alpha. X"},
        {"item_id": "b", "title": None, "text": "Y"},
    ]


# --- validation errors ---------------------------------------------------------------------------


def error_of(cfg: PrepareConfig) -> str:
    with pytest.raises(DataError) as info:
        read_all(cfg)
    return str(info.value)


def test_missing_column_names_file_and_key(tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,item,timestamp\n1,2,3\n")
    msg = error_of(config("csv", events))
    assert str(events) in msg and "missing column 'item_id'" in msg and "columns.item" in msg
    assert "user_id, item, timestamp" in msg


def test_null_ids_are_counted_with_first_line(tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,a,3\n,b,4\n2,,5\n ,c,6\n")
    msg = error_of(config("csv", events))
    assert "column 'user_id': 2 rows are null or empty (first at line 3" in msg
    assert "column 'item_id': 1 row are null or empty (first at line 4" in msg


def test_non_integer_ids_where_integers_are_expected(tmp_path: Path) -> None:
    events = write(tmp_path / "u.data", "1\t2\t5\t100\nx\t3\t4\t101\n2\t4.5\t4\t102\n3\tzz\t1\t103\n")
    msg = error_of(config("movielens", events))
    assert str(events) in msg
    assert "column 'user': 1 row are not integers (first at line 2: 'x')" in msg
    assert "column 'item': 2 rows are not integers (first at line 3: '4.5')" in msg


def test_non_integer_float_ids_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"user_id": [1.0, 2.5], "item_id": [1, 2], "timestamp": [1, 2]}), path)
    msg = error_of(config("parquet", path, integer_ids=True))
    assert "column 'user_id': 1 row are not integers (first at row 2: 2.5)" in msg


def test_unparseable_timestamps(tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,a,yesterday\n1,b,2024-13-45\n1,c,5\n")
    msg = error_of(config("csv", events))
    assert "column 'timestamp': 2 rows are not parseable timestamps" in msg and "'yesterday'" in msg


def test_values_that_are_not_numbers(tmp_path: Path) -> None:
    events = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,good,5\n")
    assert "column 'rating': 1 row are not numbers" in error_of(config("movielens", events))


def test_empty_file(tmp_path: Path) -> None:
    events = write(tmp_path / "u.data", "")
    assert f"{events}: no events (the file is empty)" in error_of(config("movielens", events))


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"events input .*nope\.csv does not exist"):
        formats.plan_reads(config("csv", tmp_path / "nope.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        formats.plan_reads(config("csv", tmp_path / "empty"))
    with pytest.raises(DataError, match=r"items file .*movies\.dat does not exist"):
        formats.read_item_table(config("movielens", tmp_path / "u.data", tmp_path / "movies.dat"))


def test_malformed_lines(tmp_path: Path) -> None:
    events = write(tmp_path / "seq.txt", "1 2\n1 2 3\n")
    assert "cannot parse" in error_of(config("sequences", events))
    movies = write(tmp_path / "movies.dat", "1::Title\n")
    with pytest.raises(DataError, match=r"line 1 has 2 '::' fields, expected 3"):
        formats.read_item_table(config("movielens", events, movies))


def test_duplicate_item_rows_in_item_table(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    write(path, "item_id,title,genres\na,A,x\na,A2,y\n")
    with pytest.raises(
        DataError, match=r"1 item ids appear more than once in column 'item_id' \(first: 'a'\)"
    ):
        formats.read_item_table(config("csv", path, path))


def test_missing_text_column_of_item_table(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "item_id,title\na,A\n")
    with pytest.raises(DataError, match=r"missing column 'genres'.*item_columns\.text\[1\]"):
        formats.read_item_table(config("csv", path, path))


def test_event_type_column_is_read_and_required_when_named(tmp_path: Path) -> None:
    events = write(
        tmp_path / "log.csv", "user_id,item_id,timestamp,kind\nu1,a,1,view\nu1,b,2,purchase\nu2,a,3,\n"
    )
    table = read_all(config("csv", events, columns={"event_type": "kind"}))
    assert table.schema == formats.EVENT_SCHEMA
    assert table["event_type"].to_pylist() == ["view", "purchase", None]
    assert read_all(config("csv", events))["event_type"].null_count == 3
    with pytest.raises(DataError, match=r"missing column 'type'.*set columns.event_type"):
        read_all(config("csv", events, columns={"event_type": "type"}))


def test_event_types_filter_needs_the_column() -> None:
    with pytest.raises(ValueError, match="event_types needs the column"):
        PrepareConfig.model_validate(
            {"format": "movielens", "events": "x", "output": "y", "event_types": ["view"]}
        )
    with pytest.raises(ValueError, match="event_types is empty"):
        PrepareConfig.model_validate(
            {"format": "csv", "events": "x", "output": "y", "columns": {"event_type": "k"}, "event_types": []}
        )
