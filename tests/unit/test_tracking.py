"""Experiment tracking: the config as MLflow params, each epoch's figures as metrics (a local MLflow file
store), and TensorBoard scalars read back from the event file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rec_train.config import load_config
from rec_train.train.config import TrainConfig
from rec_train.train.tracking import flat_params, numeric, start_tracking

EPOCHS = [
    {"epoch": 1, "loss": 5.0, "train_s": 2.0, "early_stopped": True, "note": "x"},
    {"epoch": 2, "loss": 4.0, "valid_ndcg@10": 0.25, "valid_coverage@10": 0.5},
]


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.path=somewhere", "train.epochs=2", *overrides])


def test_names_numbers_and_params() -> None:
    assert numeric(EPOCHS[1]) == {
        "epoch": 2.0,
        "loss": 4.0,
        "valid_ndcg_at_10": 0.25,
        "valid_coverage_at_10": 0.5,
    }
    assert "early_stopped" not in numeric(EPOCHS[0]) and "note" not in numeric(EPOCHS[0])
    params = flat_params(config("model.overrides.hidden_size=32").model_dump(mode="json"))
    assert params["train.epochs"] == 2 and params["model.overrides.hidden_size"] == 32
    assert params["data.path"] == "somewhere" and not any(isinstance(v, dict) and v for v in params.values())


def test_no_tracker_unless_asked_and_only_on_rank_zero(tmp_path: Path) -> None:
    assert start_tracking(config(), str(tmp_path), "run", 0) is None
    assert start_tracking(config("run.tracking=tensorboard"), str(tmp_path), "run", 1) is None


def test_mlflow_file_store_gets_params_and_every_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the file store by name
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = config("run.tracking=mlflow", f"run.tracking_uri={uri}", "run.experiment=unit")
    tracker = start_tracking(cfg, str(tmp_path / "runs/r1"), "r1", 0)
    for record in EPOCHS:
        tracker.log(record, record["epoch"])
    tracker.close()

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["data.path"] == "somewhere"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 5.0),
        (2, 4.0),
    ]
    assert run.data.metrics["valid_ndcg_at_10"] == 0.25


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files under `logdir`: tag -> [(step, value)]."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    return out


def test_tensorboard_scalars_land_in_the_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r2"
    tracker = start_tracking(config("run.tracking=tensorboard"), str(run), "r2", 0)
    for record in EPOCHS:
        tracker.log(record, record["epoch"])
    tracker.close()
    found = scalars(run / "tensorboard")
    assert found["loss"] == [(1, 5.0), (2, 4.0)] and found["valid_ndcg_at_10"] == [(2, 0.25)]
