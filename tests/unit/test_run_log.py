"""metrics.jsonl: records stamped with the time they were written; a restart drops the epochs after its
checkpoint and keeps the older lines as they were."""

from __future__ import annotations

import time
from pathlib import Path

from rec_train.train.run_log import append_metrics, read_metrics


def test_records_are_stamped_and_a_restart_drops_later_epochs(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    before = time.time()
    append_metrics(run, [{"event": "started", "epoch": 0}])
    append_metrics(run, [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(before - 0.001 <= r["time"] <= time.time() + 0.001 for r in records)  # stamps have 3 decimals
    first = records[1]["time"]

    append_metrics(run, [{"event": "resumed", "epoch": 1}], keep_through_epoch=1)
    records = read_metrics(run)
    assert [(r.get("event"), r["epoch"]) for r in records] == [("started", 0), (None, 1), ("resumed", 1)]
    assert records[1]["time"] == first and records[2]["time"] >= first
