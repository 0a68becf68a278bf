"""glibc's heap in CPU training workers (`train.cpu_heap`): freed memory kept for the next step, or handed back.

A training step allocates and frees the same large tensors every time (the logits of a MovieLens-1M batch
of 128 are 128 x 200 x 3,706 floats, 380 MB). By default glibc serves a block above its mmap threshold
(which it raises to at most 32 MiB) from a fresh mapping and unmaps it when it is freed, so each step
faults every 4 KiB page of those tensors in again; and Ray Train runs the training function in a thread
of its own, whose glibc arena maps every block larger than its 64 MiB heaps whatever the threshold.

- keep: the worker processes start with one arena (the main one, grown with brk), no block mapped on its
  own and no trimming, so freed memory is reused by the next step. Resident memory stays at its peak.
- release: blocks of 64 KiB or more get their own mapping and go back to the system when freed: the full
  weights ZeRO-3 frees when it partitions the model, and the step's temporaries. A page fault per 4 KiB
  of them on every step.
- glibc: its defaults.
- auto: release under ZeRO-3 (chosen to save memory), keep otherwise.

GPU workers keep glibc's defaults whatever the setting: their large tensors are in the GPU's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from rec_train.train.config import TrainConfig

KEEP_ENV = {  # read by glibc when the process starts, so set through the workers' runtime_env
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),  # 64 GiB: larger values are not taken
}
M_MMAP_THRESHOLD, RELEASE_THRESHOLD_BYTES = -3, 64 * 1024  # glibc's mallopt parameter and the value set


def heap_mode(config: TrainConfig, on_gpu: bool) -> str:
    """The mode `config` asks for on these workers: keep, release or glibc (auto resolved)."""
    if on_gpu:
        return "glibc"
    if config.train.cpu_heap == "auto":
        return "release" if config.deepspeed.zero_stage == 3 else "keep"
    return config.train.cpu_heap


def heap_env(config: TrainConfig, on_gpu: bool) -> dict[str, str]:
    """Environment variables the training workers start with (empty unless the mode is keep)."""
    return dict(KEEP_ENV) if heap_mode(config, on_gpu) == "keep" else {}


def configure_heap(config: TrainConfig, on_gpu: bool) -> str:
    """In a training worker, before the model is built: apply release (mallopt), and return the mode in
    effect (keep only when the process started with `KEEP_ENV`; glibc where glibc is not the allocator)."""
    mode = heap_mode(config, on_gpu)
    if mode == "keep":
        return "keep" if all(os.environ.get(k) == v for k, v in KEEP_ENV.items()) else "glibc"
    if mode == "release":
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if (
            libc is not None
            and hasattr(libc, "mallopt")
            and libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD_BYTES)
        ):
            return "release"
    return "glibc"
