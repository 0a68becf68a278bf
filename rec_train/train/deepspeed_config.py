"""The DeepSpeed config dict, derived from `TrainConfig` (never written by hand)."""

from __future__ import annotations

from typing import Any

from rec_train.train.config import TrainConfig


def use_bf16(config: TrainConfig, on_gpu: bool) -> bool:
    """bf16 on GPUs unless fp32 is asked for; always fp32 on CPUs (gloo, no bf16 kernels to gain from)."""
    if config.deepspeed.precision == "auto":
        return on_gpu
    return config.deepspeed.precision == "bf16"


def deepspeed_config(config: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's dict for this run. The optimizer and scheduler are built by the loop (AdamW, warm-up +
    cosine) and handed to `deepspeed.initialize`, so only batch, precision, clipping and ZeRO live here."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    micro = config.train.batch_size
    accum = config.train.grad_accum
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": use_bf16(config, on_gpu)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
