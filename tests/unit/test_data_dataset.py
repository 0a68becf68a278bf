"""Readers of a prepared dataset: a folder without manifest.json is refused."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_train import storage
from rec_train.data import dataset
from rec_train.data.sequences import SEQUENCE_SCHEMA
from rec_train.data.vocab import ITEMS_SCHEMA
from rec_train.errors import DataError


def write_dataset(root: Path, with_manifest: bool = True) -> None:
    (root / "sequences").mkdir(parents=True)
    items = pa.table({"item_index": [1, 2], "item_id": ["a", "b"], "count": [2, 1], "title": ["A", None],
                      "text": ["A.", None]}, schema=ITEMS_SCHEMA)  # fmt: skip
    pq.write_table(items, root / "items.parquet")
    pq.write_table(
        pa.table({"user_index": pa.array([0], pa.int32()), "user_id": ["u"]}), root / "users.parquet"
    )
    rows = [{"user_index": 0, "user_id": "u", "items": [1, 2, 1], "timestamps": [1, 2, 3], "train_items": [1],
             "valid_item": 2, "test_item": 1}]  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA), root / "sequences" / "part-00000.parquet"
    )
    if with_manifest:
        manifest = {
            "schema_version": 1,
            "kind": "rayrec.dataset",
            "counts": {"users": 1, "items": 2, "events": 3},
        }
        storage.write_json(storage.resolve(root / "manifest.json"), manifest)


def test_readers_of_a_complete_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    assert dataset.load_manifest(str(tmp_path))["counts"]["events"] == 3
    assert dataset.read_items(str(tmp_path))["item_id"].to_pylist() == ["a", "b"]
    sequences = dataset.read_sequences(str(tmp_path))
    assert sequences.schema == SEQUENCE_SCHEMA
    assert sequences.to_pylist()[0]["items"] == [1, 2, 1]


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    write_dataset(tmp_path, with_manifest=False)
    for reader in (dataset.load_manifest, dataset.read_items, dataset.read_sequences):
        with pytest.raises(DataError, match="manifest.json is missing.*rec-train prepare"):
            reader(str(tmp_path))


def test_model_folder_items_are_readable_without_manifest(tmp_path: Path) -> None:
    write_dataset(tmp_path, with_manifest=False)
    (tmp_path / "rayrec.json").write_text("{}")
    assert dataset.read_items(str(tmp_path)).num_rows == 2


def test_manifest_of_another_kind_is_refused(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    storage.write_json(storage.resolve(tmp_path / "manifest.json"), {"kind": "other", "schema_version": 1})
    with pytest.raises(DataError, match="expected 'rayrec.dataset' version 1"):
        dataset.load_manifest(str(tmp_path))


def test_missing_sequence_files(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "sequences" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match="holds no parquet files"):
        dataset.read_sequences(str(tmp_path))
