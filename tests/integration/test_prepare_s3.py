"""`rec-train prepare` as a user runs it, in a subprocess, reading raw files from and writing the
dataset to S3 (moto's HTTP server on 127.0.0.1); and the errors for unreachable or missing buckets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

from rec_train import storage
from rec_train.data import dataset

REC_TRAIN = str(Path(sys.executable).parent / "rec-train")


def rec_train(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [REC_TRAIN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_prepare_from_and_to_s3(s3_bucket: str, shared_data: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for name in ("u.data", "u.item"):
        s3.upload_file(str(shared_data / "ml-100k" / name), s3_bucket, f"raw/ml-100k/{name}")
    out = f"s3://{s3_bucket}/datasets/ml-100k"
    result = rec_train(
        "prepare", "--format", "movielens", "--events", f"s3://{s3_bucket}/raw/ml-100k/u.data",
        "--items", f"s3://{s3_bucket}/raw/ml-100k/u.item", "--output", out, "--num-cpus", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["users"], summary["items"], summary["events"]) == (943, 1682, 100_000)
    assert summary["output"] == out and summary["skipped"]["duplicates"] == 0

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="datasets/")["Contents"])
    assert {
        "datasets/ml-100k/manifest.json",
        "datasets/ml-100k/items.parquet",
        "datasets/ml-100k/users.parquet",
    } <= set(keys)
    assert any(k.startswith("datasets/ml-100k/sequences/part-") for k in keys)
    assert dataset.load_manifest(out)["counts"]["users"] == 943
    sequences = dataset.read_sequences(out)
    assert sequences.num_rows == 943 and sum(len(x) for x in sequences["items"].to_pylist()) == 100_000
    assert dataset.read_items(out)["text"][0].as_py() == "Toy Story (1995). Animation, Children's, Comedy"

    # a second run into the same prefix is refused; the first dataset stays intact
    again = rec_train("prepare", "--format", "movielens", "--events", f"s3://{s3_bucket}/raw/ml-100k/u.data",
                      "--output", out)  # fmt: skip
    assert again.returncode == 2 and "is not empty; choose a new folder or pass --overwrite" in again.stderr
    assert storage.exists(storage.resolve(out + "/manifest.json"))


def test_missing_bucket_and_object(s3_bucket: str, tmp_path: Path) -> None:
    missing = rec_train("prepare", "--format", "sequences", "--events", "s3://no-such-bucket-rayrec/seq.txt",
                        "--output", str(tmp_path / "o"))  # fmt: skip
    assert missing.returncode == 2
    assert "s3://no-such-bucket-rayrec/seq.txt" in missing.stderr
    assert "rec-train prepare: error:" in missing.stderr and "Traceback" not in missing.stderr
    absent = rec_train("prepare", "--format", "sequences", "--events", f"s3://{s3_bucket}/raw/seq.txt",
                       "--output", str(tmp_path / "o"))  # fmt: skip
    assert absent.returncode == 2
    assert (
        f"events input s3://{s3_bucket}/raw/seq.txt does not exist; check the path (--events)"
        in absent.stderr
    )


def test_unreachable_endpoint(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    result = rec_train("prepare", "--format", "parquet", "--events", "s3://bucket/events.parquet",
                       "--output", str(tmp_path / "o"), env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "cannot read events input s3://bucket/events.parquet" in result.stderr
    assert "AWS_ENDPOINT_URL_S3" in result.stderr and "http://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "o").exists()
