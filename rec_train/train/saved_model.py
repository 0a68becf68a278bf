"""A model to start from or to evaluate: an exported model folder or a training checkpoint, local or S3.

`--init-from`, `rec-train evaluate`, the demo and the quality benchmark read models through `load_model`.
Weights come from safetensors (an exported folder) or from the checkpoint's DeepSpeed state read
weights-only (`checkpoint.model_from_checkpoint`); no pickle is ever run.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from rec_train import exported, storage
from rec_train.errors import RayrecError, UnsafeCheckpointError
from rec_train.model import RecModel
from rec_train.train import checkpoint as ckpt


def _not_a_model(loc: storage.Location) -> RayrecError:
    return RayrecError(
        f"{loc.uri} is neither an exported model ({exported.INFO_FILE} missing) nor a training checkpoint "
        f"({ckpt.TRAINER_STATE} missing); pass a folder written by `rec-train export` or a checkpoint_* folder"
    )


def _check_weights(loc: storage.Location) -> None:
    """An exported folder must hold safetensors weights; pickle weights are refused, never loaded."""
    if exported.has_weights(loc):
        return
    pickled = [name for name in exported.PICKLE_WEIGHTS if storage.is_file(loc.join(name))]
    if pickled:
        raise UnsafeCheckpointError(
            f"{loc.uri}: no {exported.WEIGHTS_FILE}, only pickle weights ({', '.join(pickled)}), which are never "
            "loaded because unpickling them could run code; export the model again with `rec-train export` "
            "(it writes safetensors)"
        )
    raise RayrecError(
        f"{loc.uri}: {exported.WEIGHTS_FILE} (or {exported.WEIGHTS_INDEX_FILE} and its shards) is missing; export "
        "the model again with `rec-train export`"
    )


def saved_config(uri: str) -> dict[str, Any]:
    """The model config (`RecConfig` keys) of an exported model or a training checkpoint, read alone."""
    loc = storage.resolve(uri)
    if exported.is_model_folder(loc):
        return storage.read_json(loc.join(exported.CONFIG_FILE))
    if ckpt.is_checkpoint(loc):
        return storage.read_json(loc.join(ckpt.MODEL_CONFIG))
    raise _not_a_model(loc)


def model_max_seq_len(uri: str) -> int:
    """The max_seq_len of an exported model or a training checkpoint, read from its config alone."""
    return int(saved_config(uri)["max_seq_len"])


def load_model(uri: str) -> tuple[RecModel, dict[str, Any]]:
    """An exported model folder or a training checkpoint (local or S3) -> (model in eval mode, info).

    `info` has `data_path` (the dataset the model was trained on) and, for a checkpoint, `trainer_state`.
    """
    loc = storage.resolve(uri)
    with tempfile.TemporaryDirectory(prefix="rayrec-model-") as tmp:
        if exported.is_model_folder(loc):
            _check_weights(loc)
            local = storage.local_copy(loc, tmp)
            info = json.loads((local / exported.INFO_FILE).read_text())
            model = RecModel.from_pretrained(str(local), use_safetensors=True).eval()
            return model, {"data_path": info.get("config", {}).get("data", {}).get("path"), **info}
        if not ckpt.is_checkpoint(loc):
            raise _not_a_model(loc)
        local = storage.local_copy(loc, tmp)
        model = ckpt.model_from_checkpoint(local)
        run = json.loads((local / ckpt.RUN_INFO).read_text())
        state = json.loads((local / ckpt.TRAINER_STATE).read_text())
        return model, {"data_path": run["config"]["data"]["path"], "trainer_state": state, **run}
