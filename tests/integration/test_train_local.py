"""One small pre-training run on the session's shared local Ray: 2 Ray Train workers with DeepSpeed ZeRO-1
(CPU, gloo), local storage, tracked in a local MLflow file store. The run reports every epoch and the final
test (to metrics.jsonl and MLflow alike), keeps its newest checkpoint, starts no Ray worker process after its
first epoch (the cached rows are read once), and the exported model, scored in one process, gives exactly the
figures the 2 workers all-reduced. A run whose encoder starts from a pretrained checkpoint (`model.backbone`).
Failures, S3, ZeRO-2/3, resume and fine-tuning: tests/integration/test_train.py (make test-e2e)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
import ray
import torch
from tiny_data import write_dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rec_train.config import ConfigError, load_config
from rec_train.data.dataset import read_sequences
from rec_train.model import RecModel
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_model
from rec_train.train.export import export
from rec_train.train.launch import launch
from rec_train.train.run_log import read_metrics


def worker_processes_started_after(when: float) -> list[str]:
    """The log files of the Ray worker processes of this session that started after `when` (Unix s)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    started = []
    for log in logs.glob("python-core-worker-*.log"):
        with log.open() as f:  # each begins "[YYYY-MM-DD HH:MM:SS,mmm I pid tid] core_worker_process.cc..."
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", f.readline())
        if stamp and datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() > when:
            started.append(log.name)
    return started


def test_two_workers_train_checkpoint_and_export_what_they_reported(
    ray_shared: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # forwarded to the workers, as every MLFLOW_* is
    mlruns = f"file://{tmp_path / 'mlruns'}"
    data = write_dataset(tmp_path / "data", items=60, step=1, seed=0)
    config = load_config(
        TrainConfig, None,
        [f"data.path={data}", f"run.storage={tmp_path / 'runs'}", "run.name=local", "model.size=tiny",
         "optim.lr=0.01", "optim.warmup_ratio=0.0", "train.batch_size=32", "train.epochs=3", "eval.ks=[10]",
         "deepspeed.zero_stage=1", "scaling.num_workers=2", "checkpoint.every_epochs=1", "checkpoint.keep=1",
         "run.tracking=mlflow", f"run.tracking_uri={mlruns}"],
    )  # fmt: skip
    result = launch(config, show_progress=False)

    records = read_metrics(result["run"])
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2, 3]
    assert result["trainable_parameters"] == result["parameters"] > 0 and records[0]["event"] == "started"
    # train.cpu_heap=auto under ZeRO-1: the workers started with KEEP_ENV
    assert records[0]["cpu_heap"] == "keep"
    assert losses[-1] < losses[0]
    # data.cache: later epochs iterate the rows already in the object store, so no Ray Data task (and no
    # worker process for one) starts after the first epoch; with data.cache=false about 40 would here
    epoch_one = next(r["time"] for r in records if r.get("epoch") == 1 and "loss" in r)
    assert worker_processes_started_after(epoch_one) == []
    assert result["test_ndcg@10"] > 0.3  # the walk is learnable: popularity alone is near 10/60 * 0.5
    checkpoints = [p.name for p in (tmp_path / "runs" / "local").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1 and result["checkpoint"].endswith(checkpoints[0])

    client = MlflowClient(mlruns)
    (run,) = client.search_runs([client.get_experiment_by_name("rayrec").experiment_id])
    assert run.info.run_name == "local" and run.data.params["deepspeed.zero_stage"] == "1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == pytest.approx(losses)
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(result["test_ndcg@10"])

    figures = export(result["checkpoint"], str(tmp_path / "model"))
    model = RecModel.from_pretrained(str(tmp_path / "model")).eval()
    single = evaluate_model(model, read_sequences(str(data)), "test", [10])
    assert single == {k.removeprefix("test_"): v for k, v in result.items() if k.startswith("test_")}
    assert figures["test_ndcg@10"] == result["test_ndcg@10"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_run_starts_from_a_pretrained_backbone(
    ray_shared: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """`model.backbone`: both workers start the encoder from the checkpoint (ZeRO-2; a Llama, and a GPT-2 with
    its learned positions); with a vanishing learning rate the exported encoder is still the checkpoint's.
    The data, runs and backbone are given as paths relative to the command's directory (the workers run in
    another one)."""
    torch.manual_seed(0)
    if family == "llama":
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
            )
        )  # fmt: skip
    else:
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    lm.save_pretrained(tmp_path / family)
    data = write_dataset(tmp_path / "data", items=60, step=1, seed=0, users=64)
    monkeypatch.chdir(tmp_path)
    config = load_config(
        TrainConfig, None,
        [f"data.path={data.name}", "run.storage=runs", "run.name=backbone", "model.size=tiny",
         f"model.backbone={family}", "optim.lr=1e-12", "optim.warmup_ratio=0.0", "train.epochs=1",
         "train.batch_size=32", "eval.ks=[10]", "deepspeed.zero_stage=2", "scaling.num_workers=2"],
    )  # fmt: skip
    result = launch(config, show_progress=False)
    export(result["checkpoint"], str(tmp_path / "model"), evaluate=False)

    model = RecModel.from_pretrained(str(tmp_path / "model"))
    assert model.config.backbone_source == str(tmp_path / family) and model.config.backbone_hidden_size == 32
    assert model.config.encoder == family
    if family == "llama":
        source = LlamaForCausalLM.from_pretrained(tmp_path / family).model.state_dict()
    else:  # GPT-2's blocks are h.N, its positions wpe
        gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / family).transformer.state_dict()
        source = {re.sub(r"^h\.", "layers.", k): v for k, v in gpt2.items()}
        positions = model.encoder.position_embeddings.weight
        torch.testing.assert_close(positions, gpt2["wpe.weight"][: positions.shape[0]], atol=1e-6, rtol=0)
    for name, value in model.encoder.state_dict().items():
        if name.startswith("layers."):
            torch.testing.assert_close(value, source[name], atol=1e-6, rtol=0)


def test_a_model_too_large_for_the_workers_is_refused_before_training(
    ray_shared: None, tmp_path: Path
) -> None:
    """1.2 billion parameters under ZeRO stage 0 need 19.7 GB of states per worker: refused before any data
    is read or worker started, with the estimate and what would fit."""
    data = write_dataset(tmp_path / "data", items=60, step=1, seed=0, users=16)
    config = load_config(
        TrainConfig, None,
        [f"data.path={data}", f"run.storage={tmp_path / 'runs'}", "model.size=large",
         "model.overrides={num_hidden_layers: 96}", "scaling.num_workers=2", "deepspeed.zero_stage=0"],
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"needs at least 19\.\d GB per worker .* ZeRO stage 0 on 2 workers"
    ):
        launch(config, show_progress=False)
    assert not (tmp_path / "runs").exists()
