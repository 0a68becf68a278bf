"""`rec-train prepare`: raw events (+ item table) -> a validated sequence dataset, on Ray Data.

    rec-train prepare --format movielens --events ../shared/data/ml-100k/u.data \
        --items ../shared/data/ml-100k/u.item --output runs/data/ml-100k
    rec-train prepare --config configs/data/ml-1m.yaml max_seq_len=200

Steps: read and validate the events (one Ray task per file or parquet row-group range, streamed
from local disk or S3) -> count events per item -> item vocabulary (minimum count, optionally
extending an earlier vocabulary) -> group by user bucket (a hash of the user id, many whole users a
group) -> chronological sequences, duplicates, short users, truncation and split targets -> user
vocabulary -> parquet shards, items.parquet, users.parquet and, last, manifest.json. The last line
printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rec_train import storage
from rec_train.config import apply_overrides, read_yaml, validate
from rec_train.data import dataset, formats
from rec_train.data.config import PrepareConfig
from rec_train.data.sequences import SEQUENCE_SCHEMA, SequenceOptions, build_sequences
from rec_train.data.vocab import USERS_SCHEMA, Indexer, build_item_vocab, build_user_vocab
from rec_train.errors import DataError
from rec_train.ray_session import ray_session

if TYPE_CHECKING:
    import ray.data

EVENTS_PER_PARTITION = 2_000_000
BUCKETS_PER_PARTITION = 8  # user buckets (groups of whole users) per hash partition


def _user_error(exc: BaseException) -> DataError | None:
    """The `DataError` a Ray task raised, however Ray wrapped it (cause chain, RayTaskError)."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError) and not isinstance(e, RayError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


class PartFiles:
    """`sequences/part-00000.parquet`, ... (one name per Ray write task)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"

    def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)


# --- Ray Data stage functions (run on workers) ----------------------------------------------------


def _read_tasks(batch: dict[str, np.ndarray], tasks: list[formats.ReadTask]) -> Iterator[pa.Table]:
    for i in batch["task"]:
        yield from formats.read_events(tasks[int(i)])


def _keep_min_value(events: pa.Table, min_value: float) -> pa.Table:
    return events.filter(pc.fill_null(pc.greater_equal(events["value"], min_value), False))


def _keep_event_types(events: pa.Table, event_types: list[str]) -> pa.Table:
    return events.filter(pc.fill_null(pc.is_in(events["event_type"], pa.array(event_types)), False))


def _count_items(events: pa.Table) -> pa.Table:
    """Events per item in one block (summed over blocks on the driver)."""
    counts = pc.value_counts(events["item_id"]).flatten()
    return pa.table({"item_id": counts[0], "count": pc.cast(counts[1], pa.int64())})


def _index_items(events: pa.Table, item_ids: pa.Array, item_index: np.ndarray, buckets: int) -> pa.Table:
    """item_id -> item_index (-1 for items below the minimum count, counted per user later), and the
    user's bucket: a stable hash of `user_id`, so that one group holds many whole users."""
    index = Indexer(item_ids, item_index)(events["item_id"])
    user_ids = events["user_id"].to_numpy(zero_copy_only=False)
    hashes = pd.util.hash_array(user_ids)  # uint64, the same in every process
    return pa.table(
        {
            "user_bucket": pa.array((hashes % np.uint64(buckets)).astype(np.int32)),
            "user_id": events["user_id"],
            "item_index": index,
            "timestamp": events["timestamp"],
            "order": events["order"],
            "value": events["value"],
            "event_type": events["event_type"],
        }
    )


def _with_user_index(rows: pa.Table, user_ids: pa.Array) -> pa.Table:
    index = Indexer(user_ids, np.arange(len(user_ids)))(rows["user_id"])
    rows = rows.append_column("user_index", pa.array(index, pa.int32()))
    return rows.select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA)


def _item_counts(rows: pa.Table, num_items: int) -> pa.Table:
    flat = pc.list_flatten(rows["items"]).to_numpy()
    counts = np.bincount(flat, minlength=num_items + 1).astype(np.int64)
    return pa.table({"counts": pa.array([counts], pa.list_(pa.int64()))})


def _collect(ds: ray.data.Dataset) -> pa.Table:
    """A (small) dataset's rows on the driver as one table."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


# --- the pipeline ----------------------------------------------------------------------------------


def _shuffle_partitions(num_events: int) -> int:
    """Hash partitions for the group-bys: one per CPU of the cluster, more for large inputs."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return int(np.clip(max(cpus, -(-num_events // EVENTS_PER_PARTITION)), 1, 512))


def _check_output(config: PrepareConfig) -> storage.Location:
    out = storage.resolve(config.output)
    if storage.exists(out):
        if storage.is_file(out):
            raise DataError(f"--output {out.uri} is a file; give a folder")
        if storage.list_files(out):
            if not config.overwrite:
                raise DataError(
                    f"--output {out.uri} is not empty; choose a new folder or pass --overwrite to replace it"
                )
            manifest = out.join(dataset.MANIFEST)
            if storage.exists(manifest):  # first make the old dataset unreadable, then remove it
                out.fs.delete_file(manifest.path)
            storage.delete_dir(out)
    return out


def _write_table(loc: storage.Location, table: pa.Table) -> None:
    try:
        if not loc.is_s3:
            loc.fs.create_dir(os.path.dirname(loc.path), recursive=True)
        with loc.fs.open_output_stream(loc.path) as f:
            pq.write_table(table, f)
    except OSError as exc:
        raise DataError(f"cannot write {loc.uri}: {exc}") from exc


def _sequence_options(config: PrepareConfig) -> SequenceOptions:
    return SequenceOptions(
        max_seq_len=config.max_seq_len,
        split=config.split.kind,
        valid_cutoff=config.split.valid_cutoff,
        test_cutoff=config.split.test_cutoff,
        min_user_events=config.min_user_events,
        drop_duplicates=config.duplicates == "drop",
    )


def _run(
    config: PrepareConfig,
    out: storage.Location,
    tasks: list[formats.ReadTask],
    item_table: pa.Table | None,
    old_items: pa.Table | None,
) -> dict[str, Any]:
    import ray.data
    from ray.data import SaveMode

    ray.data.DataContext.get_current().enable_progress_bars = False
    skipped: dict[str, int] = {}

    # 1. read + validate, one task per file (or parquet row-group range)
    events = ray.data.from_items([{"task": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
    events = events.map_batches(_read_tasks, fn_kwargs={"tasks": tasks}, batch_size=1, batch_format="numpy")
    events = events.materialize()
    raw_events = events.count()
    if raw_events == 0:
        raise DataError(f"{config.events}: no events found; check --events and --format")
    if config.min_value is not None:
        events = events.map_batches(
            _keep_min_value, fn_kwargs={"min_value": config.min_value}, batch_format="pyarrow"
        ).materialize()
        skipped["below_min_value"] = raw_events - events.count()
    if config.event_types is not None:
        before = events.count()
        events = events.map_batches(
            _keep_event_types, fn_kwargs={"event_types": config.event_types}, batch_format="pyarrow"
        ).materialize()
        skipped["other_event_types"] = before - events.count()

    # 2. item vocabulary from the events per item
    partitions = _shuffle_partitions(raw_events)
    partial = _collect(events.map_batches(_count_items, batch_format="pyarrow"))
    counts = partial.group_by("item_id").aggregate([("count", "sum")]).rename_columns(["item_id", "count"])
    items, skipped["rare_item_events"] = build_item_vocab(
        counts, item_table, config.min_item_count, old_items
    )

    # 3. per-user sequences and splits
    indexed = events.map_batches(
        _index_items,
        fn_kwargs={
            "item_ids": items["item_id"].combine_chunks(),
            "item_index": items["item_index"].to_numpy(),
            "buckets": partitions * BUCKETS_PER_PARTITION,
        },
        batch_format="pyarrow",
    )
    rows = indexed.groupby("user_bucket", num_partitions=partitions).map_groups(
        build_sequences, fn_kwargs={"options": _sequence_options(config)}, batch_format="pyarrow"
    )
    rows = rows.materialize()
    stats = _collect(rows.select_columns(["user_id", "n_events", "n_duplicates", "n_truncated", "short"]))

    duplicates = int(pc.sum(stats["n_duplicates"]).as_py() or 0)
    if duplicates and config.duplicates == "error":
        first = pc.filter(stats["user_id"], pc.greater(stats["n_duplicates"], 0))[0].as_py()
        raise DataError(
            f"{config.events}: {duplicates} duplicate events (same user, item and timestamp), e.g. user {first!r};"
            " set duplicates=drop to skip them or duplicates=keep to keep them"
        )
    skipped["duplicates" if config.duplicates == "drop" else "duplicates_kept"] = duplicates
    short = stats["short"]
    n_short = int(pc.sum(short).as_py() or 0)
    if n_short and config.short_users == "error":
        first = pc.filter(stats["user_id"], short)[0].as_py()
        raise DataError(
            f"{config.events}: {n_short} users have fewer than {config.min_user_events} events, e.g. user"
            f" {first!r}; set short_users=drop or keep, or lower min_user_events"
        )
    if config.short_users == "drop":
        skipped["short_users"] = n_short
        skipped["short_user_events"] = int(pc.sum(pc.filter(stats["n_events"], short)).as_py() or 0)
        kept = pc.invert(short)
    else:
        kept = pc.greater(stats["n_events"], 0)  # a user whose every event was dropped has nothing to keep
        skipped["users_without_events"] = len(kept) - int(pc.sum(kept).as_py() or 0)
    skipped["truncated_events"] = int(pc.sum(pc.filter(stats["n_truncated"], kept)).as_py() or 0)
    users = build_user_vocab(pc.filter(stats["user_id"], kept))
    if users.num_rows == 0:
        raise DataError(
            f"{config.events}: no user is left after the filters ({json.dumps(skipped)});"
            " lower min_user_events or min_item_count"
        )

    # 4. write: sequences, items with their final counts, users, and the manifest last
    sequences = (
        rows.filter(expr="short == False")
        if config.short_users == "drop"
        else rows.filter(expr="n_events > 0")
    )
    sequences = sequences.map_batches(
        _with_user_index, fn_kwargs={"user_ids": users["user_id"].combine_chunks()}, batch_format="pyarrow"
    ).materialize()
    num_items = int(pc.max(items["item_index"]).as_py() or 0)
    per_block = sequences.map_batches(
        _item_counts, fn_kwargs={"num_items": num_items}, batch_format="pyarrow"
    )
    item_counts = np.sum([c.values.to_numpy() for c in _collect(per_block)["counts"]], axis=0)
    final_counts = pa.array(item_counts[items["item_index"].to_numpy()], pa.int64())
    items = items.set_column(items.schema.get_field_index("count"), "count", final_counts)
    sequences.write_parquet(
        out.join("sequences").path,
        filesystem=out.fs,
        filename_provider=PartFiles(),
        min_rows_per_file=config.rows_per_file,
        schema=SEQUENCE_SCHEMA,
        mode=SaveMode.OVERWRITE,  # a fresh folder: file names need no write id
    )
    _write_table(out.join("items.parquet"), items)
    _write_table(out.join("users.parquet"), users.cast(USERS_SCHEMA))
    counts_out = {
        "users": users.num_rows,
        "items": items.num_rows,
        "events": int(item_counts.sum()),
        "raw_events": raw_events,
        "skipped": skipped,
    }
    manifest = {
        "schema_version": dataset.SCHEMA_VERSION,
        "kind": dataset.KIND,
        "counts": counts_out,
        "max_seq_len": config.max_seq_len,
        "split": config.split.model_dump(),
        "source": {
            "format": config.format,
            "events": config.events,
            "items": config.items,
            "vocab_from": config.vocab_from,
        },  # fmt: skip
        "config": config.model_dump(mode="json"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(out.join(dataset.MANIFEST), manifest)
    return counts_out


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare a dataset; returns the summary (`users`, `items`, `events`, `skipped`, `output`, ...)."""
    started = time.perf_counter()
    # everything that can be checked without Ray first, so bad input fails in seconds
    tasks = formats.plan_reads(config)
    item_table = formats.read_item_table(config) if config.items else None
    old_items = dataset.read_items(config.vocab_from) if config.vocab_from else None
    out = _check_output(config)
    with ray_session(config.num_cpus):
        try:
            counts = _run(config, out, tasks, item_table, old_items)
        except Exception as exc:
            error = _user_error(exc)
            if error is None or error is exc:
                raise
            # our one-line message, without Ray's task traceback or the retry advice it appends
            raise DataError(str(error).splitlines()[0]) from None
    return {**counts, "output": out.uri, "seconds": round(time.perf_counter() - started, 2)}


# --- CLI ------------------------------------------------------------------------------------------

FLAGS = {  # flag dest -> config key
    "format": "format",
    "events": "events",
    "items": "items",
    "output": "output",
    "vocab_from": "vocab_from",
    "max_seq_len": "max_seq_len",
    "num_cpus": "num_cpus",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML under configs/data/ (flags and key=value override it)")
    parser.add_argument("--format", choices=["movielens", "sequences", "parquet", "csv"])
    parser.add_argument("--events", help="events file or folder: local path, file:// or s3://")
    parser.add_argument("--items", help="item table (titles, genres, text)")
    parser.add_argument("--output", help="dataset folder to create: local path or s3://")
    parser.add_argument("--vocab-from", help="earlier dataset or exported model whose item indices to keep")
    parser.add_argument("--max-seq-len", type=int, help="keep the most recent N events per user")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this command starts")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. split.kind=time"
    )


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    data = read_yaml(args.config) if args.config else {}
    data = apply_overrides(data, list(args.overrides))
    for dest, key in FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            data[key] = value
    if args.overwrite:
        data["overwrite"] = True
    return validate(PrepareConfig, data, source=args.config or "prepare arguments")


def run(args: argparse.Namespace) -> int:
    summary = prepare(config_from_args(args))
    print(json.dumps(summary), flush=True)
    return 0
