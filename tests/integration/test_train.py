"""Training on a real local Ray with real DeepSpeed (CPU, gloo) and moto's S3 over HTTP.

One Ray cluster for the module; four small runs (a tiny model, 200 users):
- 2 workers ZeRO-2, data and checkpoints in S3, one worker killed after the first checkpoint: the run
  resumes from it, trains no epoch twice, leaves only the checkpoints it keeps; export to S3 and the
  single-process metrics of the exported model equal the all-reduced ones of the 2 workers;
- 2 workers ZeRO-3: export consolidates the shards, scores as the engine did; the same run name
  resumes a finished run to train one more epoch;
- continued pre-training from that model on data with new items (known rows kept exactly);
- fine-tuning on a shifted domain beats the pre-trained model there.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tiny_data import write_dataset

from rec_train import storage
from rec_train.config import load_config
from rec_train.data.dataset import read_sequences
from rec_train.model import RecModel
from rec_train.train.config import TrainConfig
from rec_train.train.evaluate import evaluate_model
from rec_train.train.export import export
from rec_train.train.launch import launch
from rec_train.train.model_init import build_model
from rec_train.train.run_log import read_metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(s3_server: str) -> Iterator[dict[str, str]]:
    """AWS variables pointing at moto, a bucket, and a local Ray (4 logical CPUs: 2 workers + data tasks)."""
    import boto3
    import ray

    env = {
        "AWS_ENDPOINT_URL_S3": s3_server, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-it")
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            yield {"bucket": "s3://train-it", **env}
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def domain_a(work: Path) -> Path:
    return write_dataset(work / "domain_a", items=60, step=1, seed=0)


def config(data: str, storage_uri: str, name: str, *overrides: str) -> TrainConfig:
    base = [
        f"data.path={data}", f"run.storage={storage_uri}", f"run.name={name}", "model.size=tiny",
        "optim.lr=0.01", "optim.warmup_ratio=0.0", "train.batch_size=32", "eval.ks=[10,50]",
        "data.shuffle_buffer=64",
    ]  # fmt: skip
    return load_config(TrainConfig, None, [*base, *overrides])


def kill_a_worker_after_first_checkpoint(run_uri: str, killed: list[int]) -> None:
    """Once the first checkpoint is registered (Ray Train's checkpoint manager snapshot lists it, and rank 0
    recorded its epoch), SIGKILL one Ray Train worker: a `ray::RayTrainWorker` process under this test."""
    import psutil

    snapshot = storage.resolve(run_uri).join("checkpoint_manager_snapshot.json")
    deadline = time.time() + 1800
    while time.time() < deadline and not (epochs_trained(run_uri) and storage.exists(snapshot)):
        time.sleep(0.5)
    while time.time() < deadline and not killed:
        for proc in psutil.Process().children(recursive=True):
            if proc.cmdline()[:1] == ["ray::RayTrainWorker"]:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.5)


def epochs_trained(run_uri: str) -> list[int]:
    try:
        return [r["epoch"] for r in read_metrics(run_uri) if "loss" in r]
    except storage.StorageError:  # the run folder is being written
        return []


def test_zero2_s3_resume_after_killed_worker_and_export_round_trip(
    cluster: dict, domain_a: Path, work: Path
) -> None:
    bucket = cluster["bucket"]
    data = f"{bucket}/data/domain_a"
    storage.copy_dir(storage.resolve(str(domain_a)), storage.resolve(data))
    cfg = config(
        data, f"{bucket}/runs", "zero2", "deepspeed.zero_stage=2", "scaling.num_workers=2", "train.epochs=4",
        "checkpoint.every_epochs=1", "checkpoint.keep=2", "run.max_failures=2",
    )  # fmt: skip
    run_uri = f"{bucket}/runs/zero2"
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(run_uri, killed))
    killer.start()
    result = launch(cfg, show_progress=False)
    killer.join()

    assert killed, "no training worker was found to kill"
    records = read_metrics(run_uri)
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= 1  # restarted once, from a checkpoint
    assert epochs_trained(run_uri) == [1, 2, 3, 4]  # each epoch once, in order
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(set(steps)) == 4  # the optimizer step continued too
    assert result["resumed"] == 1 and result["checkpoint"].startswith(f"{bucket}/runs/zero2/checkpoint_")
    files = [p.split("/") for p in storage.list_files(storage.resolve(run_uri))]
    checkpoints = {parts[3] for parts in files if len(parts) > 4 and parts[3].startswith("checkpoint_")}
    snapshot = storage.read_json(storage.resolve(run_uri).join("checkpoint_manager_snapshot.json"))
    kept = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    # keep: 2, and no other: those the killed attempt uploaded before Ray Train registered them are removed
    assert len(kept) == 2 and checkpoints == kept
    assert result["test_ndcg@10"] > 0.3  # the walk is learnable: popularity alone is near 10/60 * 0.5

    # export to S3, then score in one process: exactly the numbers the 2 workers all-reduced
    out = f"{bucket}/models/zero2"
    figures = export(result["checkpoint"], out)
    local = storage.local_copy(storage.resolve(out), work / "zero2_model")
    assert {
        "config.json",
        "model.safetensors",
        "items.parquet",
        "histories.parquet",
        "rayrec.json",
        "metrics.json",
    } <= {p.name for p in local.iterdir()}
    model = RecModel.from_pretrained(str(local)).eval()
    single = evaluate_model(model, read_sequences(str(domain_a)), "test", [10, 50])
    assert single == {k.removeprefix("test_"): v for k, v in result.items() if k.startswith("test_")}
    assert figures["valid_ndcg@10"] == result["valid_ndcg@10"]
    info = json.loads((local / "rayrec.json").read_text())
    assert info["model_version"] and info["dataset"]["counts"]["users"] == 200


def test_zero3_export_resume_by_name_continue_and_finetune(cluster: dict, domain_a: Path, work: Path) -> None:
    runs = str(work / "runs")
    cfg = config(
        str(domain_a), runs, "zero3", "deepspeed.zero_stage=3", "scaling.num_workers=2", "train.epochs=2"
    )
    result = launch(cfg, show_progress=False)
    exported = work / "zero3_model"
    figures = export(result["checkpoint"], str(exported))
    assert figures["test_ndcg@10"] == result["test_ndcg@10"]  # ZeRO-3 shards consolidated exactly
    pretrained = RecModel.from_pretrained(str(exported)).eval()

    # the same run name again, with one more epoch: resumes after epoch 2, trains only epoch 3
    again = launch(config(str(domain_a), runs, "zero3", "deepspeed.zero_stage=3", "scaling.num_workers=2",
                          "train.epochs=3"), show_progress=False)  # fmt: skip
    assert epochs_trained(f"{runs}/zero3") == [1, 2, 3] and again["resumed"] == 1
    # train.cpu_heap=auto hands freed memory back under ZeRO-3 (and keeps it under stages 0-2: test_train_local)
    assert {r["cpu_heap"] for r in read_metrics(f"{runs}/zero3") if "event" in r} == {"release"}

    # continued pre-training: 10 new items; known items keep their rows exactly
    extended = write_dataset(work / "extended", items=70, step=1, seed=1)
    cont = config(
        str(extended), runs, "continued", "deepspeed.zero_stage=0", "scaling.num_workers=1", "train.epochs=1"
    )
    items = pq.read_table(extended / "items.parquet")
    grown = build_model(cont, 70, None, items, init_from=str(exported))
    old_rows = pretrained.items.id_embeddings.weight
    new_rows = grown.items.id_embeddings.weight
    assert new_rows.shape == (71, old_rows.shape[1])
    assert torch.equal(new_rows[:61], old_rows)
    assert new_rows[61:].abs().sum() > 0  # new rows initialised, not left at zero
    result_cont = launch(cont, init_from=str(exported), show_progress=False)
    assert result_cont["test_users"] == 200
    cont_model, _ = export_and_load(result_cont["checkpoint"], work / "continued_model")
    assert cont_model.config.num_items == 70

    # fine-tuning on a shifted domain (users walk 3 items at a time) beats the pre-trained model there
    shifted = write_dataset(work / "domain_b", items=60, step=3, seed=2)
    before = evaluate_model(pretrained, read_sequences(str(shifted)), "valid", [10])["ndcg@10"]
    ft = config(
        str(shifted), runs, "finetune", "deepspeed.zero_stage=2", "scaling.num_workers=2", "train.epochs=3",
        "optim.lr=0.005", "eval.patience=2", "finetune.freeze=embeddings",
    )  # fmt: skip
    tuned = launch(ft, init_from=str(exported), show_progress=False)
    assert tuned["valid_ndcg@10"] > before + 0.05


def export_and_load(checkpoint: str, out: Path) -> tuple[RecModel, dict]:
    figures = export(checkpoint, str(out))
    return RecModel.from_pretrained(str(out)).eval(), figures
