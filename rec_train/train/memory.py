"""What a run's model states need per worker, and a refusal before training when they cannot fit.

The states of fp32 training with AdamW, per parameter: 4 bytes of weights, and per trainable parameter 4
of gradients and 8 of Adam's two moments. ZeRO shards them over the N workers:

    stage 0: 4P + 12T            stage 2: 4P + 12T / N
    stage 1: 4P + 4T + 8T / N    stage 3: (4P + 12T) / N

Activations, buffers and the framework come on top, so this is a lower bound: a run it refuses could never
fit, and one it lets through may still need more. It applies to CPU workers, whose limit is the node's
memory (optimizer offload keeps the states in the same memory there); GPU memory is not known to Ray.
"""

from __future__ import annotations

import math
from typing import Any

from rec_train.config import ConfigError

GB = 1e9
WEIGHT_BYTES, GRADIENT_BYTES, ADAM_BYTES = 4, 4, 8


def state_bytes(parameters: int, trainable: int, stage: int, workers: int) -> float:
    """Bytes of weights, gradients and AdamW moments per worker under ZeRO `stage` on `workers` workers."""
    weights, grads, adam = WEIGHT_BYTES * parameters, GRADIENT_BYTES * trainable, ADAM_BYTES * trainable
    sharded = {0: 0.0, 1: adam, 2: grads + adam, 3: weights + grads + adam}[stage]
    return weights + grads + adam - sharded + sharded / workers


def worker_budget(nodes: list[dict[str, Any]], workers: int, cpus_per_worker: float) -> float:
    """The most memory (bytes of Ray's `memory` resource) one of `workers` workers can have: workers spread
    over the nodes with room for one, the fullest of those holding ceil(workers / nodes), on the largest."""
    usable = [n for n in nodes if n.get("CPU", 0) >= cpus_per_worker and n.get("memory", 0) > 0]
    if not usable:
        return math.inf
    per_node = math.ceil(workers / len(usable))
    return max(n["memory"] for n in usable) / per_node


def check_fits(parameters: int, trainable: int, stage: int, workers: int, budget: float, what: str) -> None:
    """A `ConfigError` with the estimate per stage when the states alone exceed `budget` bytes per worker."""
    need = state_bytes(parameters, trainable, stage, workers)
    if need <= budget:
        return
    stages = ", ".join(
        f"stage {s}: {state_bytes(parameters, trainable, s, workers) / GB:.1f} GB" for s in range(4)
    )
    fits = [s for s in range(4) if state_bytes(parameters, trainable, s, workers) <= budget]
    total = WEIGHT_BYTES * parameters + (GRADIENT_BYTES + ADAM_BYTES) * trainable
    hint = (
        f"set deepspeed.zero_stage={fits[0]}"
        if fits
        else f"give ZeRO stage 3 at least {math.ceil(total / budget)} workers with as much memory each (more nodes)"
    )
    raise ConfigError(
        f"{what} ({parameters:,} parameters, {trainable:,} trained) needs at least {need / GB:.1f} GB per worker "
        f"for its weights, gradients and AdamW state under ZeRO stage {stage} on {workers} workers, but a worker "
        f"here has at most {budget / GB:.1f} GB ({stages}; activations come on top): {hint}"
    )
