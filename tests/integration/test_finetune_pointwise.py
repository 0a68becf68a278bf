"""Fine-tuning through the real path: a synthetic log with ratings, prepared on Ray Data with its value
column and pre-trained for next items (once, for the module); then fine-tuned to predict ratings on 2 Ray
Train workers (DeepSpeed ZeRO-2), which exported predicts exactly what the run reported and beats the mean
rating; and LoRA adapters trained under ZeRO-2 (next items) and ZeRO-3 (ratings, with a new head), where
only the adapters (and the head) change and the model exported with peft's own merge scores exactly what
the workers reported for the run's best checkpoint (the lowest RMSE of the two kept)."""

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
from safetensors.torch import load_file

from rec_train.config import load_config
from rec_train.data.config import PrepareConfig
from rec_train.data.dataset import read_sequences
from rec_train.data.prepare import prepare
from rec_train.data.synth import SynthConfig, synth
from rec_train.errors import DataError
from rec_train.model import RecModel
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_model, evaluate_pointwise
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


@pytest.fixture(scope="module")
def pretrained(ray_shared: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared data with ratings, an exported next-item model pre-trained on it)."""
    root = tmp_path_factory.mktemp("finetune")
    synth(SynthConfig(output=str(root / "raw"), users=800, items=120, events=24_000, seed=4))
    prepare(
        PrepareConfig.model_validate(
            {"format": "parquet", "events": str(root / "raw/events.parquet"), "output": str(root / "data"),
             "columns": {"value": "rating"}}
        )
    )  # fmt: skip
    result = launch(
        train_config(root / "data", root / "runs", "pretrain", "train.epochs=2", "optim.lr=0.005")
    )
    export(result["checkpoint"], str(root / "pretrained"), evaluate=False)
    return root / "data", root / "pretrained"


@pytest.mark.e2e
def test_rating_finetuning_beats_the_mean_and_exports_its_head(
    pretrained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, base = pretrained
    sequences = read_sequences(str(data))
    values = pc.list_flatten(sequences["values"]).to_numpy()
    assert np.isfinite(values).all() and set(np.unique(values)) <= {1, 2, 3, 4, 5}

    runs = tmp_path / "runs"
    tuned = launch(
        train_config(
            data, runs, "rating", "train.epochs=10", "train.batch_size=16", "optim.lr=0.005",
            "finetune.task=rating", "eval.metric=rmse", "eval.patience=3", "checkpoint.every_epochs=1",
            "checkpoint.keep=1", "run.tracking=tensorboard",
        ),
        init_from=str(base),
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


@pytest.mark.e2e
@pytest.mark.parametrize(("stage", "task"), [(2, "next_item"), (3, "rating")])
def test_lora_finetuning_exports_what_the_workers_scored(
    pretrained: tuple[Path, Path], tmp_path: Path, stage: int, task: str
) -> None:
    data, base = pretrained
    extra = ["eval.metric=rmse", f"finetune.task={task}"] if task == "rating" else []
    tuned = launch(
        train_config(
            data, tmp_path / "runs", f"lora-zero{stage}", "train.epochs=2", f"deepspeed.zero_stage={stage}",
            "optim.lr=0.005",
            "checkpoint.every_epochs=1", "checkpoint.keep=2", "finetune.lora_rank=4", "finetune.lora_alpha=8",
            *extra,
        ),
        init_from=str(base),
        show_progress=False,
    )  # fmt: skip
    assert 0 < tuned["trainable_parameters"] < tuned["parameters"] / 2  # the adapters (and a new head)
    figures = export(tuned["checkpoint"], str(tmp_path / "model"))
    model = RecModel.from_pretrained(str(tmp_path / "model")).eval()
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not [k for k in weights if "lora_" in k or "original_module" in k or "modules_to_save" in k]

    before = load_file(str(base / "model.safetensors"))
    changed = [k for k in before if not before[k].equal(weights[k])]
    assert changed and all(".layers." in k for k in changed), changed  # the adapters, merged into the blocks
    sequences = read_sequences(str(data))
    if task == "rating":
        assert model.config.pointwise_head == "rating"
        single = evaluate_pointwise(model, sequences, "test")["rmse"]
        assert (
            single == pytest.approx(tuned["test_rmse"], abs=1e-5)
            and figures["test_rmse"] == tuned["test_rmse"]
        )
    else:
        single = evaluate_model(model, sequences, "test", [10])
        assert single["ndcg@10"] == pytest.approx(tuned["test_ndcg@10"], abs=1e-9)
