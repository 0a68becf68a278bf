"""benchmarks/cold_start.py without training: the held-out items leave every training history, the users'
groups, and the two baselines ranked by rayrec's evaluator over the full catalogue or the cold items."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from tiny_data import write_dataset

from rec_train.data.dataset import load_manifest, read_items, read_sequences
from rec_train.errors import RayrecError
from rec_train.model.text import write_item_text_embeddings
from rec_train.train.batches import eval_batch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # cold_start.py imports quality.py beside it, as when run as a script
spec = importlib.util.spec_from_file_location("cold_start", BENCHMARKS / "cold_start.py")
assert spec is not None and spec.loader is not None
cold_start = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cold_start)

ITEMS, USERS = 40, 120


def test_cold_events_leave_every_history_but_the_last_and_leave_one_out_is_taken_again() -> None:
    schema = pa.schema(
        [("items", pa.list_(pa.int32())), ("timestamps", pa.list_(pa.int64())), ("values", pa.list_(pa.float32())),
         ("train_items", pa.list_(pa.int32())), ("valid_item", pa.int32()), ("test_item", pa.int32()),
         ("valid_value", pa.float32()), ("test_value", pa.float32())]
    )  # fmt: skip
    rows = [
        {"items": [1, 5, 2, 6, 3, 5], "timestamps": [10, 11, 12, 13, 14, 15], "values": [1, 2, 3, 4, 5, 2]},
        {"items": [5, 1, 2, 3, 4], "timestamps": [1, 2, 3, 4, 5], "values": [5, 1, 2, 3, 4]},
        {"items": [1, 5, 6, 2], "timestamps": [1, 2, 3, 4], "values": [1, 1, 1, 1]},  # 1 warm event: dropped
    ]
    for row in rows:
        items, values = row["items"], row["values"]
        row.update(train_items=items[:-2], valid_item=items[-2], test_item=items[-1], valid_value=values[-2],
                   test_value=values[-1])  # fmt: skip
    derived, dropped = cold_start.without_cold(pa.Table.from_pylist(rows, schema=schema), np.array([5, 6]))
    assert dropped == 1
    first, second = derived.to_pylist()
    assert first["items"] == [1, 2, 3, 5] and first["timestamps"] == [10, 12, 14, 15]  # the last stays
    assert first["values"] == [1, 3, 5, 2] and (first["valid_value"], first["test_value"]) == (5, 2)
    assert (first["train_items"], first["valid_item"], first["test_item"]) == ([1, 2], 3, 5)
    assert (second["train_items"], second["valid_item"], second["test_item"]) == ([1, 2], 3, 4)


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray, dict, Path]:
    """A tiny dataset with random text vectors, and its 25 % cold version."""
    work = tmp_path_factory.mktemp("cold")
    data = write_dataset(work / "data" / "tiny", items=ITEMS, step=3, seed=0, users=USERS)
    vectors = F.normalize(torch.randn(ITEMS + 1, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    write_item_text_embeddings(str(data), vectors, {"model": "random"})
    return (*cold_start.cold_dataset(str(data), 0.25, 3, work), work)


def test_the_derived_dataset_holds_cold_items_only_as_test_targets(derived: tuple) -> None:
    data, cold, summary, work = derived
    assert len(cold) == 10 and len(set(cold.tolist())) == 10 and cold.min() >= 1 and cold.max() <= ITEMS
    assert load_manifest(data)["cold_start"]["cold_items"] == 10  # a complete prepared dataset
    sequences = read_sequences(data)
    cold_set = set(cold.tolist())
    for row in sequences.to_pylist():
        assert not cold_set & {*row["train_items"], row["valid_item"]}
        assert row["items"] == [*row["train_items"], row["valid_item"], row["test_item"]]
    cold_tests = sum(t in cold_set for t in sequences["test_item"].to_pylist())
    assert summary["cold_test_users"] == cold_tests > 0
    assert summary["users"] + summary["users_dropped"] == USERS
    items = read_items(data)
    counts = dict(zip(items["item_index"].to_pylist(), items["count"].to_pylist(), strict=True))
    assert sum(counts.values()) == summary["events"]
    assert all(counts[i] == sequences["test_item"].to_pylist().count(i) for i in cold_set)
    again = cold_start.cold_dataset(str(work / "data" / "tiny"), 0.25, 3, work)  # written once, then read
    assert again[0] == data and again[1].tolist() == cold.tolist() and again[2] == summary
    with pytest.raises(RayrecError, match="--fraction 0.01 of 40 items holds out 0"):
        cold_start.draw_cold_items(ITEMS, 0.01, 0)


def test_baselines_rank_over_the_catalogue_or_the_cold_items(derived: tuple) -> None:
    data, cold, summary, _ = derived
    sequences = read_sequences(data)
    groups = cold_start.user_groups(sequences, cold, ITEMS)
    popularity = cold_start.split_popularity(sequences, "test", ITEMS)
    figures = cold_start.baselines(data, popularity, groups, [5, 10])
    cold_users = summary["cold_test_users"]
    assert figures["content"]["cold_full"]["users"] == figures["content"]["cold_only"]["users"] == cold_users
    assert figures["popularity"]["warm_full"]["users"] == summary["users"] - cold_users
    # popularity knows no cold item: over the catalogue its target ranks below every item (ties count
    # against it) but the seen ones; among the 10 cold items, all tied at 0 events, it is 10th
    assert figures["popularity"]["cold_full"]["hr@10"] == 0.0
    assert figures["popularity"]["cold_only"]["mrr"] == pytest.approx(1 / 10, abs=1e-4)
    assert (
        figures["popularity"]["cold_only"]["hr@10"] == 1.0 and figures["popularity"]["cold_only"]["hr@5"] == 0
    )
    for name in ("content", "popularity"):  # fewer candidates: no target ranks lower among the cold items
        assert figures[name]["cold_only"]["mrr"] >= figures[name]["cold_full"]["mrr"]
    # the content scores are the cosine of each item with the mean history vector
    unit = F.normalize(cold_start.read_item_text_embeddings(data)[0], dim=-1)
    unit[0] = 0.0
    batch = eval_batch(sequences.slice(0, 4), "test", 20)
    scores = cold_start.content_scores(unit)(batch)
    user = 3
    history = [i for i in batch.input_ids[user].tolist() if i]
    expected = F.cosine_similarity(unit[history].mean(dim=0, keepdim=True), unit[1:])
    assert torch.allclose(scores[user, 1:], expected, atol=1e-5)
    low = cold_start.among(
        cold_start.content_scores(unit), torch.tensor([False, True] + [False] * (ITEMS - 1))
    )
    masked = low(batch)
    assert torch.equal(masked[:, 1], scores[:, 1]) and bool(
        (masked[:, 2:] == torch.finfo(torch.float32).min).all()
    )
    assert math.isfinite(masked.min().item())
    assert json.dumps(figures)  # one JSON line's worth
