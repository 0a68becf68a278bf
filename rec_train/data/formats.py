"""Raw formats -> canonical events and item tables, with validation that names file, column and rows.

Canonical events have the columns `user_id` (string), `item_id` (string), `timestamp` (int64,
the source's unit; the order index where the source has no time), `value` (float64, nullable:
rating or weight), `event_type` (string, nullable: view, click, purchase, ...) and `order` (int64:
the position in the input, a tie-breaker for equal times).

Readers for events stream one file (or a range of parquet row groups) at a time so that Ray Data
can run them as tasks; item tables are small and are read whole on the driver.

MovieLens files are recognised by name: `*.dat` is `ratings.dat` (`user::item::rating::time`),
`*.csv` is `ratings.csv` (header `userId,movieId,rating,timestamp`), anything else is `u.data`
(tab-separated `user item rating time`). Item tables: `movies.dat`, `u.item`, `movies.csv`; a `.csv`
item table next to `sequences` is a generic one (`item_columns`), e.g. `item_id,title`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rec_train import storage
from rec_train.data.config import CsvOptions, ItemColumns, PrepareConfig
from rec_train.errors import DataError

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("value", pa.float64()),
        ("event_type", pa.string()),
        ("order", pa.int64()),
    ]
)
ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("text", pa.string())])

# The 19 genre flags of ML-100K's u.item, in file order (as listed in u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
FILE_ORDER_SHIFT = 40  # order = file_index << 40 | row: files keep their order, rows theirs
ROWS_PER_TASK = 2_000_000  # parquet row groups are read in tasks of about this many rows
TEXT_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class EventSource:
    """How to read one events file: layout and which columns hold user, item, time and value."""

    kind: str  # "text" or "parquet"
    user: str
    item: str
    timestamp: str | None
    value: str | None
    integer_ids: bool
    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | None = None  # for text without a header
    quoting: bool = True
    encoding: str = "utf8"
    event_type: str | None = None


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a file, or some row groups of a parquet file."""

    uri: str
    file_index: int
    source: EventSource
    row_groups: tuple[int, ...] | None = None
    first_row: int = 0


def event_source(config: PrepareConfig, uri: str) -> EventSource:
    """The layout of an events file, from the format and (for MovieLens) the file name."""
    name = posixpath.basename(uri.rstrip("/")).lower().removesuffix(".gz")
    integer_ids = config.ids_are_integers
    if config.format == "movielens":
        if name.endswith(".dat"):  # user::item::rating::time, split on ':' with empty columns between
            names = ("user", "_1", "item", "_2", "value", "_3", "timestamp")
            return EventSource(
                "text", "user", "item", "timestamp", "value", integer_ids, ":", False, names, False
            )
        if name.endswith(".csv"):
            return EventSource("text", "userId", "movieId", "timestamp", "rating", integer_ids)
        names = ("user", "item", "value", "timestamp")
        return EventSource(
            "text", "user", "item", "timestamp", "value", integer_ids, "\t", False, names, False
        )
    if config.format == "sequences":
        return EventSource(
            "text", "user", "item", None, None, integer_ids, " ", False, ("user", "item"), False
        )
    cols = config.columns
    if config.format == "csv":
        return EventSource(
            "text", cols.user, cols.item, cols.timestamp, cols.value, integer_ids,
            config.csv.delimiter, config.csv.header, event_type=cols.event_type,
        )  # fmt: skip
    return EventSource(
        "parquet", cols.user, cols.item, cols.timestamp, cols.value, integer_ids, event_type=cols.event_type
    )


def _input_files(uri: str, what: str) -> list[str]:
    """The files behind a file or folder URI (hidden and `_`-prefixed names skipped)."""
    try:
        loc = storage.resolve(uri)
        info = storage.file_info(loc)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{what} {uri} does not exist; check the path (--{what.split()[0]})")
        if info.type == pafs.FileType.File:
            return [loc.uri]
        paths = storage.list_files(loc)
    except storage.StorageError as exc:
        raise DataError(f"cannot read {what} {uri}: {exc}") from exc
    prefix = "s3://" if loc.is_s3 else ""
    files = [prefix + p for p in paths if not posixpath.basename(p).startswith((".", "_"))]
    if not files:
        raise DataError(f"{what} folder {uri} holds no files")
    return files


def plan_reads(config: PrepareConfig) -> list[ReadTask]:
    """Read tasks for the events input; checks that every file exists before any work starts."""
    tasks = []
    for file_index, uri in enumerate(_input_files(config.events, "events input")):
        source = event_source(config, uri)
        if source.kind != "parquet":
            tasks.append(ReadTask(uri, file_index, source))
            continue
        loc = storage.resolve(uri)
        try:
            with loc.fs.open_input_file(loc.path) as f:
                meta = pq.read_metadata(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{uri}: not a readable parquet file: {exc}") from exc
        group, first_row = [], 0
        for i in range(meta.num_row_groups):
            group.append(i)
            rows = sum(meta.row_group(g).num_rows for g in group)
            if rows >= ROWS_PER_TASK or i == meta.num_row_groups - 1:
                tasks.append(ReadTask(uri, file_index, source, tuple(group), first_row))
                group, first_row = [], first_row + rows
        if meta.num_row_groups == 0:
            tasks.append(ReadTask(uri, file_index, source, (), 0))
    return tasks


@dataclass
class Problems:
    """Bad rows found while reading one file: per (column, reason) a count, first row and value."""

    uri: str
    found: dict[tuple[str, str], list] = field(default_factory=dict)

    def add(self, column: str, reason: str, bad: np.ndarray, rows: np.ndarray, values: pa.Array) -> None:
        n = int(bad.sum())
        if n == 0:
            return
        first = int(np.flatnonzero(bad)[0])
        entry = self.found.setdefault((column, reason), [0, int(rows[first]), values[first].as_py()])
        entry[0] += n

    def raise_if_any(self, line_word: str) -> None:
        if not self.found:
            return
        parts = [
            f"column {column!r}: {count} row{'s' if count != 1 else ''} {reason}"
            f" (first at {line_word} {row}: {example!r})"
            for (column, reason), (count, row, example) in self.found.items()
        ]
        raise DataError(f"{self.uri}: " + "; ".join(parts))


_INT_PATTERN = r"^[+-]?\d+$"


def _clean_strings(col: pa.Array) -> pa.Array:
    """Strings with surrounding whitespace removed and empty strings as null."""
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)


def canonical_ids(col: pa.Array, name: str, integer: bool, problems: Problems, rows: np.ndarray) -> pa.Array:
    """Ids as strings; nulls and (when `integer`) non-integers are recorded as problems (-> null)."""
    not_int = np.zeros(len(col), dtype=bool)
    if pa.types.is_integer(col.type):
        out = col.cast(pa.string())
    elif pa.types.is_floating(col.type) and integer:
        values = col.to_numpy(zero_copy_only=False)
        integral = np.isfinite(values) & (np.floor(values) == values)
        not_int = ~integral & ~np.isnan(values)
        out = pa.array(np.where(integral, values, 0).astype(np.int64), mask=~integral).cast(pa.string())
    else:
        out = _clean_strings(col)
        if integer:
            ok = pc.match_substring_regex(out, _INT_PATTERN)
            not_int = pc.invert(pc.fill_null(ok, True)).to_numpy(zero_copy_only=False)
            ints = pc.cast(pc.if_else(ok, out, pa.scalar(None, pa.string())), pa.int64())
            out = pc.cast(ints, pa.string())  # "007" -> "7", as in the other files
    problems.add(name, "are not integers", not_int, rows, col)
    null = pc.is_null(out).to_numpy(zero_copy_only=False) & ~not_int
    problems.add(name, "are null or empty", null, rows, col)
    return out


def canonical_timestamps(col: pa.Array, name: str, problems: Problems, rows: np.ndarray) -> pa.Array:
    """int64 times: integers as they are, floats floored, dates and ISO strings as Unix seconds."""
    if pa.types.is_integer(col.type):
        out = col.cast(pa.int64())
    elif pa.types.is_floating(col.type):
        out = pc.cast(pc.floor(col), pa.int64(), safe=False)
        out = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.int64()), out)
    elif pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        out = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
    else:
        text = _clean_strings(col)
        is_int = pc.fill_null(pc.match_substring_regex(text, _INT_PATTERN), False)
        ints = pc.cast(pc.if_else(is_int, text, pa.scalar(None, pa.string())), pa.int64())
        other = pc.if_else(is_int, pa.scalar(None, pa.string()), text).to_pandas()
        parsed = pd.to_datetime(other, errors="coerce", utc=True, format="ISO8601")
        seconds = pa.array(parsed.dt.as_unit("s").astype("int64"), mask=parsed.isna().to_numpy())
        unparsed = other.notna().to_numpy() & parsed.isna().to_numpy()
        problems.add(name, "are not parseable timestamps (use integers or ISO 8601)", unparsed, rows, col)
        out = pc.coalesce(ints, seconds)
        null = pc.is_null(text).to_numpy(zero_copy_only=False)
        problems.add(name, "are null or empty", null, rows, col)
        return out
    problems.add(name, "are null", pc.is_null(out).to_numpy(zero_copy_only=False), rows, col)
    return out


def canonical_values(col: pa.Array, name: str, problems: Problems, rows: np.ndarray) -> pa.Array:
    """float64 values; text that is not a number is a problem, an empty cell is null."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return col.cast(pa.float64())
    text = _clean_strings(col).to_pandas()
    numbers = pd.to_numeric(text, errors="coerce")
    problems.add(name, "are not numbers", (text.notna() & numbers.isna()).to_numpy(), rows, col)
    return pa.array(numbers.to_numpy(dtype=np.float64), mask=numbers.isna().to_numpy())


def canonicalize(table: pa.Table, task: ReadTask, row0: int, problems: Problems) -> pa.Table:
    """A raw batch -> canonical events (rows with problems removed; they are reported at the end)."""
    src = task.source
    rows = np.arange(row0, row0 + table.num_rows, dtype=np.int64)  # 0-based row in the file
    report_rows = rows + 1 + (1 if src.kind == "text" and src.header else 0)
    order = pa.array((np.int64(task.file_index) << FILE_ORDER_SHIFT) + rows)
    user = canonical_ids(table[src.user].combine_chunks(), src.user, src.integer_ids, problems, report_rows)
    item = canonical_ids(table[src.item].combine_chunks(), src.item, src.integer_ids, problems, report_rows)
    if src.timestamp is None:
        ts = order
    else:
        ts = canonical_timestamps(table[src.timestamp].combine_chunks(), src.timestamp, problems, report_rows)
    if src.value is None:
        value = pa.nulls(table.num_rows, pa.float64())
    else:
        value = canonical_values(table[src.value].combine_chunks(), src.value, problems, report_rows)
    if src.event_type is None:
        event_type = pa.nulls(table.num_rows, pa.string())
    else:
        event_type = pc.cast(table[src.event_type].combine_chunks(), pa.string())
        event_type = pc.if_else(
            pc.equal(event_type, ""), pa.scalar(None, pa.string()), event_type
        )  # empty: none
    out = pa.Table.from_arrays([user, item, ts, value, event_type, order], schema=EVENT_SCHEMA)
    ok = pc.and_(pc.and_(pc.is_valid(user), pc.is_valid(item)), pc.is_valid(ts))
    return out.filter(ok)


def _check_columns(uri: str, names: list[str], wanted: dict[str, str | None], key_prefix: str) -> None:
    for key, column in wanted.items():
        if column is not None and column not in names:
            raise DataError(
                f"{uri}: missing column {column!r} (columns found: {', '.join(names) or 'none'});"
                f" set {key_prefix}.{key} to the column that holds it"
            )


def _raw_batches(task: ReadTask) -> Iterator[pa.Table]:
    """Raw record batches of one task, only the columns canonicalize needs."""
    src = task.source
    loc = storage.resolve(task.uri)
    wanted = {
        "user": src.user, "item": src.item, "timestamp": src.timestamp, "value": src.value,
        "event_type": src.event_type,
    }  # fmt: skip
    needed = [c for c in wanted.values() if c is not None]
    if src.kind == "parquet":
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            _check_columns(task.uri, pf.schema_arrow.names, wanted, "columns")
            for batch in pf.iter_batches(
                batch_size=256_000, row_groups=list(task.row_groups or []), columns=needed
            ):
                yield pa.Table.from_batches([batch])
        return
    read_options = pacsv.ReadOptions(
        block_size=TEXT_BLOCK_BYTES,
        column_names=list(src.column_names) if src.column_names else None,
        autogenerate_column_names=not src.header and not src.column_names,
        encoding=src.encoding,
    )
    parse_options = pacsv.ParseOptions(delimiter=src.delimiter, quote_char='"' if src.quoting else False)
    with loc.fs.open_input_stream(loc.path, compression="detect") as stream:
        try:
            convert_options = pacsv.ConvertOptions(column_types={c: pa.string() for c in needed})
            reader = pacsv.open_csv(
                stream,
                read_options=read_options,
                parse_options=parse_options,
                convert_options=convert_options,
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return
            raise DataError(f"{task.uri}: cannot parse: {exc}") from exc
        _check_columns(task.uri, reader.schema.names, wanted, "columns")
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                raise DataError(f"{task.uri}: cannot parse: {exc}") from exc
            yield pa.Table.from_batches([batch]).select(needed)


def read_events(task: ReadTask) -> Iterator[pa.Table]:
    """Canonical event batches of one read task; raises `DataError` at the end if any row was bad."""
    problems = Problems(task.uri)
    row = task.first_row
    try:
        for raw in _raw_batches(task):
            out = canonicalize(raw, task, row, problems)
            row += raw.num_rows
            if out.num_rows:
                yield out
    except FileNotFoundError as exc:
        raise DataError(f"{task.uri} does not exist") from exc
    except OSError as exc:
        raise DataError(f"cannot read {task.uri}: {exc}") from exc
    problems.raise_if_any("line" if task.source.kind == "text" else "row")
    if row == task.first_row:
        raise DataError(
            f"{task.uri}: no events (the file is empty); point --events at the file with the data"
        )


# ---------------------------------------------------------------------------------------------
# Item tables (read whole, on the driver)


def _genres_text(genres: str | None) -> str | None:
    if not genres or genres == "(no genres listed)":
        return None
    return ", ".join(g for g in genres.split("|") if g)


def _item_text(title: str | None, genres: str | None) -> str | None:
    parts = [p for p in (title, genres) if p]
    return ". ".join(parts) if parts else None


def _read_text_lines(loc: storage.Location, encoding: str) -> list[str]:
    try:
        with loc.fs.open_input_stream(loc.path, compression="detect") as f:
            return f.read().decode(encoding).splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"items file {loc.uri} does not exist; check the path (--items)") from exc
    except OSError as exc:
        raise DataError(f"cannot read items file {loc.uri}: {exc}") from exc


def _movielens_items(loc: storage.Location) -> tuple[list[str], list[str | None], list[str | None]]:
    """(ids, titles, genre texts) from movies.dat, u.item or movies.csv."""
    name = posixpath.basename(loc.path).lower().removesuffix(".gz")
    if name.endswith(".csv"):
        table = _read_table(loc, ",", True)
        wanted = {"item": "movieId", "title": "title", "text": "genres"}
        _check_columns(loc.uri, table.column_names, wanted, "item_columns")
        genres = [_genres_text(g) for g in table["genres"].to_pylist()]
        return [str(v) for v in table["movieId"].to_pylist()], table["title"].to_pylist(), genres
    ids, titles, genres = [], [], []
    for n, line in enumerate(_read_text_lines(loc, "latin-1"), start=1):
        if not line.strip():
            continue
        if name.endswith(".dat"):
            fields = line.split("::")
            if len(fields) != 3:
                raise DataError(
                    f"{loc.uri}: line {n} has {len(fields)} '::' fields, expected 3 (id::title::genres)"
                )
            ids.append(fields[0])
            titles.append(fields[1].strip() or None)
            genres.append(_genres_text(fields[2].strip()))
        else:  # u.item: id|title|release date|video release date|url|19 genre flags
            fields = line.split("|")
            if len(fields) != 5 + len(ML100K_GENRES):
                raise DataError(
                    f"{loc.uri}: line {n} has {len(fields)} '|' fields, expected 24 (u.item layout)"
                )
            flags = [g for g, flag in zip(ML100K_GENRES, fields[5:], strict=True) if flag.strip() == "1"]
            ids.append(fields[0])
            titles.append(fields[1].strip() or None)
            genres.append(", ".join(g for g in flags if g != "unknown") or None)
    return ids, titles, genres


def _read_table(
    loc: storage.Location, delimiter: str, header: bool, string_columns: tuple[str, ...] = ()
) -> pa.Table:
    """A parquet or delimited-text table; `string_columns` of a text file stay text ("0123" keeps its 0)."""
    try:
        if loc.path.endswith(".parquet"):
            with loc.fs.open_input_file(loc.path) as f:
                return pq.read_table(f)
        with loc.fs.open_input_stream(loc.path, compression="detect") as f:
            return pacsv.read_csv(
                f,
                read_options=pacsv.ReadOptions(autogenerate_column_names=not header),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(string_columns, pa.string())),
            )
    except FileNotFoundError as exc:
        raise DataError(f"items file {loc.uri} does not exist; check the path (--items)") from exc
    except pa.ArrowInvalid as exc:
        raise DataError(f"items file {loc.uri}: cannot parse: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read items file {loc.uri}: {exc}") from exc


def read_item_table(config: PrepareConfig) -> pa.Table:
    """The item table named by `config.items` -> `item_id`, `title`, `text` (one row per item)."""
    assert config.items is not None
    is_csv = posixpath.basename(config.items).lower().removesuffix(".gz").endswith(".csv")
    movielens = config.format == "movielens" or (config.format == "sequences" and not is_csv)
    return read_item_file(config.items, config.item_columns, config.csv, config.ids_are_integers, movielens)


def read_item_file(
    uri: str, cols: ItemColumns, csv: CsvOptions, integer_ids: bool, movielens: bool = False
) -> pa.Table:
    """An item file (parquet, CSV, or with `movielens` movies.dat / u.item / movies.csv) -> `item_id`,
    `title`, `text` (one row per item): its id, title and text columns named by `cols`."""
    try:
        loc = storage.resolve(uri)
        if not storage.is_file(loc):
            raise DataError(f"items file {uri} does not exist; check the path (--items)")
    except storage.StorageError as exc:
        raise DataError(f"cannot read items file {uri}: {exc}") from exc
    if movielens and not loc.path.endswith(".parquet"):  # movies.dat, u.item, movies.csv
        ids, titles, genres = _movielens_items(loc)
        raw_ids: pa.Array = pa.array(ids, pa.string())
        title_col = pa.array(titles, pa.string())
        text_col = pa.array([_item_text(t, g) for t, g in zip(titles, genres, strict=True)], pa.string())
        id_name = "movieId"
    else:
        table = _read_table(loc, csv.delimiter, csv.header, (cols.item,))
        wanted = {"item": cols.item, "title": cols.title} | {f"text[{i}]": c for i, c in enumerate(cols.text)}
        _check_columns(loc.uri, table.column_names, wanted, "item_columns")
        raw_ids = table[cols.item].combine_chunks()
        id_name = cols.item
        title_col = (
            _clean_strings(table[cols.title].combine_chunks())
            if cols.title
            else pa.nulls(len(table), pa.string())
        )
        parts = [_clean_strings(table[c].combine_chunks()).to_pylist() for c in cols.text]
        texts = (
            [". ".join(p for p in row if p) or None for row in zip(*parts, strict=True)] if parts else None
        )
        text_col = pa.array(texts if texts is not None else [None] * len(table), pa.string())
    problems = Problems(loc.uri)
    ids = canonical_ids(raw_ids, id_name, integer_ids, problems, np.arange(1, len(raw_ids) + 1))
    problems.raise_if_any("row")
    items = pa.Table.from_arrays([ids, title_col, text_col], schema=ITEM_SCHEMA)
    counts = pc.value_counts(items["item_id"]).flatten()
    repeated = pc.filter(counts[0], pc.greater(counts[1], 1))
    if len(repeated):
        raise DataError(
            f"items file {loc.uri}: {len(repeated)} item ids appear more than once in column {id_name!r}"
            f" (first: {repeated[0].as_py()!r}); keep one row per item"
        )
    return items
