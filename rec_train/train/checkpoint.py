"""Training checkpoints: DeepSpeed's sharded engine state plus the trainer state, and their consolidation.

A checkpoint folder (one per `ray.train.report`, merged from every worker by Ray Train):

```
deepspeed/state/               engine.save_checkpoint: model, optimizer and scheduler shards per rank
trainer_state.json             epoch, step, best metric, evaluations without gain, last metrics
rng_state_{rank}.pt            Python, NumPy and torch RNG of each worker
model_config.json              the RecConfig the engine was built from
run.json                       the resolved TrainConfig and the dataset path
```
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rec_train import storage
from rec_train.errors import RayrecError
from rec_train.model import RecConfig, RecModel

DS_DIR = "deepspeed"
DS_TAG = "state"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
RUN_INFO = "run.json"
EXPORT_INFO = "rayrec.json"


@dataclass
class TrainerState:
    """What the loop needs, besides the engine, to continue exactly where it stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_metric: float | None = None
    best_epoch: int = 0
    evals_without_gain: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any, directory: Path, state: TrainerState, rank: int, model_config: RecConfig, run: dict
) -> None:
    """Every rank: its engine shard and RNG; rank 0 also the trainer state, model config and run info."""
    engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    torch.save(rng_state(), directory / f"rng_state_{rank}.pt")
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
        (directory / MODEL_CONFIG).write_text(model_config.to_json_string())
        (directory / RUN_INFO).write_text(json.dumps(run, indent=2, default=str))


def restore(engine: Any, directory: Path, rank: int, rng: bool = True) -> TrainerState:
    """Load the engine (weights, optimizer, scheduler) and, with `rng`, this rank's RNG state.
    (The optimizer is always loaded: under ZeRO-3 the weights are restored from its fp32 partitions.)"""
    path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    if path is None:
        raise RayrecError(
            f"{directory}: no DeepSpeed state under {DS_DIR}/{DS_TAG}; the checkpoint is incomplete"
        )
    rng_file = directory / f"rng_state_{rank}.pt"
    if rng and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState.from_json((directory / TRAINER_STATE).read_text())


def consolidated_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (and buffers) from the shards of any ZeRO stage."""
    ds_dir = directory / DS_DIR
    tag_dir = ds_dir / DS_TAG
    if not tag_dir.is_dir():
        raise RayrecError(f"{directory} is not a rayrec training checkpoint: {DS_DIR}/{DS_TAG}/ is missing")
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    # ZeRO-0: the full module is in the model states file
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def is_checkpoint(loc: storage.Location) -> bool:
    return storage.exists(loc.join(TRAINER_STATE))


def model_from_checkpoint(directory: Path) -> RecModel:
    """A plain `RecModel` (no DeepSpeed engine) with the consolidated weights of a checkpoint."""
    config = RecConfig.from_json_file(str(directory / MODEL_CONFIG))
    model = RecModel(config)
    state = consolidated_state_dict(directory)
    if any(".lora_" in key for key in state):
        from rec_train.train.model_init import merge_lora

        finetune = json.loads((directory / RUN_INFO).read_text())["config"]["finetune"]
        state = merge_lora(state, finetune["lora_alpha"] / finetune["lora_rank"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(model.named_buffers())]
    if missing or unexpected:
        raise RayrecError(
            f"{directory}: checkpoint does not fit its model config (missing {missing}, unexpected {unexpected})"
        )
    return model.eval()


def _not_a_model(loc: storage.Location) -> RayrecError:
    return RayrecError(
        f"{loc.uri} is neither an exported model ({EXPORT_INFO} missing) nor a training checkpoint "
        f"({TRAINER_STATE} missing); pass a folder written by `rec-train export` or a checkpoint_* folder"
    )


def model_max_seq_len(uri: str) -> int:
    """The max_seq_len of an exported model or a training checkpoint, read from its config alone."""
    loc = storage.resolve(uri)
    if storage.exists(loc.join(EXPORT_INFO)):
        return int(storage.read_json(loc.join("config.json"))["max_seq_len"])
    if is_checkpoint(loc):
        return int(storage.read_json(loc.join(MODEL_CONFIG))["max_seq_len"])
    raise _not_a_model(loc)


def load_model(uri: str) -> tuple[RecModel, dict[str, Any]]:
    """An exported model folder or a training checkpoint (local or S3) -> (model in eval mode, info).

    `info` has `data_path` (the dataset the model was trained on) and, for a checkpoint, `trainer_state`.
    """
    loc = storage.resolve(uri)
    with tempfile.TemporaryDirectory(prefix="rayrec-model-") as tmp:
        if storage.exists(loc.join(EXPORT_INFO)):
            local = storage.local_copy(loc, tmp)
            info = json.loads((local / EXPORT_INFO).read_text())
            model = RecModel.from_pretrained(str(local)).eval()
            return model, {"data_path": info.get("config", {}).get("data", {}).get("path"), **info}
        if not is_checkpoint(loc):
            raise _not_a_model(loc)
        local = storage.local_copy(loc, tmp)
        model = model_from_checkpoint(local)
        run = json.loads((local / RUN_INFO).read_text())
        state = json.loads((local / TRAINER_STATE).read_text())
        return model, {"data_path": run["config"]["data"]["path"], "trainer_state": state, **run}
