"""`train.cpu_heap`: which glibc heap mode each setup gets, and that keep spares the page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rec_train.train.config import TrainConfig
from rec_train.train.cpu_heap import KEEP_ENV, heap_env, heap_mode

# Ten training steps whose logits (4,096 x 5,000 floats, 82 MB) and their gradient are allocated and freed
# each time, run in a thread other than the main one (Ray Train runs the training function in one) after a
# warm-up; prints the minor page faults of the ten.
FAULTS = """
import resource, threading, torch
layer = torch.nn.Linear(64, 5000)
optimizer = torch.optim.AdamW(layer.parameters())
x, y = torch.randn(4096, 64), torch.randint(0, 5000, (4096,))
def steps():
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=steps)
thread.start(); thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def config(heap: str, stage: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {"data": {"path": "d"}, "train": {"cpu_heap": heap}, "deepspeed": {"zero_stage": stage}}
    )


@pytest.mark.parametrize(
    ("heap", "stage", "on_gpu", "mode"),
    [
        ("auto", 0, False, "keep"), ("auto", 2, False, "keep"), ("auto", 3, False, "release"),
        ("auto", 0, True, "glibc"), ("keep", 3, False, "keep"), ("release", 0, False, "release"),
        ("glibc", 0, False, "glibc"), ("keep", 0, True, "glibc"),
    ],
)  # fmt: skip
def test_heap_mode_follows_the_setting_and_the_stage(heap: str, stage: int, on_gpu: bool, mode: str) -> None:
    assert heap_mode(config(heap, stage), on_gpu) == mode
    assert heap_env(config(heap, stage), on_gpu) == (KEEP_ENV if mode == "keep" else {})


def test_unknown_heap_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_heap"):
        config("big", 0)


@pytest.mark.parametrize(
    ("heap", "stage", "on_gpu", "env", "effective"),
    [
        ("auto", 0, False, True, "keep"), ("auto", 0, False, False, "glibc"),  # keep needs the start-up env
        ("auto", 3, False, False, "release"), ("auto", 3, True, False, "glibc"), ("glibc", 0, False, True, "glibc"),
    ],
)  # fmt: skip
def test_configure_heap_reports_the_mode_in_effect(
    heap: str, stage: int, on_gpu: bool, env: bool, effective: str
) -> None:
    """In a child process, as mallopt changes the allocator of the process that calls it."""
    code = (
        "import json; from rec_train.train.config import TrainConfig;"
        "from rec_train.train.cpu_heap import configure_heap;"
        f"c = TrainConfig.model_validate(json.loads({json.dumps(config(heap, stage).model_dump(mode='json'))!r}));"
        f"print(configure_heap(c, {on_gpu}))"
    )
    child_env = {k: v for k, v in os.environ.items() if k not in KEEP_ENV} | (KEEP_ENV if env else {})
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env
    )
    assert out.stdout.strip() == effective


def test_keep_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    """glibc's defaults map each large tensor afresh (about 800,000 faults here); `KEEP_ENV` reuses the heap."""

    def faults(extra: dict[str, str]) -> int:
        env = {k: v for k, v in os.environ.items() if k not in KEEP_ENV} | extra
        run = subprocess.run(
            [sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env
        )
        return int(run.stdout.strip())

    default, keep = faults({}), faults(KEEP_ENV)
    assert default > 100_000 and keep < default / 4, (default, keep)
