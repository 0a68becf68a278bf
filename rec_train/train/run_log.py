"""A run's `metrics.jsonl`: one JSON object per line (started/resumed events, epochs, the final test).

Rank 0 of the training workers writes it; `rec-train plot`, `launch` and the benchmarks read it."""

from __future__ import annotations

import json
import time
from typing import Any

from rec_train import storage

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (epochs, resume events, the final test metrics)."""
    loc = storage.resolve(run_uri).join(METRICS_FILE)
    if not storage.exists(loc):
        return []
    return [json.loads(line) for line in storage.read_text(loc).splitlines() if line.strip()]


def append_metrics(
    run_uri: str, records: list[dict[str, Any]], keep_through_epoch: int | None = None
) -> None:
    """Append lines to the run's metrics.jsonl, each stamped with the time it was written (`time`, Unix
    seconds); `keep_through_epoch` first drops lines of later epochs (trained before a failure, then
    trained again from the checkpoint)."""
    kept = read_metrics(run_uri)
    if keep_through_epoch is not None:
        kept = [r for r in kept if r.get("epoch", 0) <= keep_through_epoch]
    now = round(time.time(), 3)
    lines = [json.dumps(r, sort_keys=True) for r in [*kept, *({**r, "time": now} for r in records)]]
    storage.write_text(storage.resolve(run_uri).join(METRICS_FILE), "\n".join(lines) + "\n")
