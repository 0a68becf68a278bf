"""Events per second of `rec-train prepare` (Ray Data) against a single-process pandas version of the
same steps, on MovieLens-1M and on a synthetic log (20 million events by default).

    python benchmarks/prepare_throughput.py [--events 20000000] [--num-cpus 2] [--skip-synthetic]

Both sides read the raw file, validate ids and times, build the item vocabulary, order each user's
events by time, drop duplicates, build leave-one-out sequences and write parquet. Ray is started
before the clock starts. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rec_train.config import validate
from rec_train.data import dataset
from rec_train.data.config import PrepareConfig
from rec_train.data.prepare import prepare
from rec_train.data.sequences import SEQUENCE_SCHEMA
from rec_train.data.synth import SynthConfig, synth
from rec_train.data.vocab import natural_order
from rec_train.ray_session import ray_session

REPO = Path(__file__).resolve().parents[1]


def pandas_prepare(fmt: str, events: str, out: Path) -> dict[str, int]:
    """The same steps as `prepare` (leave-one-out, duplicates dropped) in one pandas process."""
    if fmt == "sequences":
        df = pd.read_csv(events, sep=" ", header=None, names=["user_id", "item_id"], dtype=str)
        df["timestamp"] = np.arange(len(df), dtype=np.int64)
        df["value"] = np.nan
    else:
        df = pd.read_parquet(events, columns=["user_id", "item_id", "timestamp"])
        df["value"] = np.nan  # the synthetic log has no ratings
    bad = df[["user_id", "item_id", "timestamp"]].isna().sum()
    if bad.any():
        raise ValueError(f"{events}: null values {bad.to_dict()}")
    if fmt == "sequences" and not df["item_id"].str.fullmatch(r"\d+").all():
        raise ValueError(f"{events}: non-integer item ids")
    df["order"] = np.arange(len(df), dtype=np.int64)

    counts = df["item_id"].value_counts()
    ids = pa.array(counts.index.astype(str))
    vocab = ids.take(natural_order(ids)).to_pandas()
    index = pd.Index(vocab)
    df["item_index"] = (index.get_indexer(df["item_id"]) + 1).astype(np.int32)

    df = df.sort_values(["user_id", "timestamp", "order"], kind="stable")
    df = df[~df.duplicated(["user_id", "item_index", "timestamp"])]
    users, starts = np.unique(df["user_id"].to_numpy(), return_index=True)
    offsets = np.append(starts, len(df)).astype(np.int32)
    items = pa.ListArray.from_arrays(pa.array(offsets), pa.array(df["item_index"].to_numpy()))
    times = pa.ListArray.from_arrays(pa.array(offsets), pa.array(df["timestamp"].to_numpy()))
    values = df["value"].to_numpy(np.float32)
    lengths = np.diff(offsets)
    flat = df["item_index"].to_numpy()
    train_ends = offsets[:-1] + np.maximum(lengths - 2, 0)
    train_values = np.concatenate([flat[s:e] for s, e in zip(offsets[:-1], train_ends, strict=True)])
    train_offsets = np.concatenate([[0], np.cumsum(train_ends - offsets[:-1])]).astype(np.int32)
    sequences = pa.Table.from_arrays(
        [
            pa.array(np.arange(len(users), dtype=np.int32)),
            pa.array(users.astype(str)),
            items,
            times,
            pa.ListArray.from_arrays(pa.array(train_offsets), pa.array(train_values, pa.int32())),
            pa.array(np.where(lengths >= 2, flat[offsets[1:] - 2], 0).astype(np.int32)),
            pa.array(flat[offsets[1:] - 1].astype(np.int32)),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            pa.array(np.where(lengths >= 2, values[offsets[1:] - 2], np.nan).astype(np.float32)),
            pa.array(values[offsets[1:] - 1]),
            pa.ListArray.from_arrays(pa.array(offsets), pa.nulls(len(df), pa.string())),  # no event types
        ],
        schema=SEQUENCE_SCHEMA,
    )
    out.mkdir(parents=True)
    (out / "sequences").mkdir()
    pq.write_table(sequences, out / "sequences" / "part-00000.parquet")
    item_counts = np.bincount(flat, minlength=len(vocab) + 1)[1:]
    pq.write_table(pa.table({"item_index": np.arange(1, len(vocab) + 1, dtype=np.int32), "item_id": vocab,
                             "count": item_counts}), out / "items.parquet")  # fmt: skip
    pq.write_table(pa.table({"user_index": np.arange(len(users), dtype=np.int32), "user_id": users.astype(str)}),
                   out / "users.parquet")  # fmt: skip
    return {"users": len(users), "items": len(vocab), "events": int(lengths.sum())}


def measure(name: str, fmt: str, events: str, raw_events: int, work: Path) -> dict:
    cfg = validate(PrepareConfig, {"format": fmt, "events": events, "output": str(work / f"{name}-rayrec")})
    started = time.perf_counter()
    summary = prepare(cfg)
    ray_s = time.perf_counter() - started
    assert dataset.load_manifest(cfg.output)["counts"]["events"] == summary["events"]

    started = time.perf_counter()
    baseline = pandas_prepare(fmt, events, work / f"{name}-pandas")
    pandas_s = time.perf_counter() - started
    same = all(baseline[k] == summary[k] for k in ("users", "items", "events"))
    if not same:
        raise AssertionError(f"{name}: rayrec {summary} and pandas {baseline} disagree")
    return {
        "events": raw_events,
        "users": summary["users"],
        "items": summary["items"],
        "rayrec_s": round(ray_s, 1),
        "rayrec_events_per_s": round(raw_events / ray_s),
        "pandas_s": round(pandas_s, 1),
        "pandas_events_per_s": round(raw_events / pandas_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml1m", default=str(REPO.parent / "shared" / "data" / "ml-1m" / "sequences.txt.gz"))
    parser.add_argument("--events", type=int, default=20_000_000, help="size of the synthetic log")
    parser.add_argument("--users", type=int, default=0, help="synthetic users (default: events / 100)")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayrec-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "benchmark": "prepare_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "ray_num_cpus": args.num_cpus,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 1),  # the machine may be shared
    }
    try:
        with ray_session(args.num_cpus):
            result["ml1m"] = measure("ml1m", "sequences", args.ml1m, 1_000_209, work)
            if not args.skip_synthetic:
                users = args.users or max(1, args.events // 100)
                cfg = validate(SynthConfig, {"output": str(work / "synth"), "users": users, "items": args.items,
                                             "events": args.events})  # fmt: skip
                raw = synth(cfg)
                result["synthetic"] = measure(
                    "synthetic", "parquet", str(work / "synth" / "events.parquet"), raw["events"], work
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
