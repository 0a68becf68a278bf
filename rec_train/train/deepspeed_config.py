"""The DeepSpeed config dict, derived from `TrainConfig` (never written by hand)."""

from __future__ import annotations

from typing import Any

from rec_train.train.config import TrainConfig


def use_bf16(config: TrainConfig, on_gpu: bool) -> bool:
    """bf16 on GPUs unless fp32 is asked for; always fp32 on CPUs (gloo, no bf16 kernels to gain from)."""
    if config.deepspeed.precision == "auto":
        return on_gpu
    return config.deepspeed.precision == "bf16"


MIN_BUCKET_ELEMENTS = 5_000_000


def bucket_elements(config: TrainConfig, hidden_size: int) -> int:
    """Elements per ZeRO bucket: the config's, else hidden_size squared (Hugging Face's "auto"), at least
    MIN_BUCKET_ELEMENTS so that a small model still reduces its gradients in one or a few collectives."""
    return config.deepspeed.bucket_elements or max(hidden_size * hidden_size, MIN_BUCKET_ELEMENTS)


def deepspeed_config(config: TrainConfig, world_size: int, on_gpu: bool, hidden_size: int) -> dict[str, Any]:
    """DeepSpeed's dict for this run. The optimizer and scheduler are built by the loop (AdamW, warm-up +
    cosine) and handed to `deepspeed.initialize`, so only batch, precision, clipping and ZeRO live here.

    The buckets are sized to the model (`bucket_elements`), and so are ZeRO-3's optimizer sub-groups:
    DeepSpeed steps the optimizer on one flat fp32 tensor per sub-group (default 1e9 elements), and
    AdamW's temporaries are the size of that tensor (2 x 4 bytes per parameter of the partition at once)."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        bucket = bucket_elements(config, hidden_size)
        zero.update(
            overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True,
            reduce_bucket_size=bucket, allgather_bucket_size=bucket,
        )  # fmt: skip
        if ds.zero_stage == 3:
            live = 2 * bucket if ds.max_live_parameters is None else ds.max_live_parameters
            reuse = bucket if ds.max_reuse_distance is None else ds.max_reuse_distance
            zero.update(
                sub_group_size=bucket,
                stage3_prefetch_bucket_size=bucket,
                stage3_max_live_parameters=live,
                stage3_max_reuse_distance=reuse,
            )
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
        # offload steps the loop's torch AdamW on the CPU copies (DeepSpeedCPUAdam would need a C++ build)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
