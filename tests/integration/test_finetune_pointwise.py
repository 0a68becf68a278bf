"""Pointwise fine-tuning through the real path: a synthetic log with ratings, prepared on Ray Data with
its value column, pre-trained for next items, then fine-tuned to predict ratings on 2 Ray Train workers
(DeepSpeed ZeRO-2); exported, it predicts exactly what the run reported and beats the mean rating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rec_train.config import load_config
from rec_train.data.config import PrepareConfig
from rec_train.data.dataset import read_sequences
from rec_train.data.prepare import prepare
from rec_train.data.synth import SynthConfig, synth
from rec_train.errors import DataError
from rec_train.model import RecModel
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_pointwise
from rec_train.train.export import export
from rec_train.train.launch import launch, target_mean
from rec_train.train.run_log import read_metrics

REPO = Path(__file__).resolve().parents[2]


def train_config(data: Path, runs: Path, name: str, *overrides: str) -> TrainConfig:
    base = [
        f"data.path={data}", f"run.storage={runs}", f"run.name={name}", "model.size=tiny",
        "model.max_seq_len=50", "optim.warmup_ratio=0.0", "train.batch_size=32", "train.torch_threads=1",
        "scaling.num_workers=2", "deepspeed.zero_stage=2", "eval.ks=[10]",
    ]  # fmt: skip
    return load_config(TrainConfig, None, [*base, *overrides])


@pytest.mark.e2e
def test_rating_finetuning_beats_the_mean_and_exports_its_head(ray_shared: None, tmp_path: Path) -> None:
    synth(SynthConfig(output=str(tmp_path / "raw"), users=800, items=120, events=24_000, seed=4))
    data = tmp_path / "data"
    prepare(
        PrepareConfig.model_validate(
            {"format": "parquet", "events": str(tmp_path / "raw/events.parquet"), "output": str(data),
             "columns": {"value": "rating"}}
        )
    )  # fmt: skip
    sequences = read_sequences(str(data))
    values = pc.list_flatten(sequences["values"]).to_numpy()
    assert np.isfinite(values).all() and set(np.unique(values)) <= {1, 2, 3, 4, 5}

    runs = tmp_path / "runs"
    pretrained = launch(train_config(data, runs, "pretrain", "train.epochs=2", "optim.lr=0.005"))
    export(pretrained["checkpoint"], str(tmp_path / "pretrained"), evaluate=False)

    tuned = launch(
        train_config(
            data, runs, "rating", "train.epochs=10", "train.batch_size=16", "optim.lr=0.005",
            "finetune.task=rating", "eval.metric=rmse", "eval.patience=3", "checkpoint.every_epochs=1",
            "checkpoint.keep=1", "run.tracking=tensorboard",
        ),
        init_from=str(tmp_path / "pretrained"),
    )  # fmt: skip
    records = read_metrics(tuned["run"])
    valid_rmse = [r["valid_rmse"] for r in records if "valid_rmse" in r and not r.get("final")]
    assert len(valid_rmse) >= 2 and min(valid_rmse) < valid_rmse[0], valid_rmse
    events = list((runs / "rating" / "tensorboard").glob("events.out.tfevents.*"))  # run.tracking=tensorboard
    assert events and all(tag in events[0].read_bytes() for tag in (b"valid_rmse", b"test_rmse", b"loss"))

    # the mean training rating, predicted for every test target: the baseline to beat
    train_values = [v for row, n in zip(sequences["values"].to_pylist(), sequences["train_items"].to_pylist(),
                                        strict=True) for v in row[: len(n)]]  # fmt: skip
    test_values = np.array(sequences["test_value"].to_pylist())
    baseline = float(np.sqrt(np.mean((test_values - np.mean(train_values)) ** 2)))
    assert tuned["test_rmse"] < 0.95 * baseline, (tuned["test_rmse"], baseline)

    # exported with its head: the single-process prediction is the one the 2 workers reported
    model_dir = tmp_path / "model"
    figures = export(tuned["checkpoint"], str(model_dir))
    model = RecModel.from_pretrained(str(model_dir)).eval()
    assert model.config.pointwise_head == "rating"
    assert evaluate_pointwise(model, sequences, "test")["rmse"] == pytest.approx(tuned["test_rmse"], abs=1e-5)
    assert figures["test_rmse"] == pytest.approx(tuned["test_rmse"], abs=1e-5)

    # `rec-train evaluate` reports the head's metrics next to the ranking ones
    out = subprocess.run(
        [sys.executable, "-m", "rec_train.cli", "evaluate", "--model", str(model_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rmse"] == pytest.approx(tuned["test_rmse"], abs=1e-5) and "ndcg@10" in result


def test_a_rating_task_on_data_without_values_is_a_clear_error(ray_shared: None) -> None:
    import ray

    rows = pa.table({"values": pa.array([[float("nan")] * 3], pa.list_(pa.float32()))})
    config = load_config(
        TrainConfig, None, ["data.path=somewhere", "finetune.task=rating", "eval.metric=rmse"]
    )
    with pytest.raises(DataError, match=r"no event has a value.*columns.value=rating"):
        target_mean(ray.data.from_arrow(rows), config)
