"""Reading `torch.save` files without running code from them.

A `torch.save` file is a pickle, and unpickling may call any importable function: a checkpoint from an
untrusted bucket could run code on every worker. Every torch file rayrec reads goes through torch's
weights-only unpickler, which builds tensors, containers and plain values and nothing else but an
allow-list: the three DeepSpeed records that ZeRO checkpoints hold (rebuilt from their attributes; no
method of theirs runs). `load` reads a file that way; DeepSpeed's own loaders (`engine.load_checkpoint`,
`get_fp32_state_dict_from_zero_checkpoint`) pass `weights_only=False`, so `deepspeed_loads` runs them
under torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, which overrides that argument.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rec_train.errors import UnsafeCheckpointError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# what `np.random.get_state()` pickles to (the rng_state_{rank}.pt of older checkpoints): the array
# constructor its pickle calls (found through `__reduce__`, so under the running NumPy's module name),
# the array and dtype classes
NUMPY_ARRAYS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_records() -> list[type]:
    """The DeepSpeed classes that ZeRO optimizer states pickle: the loss scaler, the stage, fragment bounds.

    A first import of DeepSpeed here (export, evaluation, benchmarks) sends its log lines to stderr: its
    logger writes to the stdout of import time, where rayrec's commands print their JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load(path: Path, numpy_arrays: bool = False) -> Any:
    """`torch.load` of `path` onto the CPU with the weights-only unpickler and the DeepSpeed records allowed
    (`numpy_arrays`: NumPy arrays too); anything else is an `UnsafeCheckpointError` naming the file."""
    allowed = deepspeed_records() + (NUMPY_ARRAYS if numpy_arrays else [])
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise refused(path, unsafe_globals(path)) from None


@contextmanager
def deepspeed_loads(directory: Path) -> Iterator[None]:
    """Within: every `torch.load` is weights-only with the DeepSpeed records allowed, whatever its caller
    passes; a refused file under `directory` is an `UnsafeCheckpointError` naming it."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_records()):
            try:
                yield
            except pickle.UnpicklingError:
                for path in sorted(directory.rglob("*.pt")):
                    if names := unsafe_globals(path):
                        raise refused(path, names) from None
                raise refused(directory, []) from None
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def unsafe_globals(path: Path) -> list[str]:
    """The functions and classes outside the allow-list that the pickle of `path` names, read without
    running it; [] when it names none or is not in torch's zip format."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:
        return []


def refused(path: Path, names: list[str]) -> UnsafeCheckpointError:
    what = f"refers to {', '.join(names)}" if names else "builds objects other than tensors and plain values"
    return UnsafeCheckpointError(
        f"{path}: refused to load: its pickle {what}, which no rayrec or DeepSpeed checkpoint holds, and "
        "unpickling it could run code. Load only checkpoints written by rayrec from a source you trust; "
        "re-create this one by running its training again (`rec-train pretrain` / `rec-train finetune` with "
        "the same config)"
    )
