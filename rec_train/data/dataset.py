"""Readers for a prepared dataset (the layout in docs/formats.md), for training and serving.

A folder is a dataset only once `manifest.json` is there (prepare writes it last), so a run that
failed half way is refused instead of being read as if it were complete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from rec_train import storage
from rec_train.errors import DataError
from rec_train.exported import ITEMS_FILE, is_model_folder

if TYPE_CHECKING:
    import ray.data

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
KIND = "rayrec.dataset"


def load_manifest(uri: str) -> dict[str, Any]:
    """The dataset's manifest; `DataError` when the folder is not a complete prepared dataset."""
    loc = storage.resolve(uri)
    manifest = loc.join(MANIFEST)
    if not storage.exists(manifest):
        raise DataError(
            f"{loc.uri} is not a prepared dataset: {MANIFEST} is missing (the prepare run did not finish,"
            f" or the path is wrong); run `rec-train prepare ... --output {loc.uri}`"
        )
    data = storage.read_json(manifest)
    if data.get("kind") != KIND or data.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{manifest.uri}: kind {data.get('kind')!r}, schema_version {data.get('schema_version')!r};"
            f" expected {KIND!r} version {SCHEMA_VERSION}: prepare the data again with this rayrec"
        )
    return data


def _read_parquet(loc: storage.Location, columns: list[str] | None = None) -> pa.Table:
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError as exc:
        raise DataError(f"{loc.uri} is missing from the dataset") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read {loc.uri}: {exc}") from exc


def read_items(uri: str) -> pa.Table:
    """`items.parquet` of a prepared dataset or an exported model folder (item_index 1..n)."""
    loc = storage.resolve(uri)
    if not is_model_folder(loc):
        load_manifest(uri)
    return _read_parquet(loc.join(ITEMS_FILE))


def sequence_files(uri: str) -> list[str]:
    """Paths (inside the filesystem) of `sequences/*.parquet`, sorted."""
    load_manifest(uri)
    loc = storage.resolve(uri).join("sequences")
    files = [p for p in storage.list_files(loc) if p.endswith(".parquet")]
    if not files:
        raise DataError(f"{loc.uri} holds no parquet files; prepare the dataset again")
    return files


def read_sequences(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All users' rows of `sequences/*.parquet` in one table (small and medium datasets)."""
    loc = storage.resolve(uri)
    tables = [_read_parquet(storage.Location(loc.fs, p, p), columns) for p in sequence_files(uri)]
    return pa.concat_tables(tables)


def ray_dataset(uri: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """The sequences as a Ray Dataset (streamed from local disk or S3), one row per user."""
    import ray.data

    files = sequence_files(uri)
    loc = storage.resolve(uri)
    return ray.data.read_parquet(files, filesystem=loc.fs, columns=columns)
