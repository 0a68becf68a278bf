"""Experiment tracking from rank 0 of a run (`run.tracking`): MLflow through Ray's `setup_mlflow`, or
TensorBoard scalars through tensorboardX. metrics.jsonl stays the run's own record either way.

Metric names are the run's (`valid_ndcg@10`) with `@` written `_at_` (`valid_ndcg_at_10`), which MLflow
and TensorBoard both accept; the step is the epoch.
"""

from __future__ import annotations

from typing import Any, Protocol

from rec_train.errors import RayrecError
from rec_train.train.config import TrainConfig


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def metric_name(key: str) -> str:
    return key.replace("@", "_at_")


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of a metrics record under tracker-safe names (booleans and text dropped)."""
    return {
        metric_name(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}: the config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value
    return out


class MLflowTracker:
    def __init__(self, config: TrainConfig, run_name: str) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        try:
            self.mlflow = setup_mlflow(
                config=flat_params(config.model_dump(mode="json")), tracking_uri=config.run.tracking_uri,
                experiment_name=config.run.experiment, run_name=run_name, create_experiment_if_not_exists=True,
                rank_zero_only=True,
            )  # fmt: skip
        except RuntimeError as exc:  # setup_mlflow's "mlflow was not found"
            raise RayrecError(f"run.tracking=mlflow: {exc} (or `pip install rayrec[tracking]`)") from exc

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(numeric(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class TensorBoardTracker:
    def __init__(self, logdir: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def start_tracking(config: TrainConfig, run_uri: str, run_name: str, rank: int) -> Tracker | None:
    """The run's tracker on rank 0; None on other ranks and under `run.tracking=none`."""
    if rank != 0 or config.run.tracking == "none":
        return None
    if config.run.tracking == "mlflow":
        return MLflowTracker(config, run_name)
    return TensorBoardTracker(config.run.tracking_uri or f"{run_uri.rstrip('/')}/tensorboard")
