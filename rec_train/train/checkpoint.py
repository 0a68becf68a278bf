"""Training checkpoints: DeepSpeed's sharded engine state plus the trainer state, and their consolidation.

A checkpoint folder (one per `ray.train.report`, merged from every worker by Ray Train):

```
deepspeed/state/               engine.save_checkpoint: model, optimizer and scheduler shards per rank
trainer_state.json             epoch, step, best metric, evaluations without gain, last metrics
rng_state_{rank}.json          Python, NumPy and torch RNG of each worker
model_config.json              the RecConfig the engine was built from
run.json                       the resolved TrainConfig and the dataset path
```

Nothing in it is unpickled beyond tensors and plain values (`safe_load`). Checkpoints written before
the RNG state moved to JSON hold `rng_state_{rank}.pt` instead, still read (weights-only).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rec_train import storage
from rec_train.errors import RayrecError
from rec_train.model import RecConfig, RecModel
from rec_train.model.peft_utils import load_weights
from rec_train.train import safe_load

DS_DIR = "deepspeed"
DS_TAG = "state"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
RUN_INFO = "run.json"


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
    """This process's Python, NumPy, torch (and CUDA) RNG state as JSON values."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, 625 ints, gauss)
        "numpy": [name, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),  # bytes
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (or an older checkpoint's pickled RNG, the same values as tuples,
    arrays and tensors)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(
    engine: Any, directory: Path, state: TrainerState, rank: int, model_config: RecConfig, run: dict
) -> None:
    """Every rank: its engine shard and RNG; rank 0 also the trainer state, model config and run info."""
    engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    (directory / f"rng_state_{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
        (directory / MODEL_CONFIG).write_text(model_config.to_json_string())
        (directory / RUN_INFO).write_text(json.dumps(run, indent=2, default=str))


def restore(engine: Any, directory: Path, rank: int, rng: bool = True) -> TrainerState:
    """Load the engine (weights, optimizer, scheduler) and, with `rng`, this rank's RNG state.
    (The optimizer is always loaded: under ZeRO-3 the weights are restored from its fp32 partitions.)"""
    with safe_load.deepspeed_loads(directory / DS_DIR):
        path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    if path is None:
        raise RayrecError(
            f"{directory}: no DeepSpeed state under {DS_DIR}/{DS_TAG}; the checkpoint is incomplete"
        )
    rng_file, pickled = directory / f"rng_state_{rank}.json", directory / f"rng_state_{rank}.pt"
    if rng and rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    elif rng and pickled.exists():  # written before the RNG state moved to JSON
        set_rng_state(safe_load.load(pickled, numpy_arrays=True))
    return TrainerState.from_json((directory / TRAINER_STATE).read_text())


def consolidated_state_dict(directory: Path) -> dict[str, Any]:
    """Full fp32 weights (and buffers) from the shards of any ZeRO stage. Under ZeRO 1-3 a weight is
    gathered from the ranks' fp32 partitions (memory-mapped) only when its `contiguous()` is called, so
    `load_weights` builds the model one tensor at a time instead of beside a second full copy."""
    ds_dir = directory / DS_DIR
    tag_dir = ds_dir / DS_TAG
    if not tag_dir.is_dir():
        raise RayrecError(f"{directory} is not a rayrec training checkpoint: {DS_DIR}/{DS_TAG}/ is missing")
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")):
        with safe_load.deepspeed_loads(ds_dir):  # imports DeepSpeed first, its logs on stderr
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG, lazy_mode=True)
    # ZeRO-0: the full module is in the model states file
    states = safe_load.load(tag_dir / "mp_rank_00_model_states.pt")
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def is_checkpoint(loc: storage.Location) -> bool:
    return storage.exists(loc.join(TRAINER_STATE))


def model_from_checkpoint(directory: Path) -> RecModel:
    """A plain `RecModel` (no DeepSpeed engine) with the consolidated weights of a checkpoint (LoRA
    adapters folded in)."""
    config = RecConfig.from_json_file(str(directory / MODEL_CONFIG))
    finetune = json.loads((directory / RUN_INFO).read_text())["config"].get("finetune") or {}
    state = consolidated_state_dict(directory)
    try:
        model = load_weights(
            RecModel(config), state, finetune.get("lora_rank", 0), finetune.get("lora_alpha", 0)
        )
    except ValueError as exc:
        raise RayrecError(f"{directory}: checkpoint does not fit its model config ({exc})") from None
    return model.eval()
