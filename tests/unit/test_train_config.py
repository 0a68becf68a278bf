"""TrainConfig validation (a bad model section fails at load), the DeepSpeed dict, LR schedule, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from rec_train.cli import main
from rec_train.config import ConfigError, load_config
from rec_train.model import build_config
from rec_train.train.batches import (
    eval_batch,
    grouped_by_length,
    pointwise_batch,
    position_share,
    trainable_rows,
    training_batch,
)
from rec_train.train.config import TrainConfig
from rec_train.train.deepspeed_config import deepspeed_config
from rec_train.train.optim import lr_lambda


def test_deepspeed_dict_is_derived_from_the_typed_config() -> None:
    config = TrainConfig.model_validate(
        {"data": {"path": "d"}, "train": {"batch_size": 8, "grad_accum": 4}, "optim": {"grad_clip": 0.5},
         "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}}
    )  # fmt: skip
    cpu = deepspeed_config(config, world_size=2, on_gpu=False, hidden_size=64)
    assert cpu["train_batch_size"] == 8 * 4 * 2
    assert cpu["train_micro_batch_size_per_gpu"] == 8 and cpu["gradient_accumulation_steps"] == 4
    assert cpu["gradient_clipping"] == 0.5
    assert cpu["bf16"] == {"enabled": False}  # fp32 on CPUs
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cpu["zero_force_ds_cpu_optimizer"] is False  # offload steps the loop's AdamW
    assert deepspeed_config(config, world_size=1, on_gpu=True, hidden_size=64)["bf16"] == {"enabled": True}
    config.deepspeed.precision = "fp32"
    assert deepspeed_config(config, world_size=1, on_gpu=True, hidden_size=64)["bf16"] == {"enabled": False}


def test_zero_buckets_follow_the_model_width_unless_set() -> None:
    """hidden_size squared (at least 5e6) per bucket, the ZeRO-3 reuse distance one bucket, 2 live: so
    ZeRO-3 releases a block of a wide model after its use instead of holding the whole model gathered."""
    config = TrainConfig.model_validate({"data": {"path": "d"}, "deepspeed": {"zero_stage": 3}})
    small, wide = (deepspeed_config(config, 2, False, h)["zero_optimization"] for h in (64, 4096))
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] == 5_000_000
    assert wide["reduce_bucket_size"] == wide["stage3_prefetch_bucket_size"] == 4096**2
    assert wide["stage3_max_reuse_distance"] == wide["sub_group_size"] == 4096**2
    assert wide["stage3_max_live_parameters"] == 2 * 4096**2
    config = TrainConfig.model_validate(
        {"data": {"path": "d"},
         "deepspeed": {"zero_stage": 3, "bucket_elements": 1000, "max_live_parameters": 0, "max_reuse_distance": 7}}
    )  # fmt: skip
    zero = deepspeed_config(config, 2, False, 4096)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"]) == (
        1000, 0, 7,
    )  # fmt: skip
    stage0 = TrainConfig.model_validate({"data": {"path": "d"}, "deepspeed": {"zero_stage": 0}})
    assert deepspeed_config(stage0, 2, False, 4096)["zero_optimization"] == {"stage": 0}
    with pytest.raises(ConfigError, match="bucket_elements"):
        load_config(TrainConfig, None, ["data.path=d", "deepspeed.bucket_elements=0"])


def test_bad_keys_and_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(TrainConfig, None, ["data.path=d", "train.epoch=3"])
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage=3"):
        load_config(
            TrainConfig, None, ["data.path=d", "deepspeed.zero_stage=2", "deepspeed.offload_params=true"]
        )
    with pytest.raises(ConfigError, match=r"eval.metric='ndcg@20' needs 20 in eval.ks"):
        load_config(TrainConfig, None, ["data.path=d", "eval.metric=ndcg@20"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_config(TrainConfig, None, ["data.path=d", "deepspeed.zero_stage=4"])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.overrides.hiden_size=64", "model.overrides: unknown model key 'hiden_size'; did you mean 'hidden_size'?"),
        ("model.overrides.colour=red", "model.overrides: unknown model key 'colour' (valid keys: attention_dropout,"),
        ("model.overrides.num_attention_heads=0", "model.overrides: model.num_attention_heads must be >= 1, got 0"),
        ("model.overrides.hidden_size=sixty", "model.overrides: model.hidden_size='sixty' is not a valid int"),
        ("model.overrides.encoder=gru", "model.overrides: model.encoder='gru' is not one of llama, qwen2, gpt2, bert"),
        ("model.size=huge", "model.size: unknown model size 'huge'; choose from tiny, ml-1m, base, large"),
    ],
)  # fmt: skip
def test_a_bad_model_section_fails_at_load_naming_the_key(setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TrainConfig, None, ["data.path=d", setting])
    assert str(error.value).startswith(f"config: {message}")
    assert not ray.is_initialized()


def test_pretrain_with_a_bad_model_key_exits_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: unused\nmodel:\n  size: tiny\n  overrides:\n    hiden_size: 64\n")
    assert main(["pretrain", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: model.overrides: unknown model key 'hiden_size'; did you mean 'hidden_size'?" in err
    assert not ray.is_initialized()


def test_model_values_are_converted_as_the_other_keys_are() -> None:
    # YAML reads 1e-8 as a string: optim.eps and the model's norm_eps both take it as 1e-08
    config = load_config(
        TrainConfig, None, ["data.path=d", "optim.eps=1e-8", "model.overrides.norm_eps=1e-8"]
    )
    assert config.optim.eps == build_config(config.model.size, **config.model.overrides).norm_eps == 1e-8


def test_lr_warms_up_then_decays_by_cosine_to_the_floor() -> None:
    f = lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


ROWS = pa.table(
    {
        "train_items": pa.array([[1, 2, 3, 4], [5], [6, 7]], pa.list_(pa.int32())),
        "valid_item": pa.array([5, 6, 0], pa.int32()),
        "test_item": pa.array([6, 7, 8], pa.int32()),
    }
)


def test_training_batch_shifts_labels_and_left_pads() -> None:
    batch = training_batch(ROWS, max_len=3, include_valid=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 0], [0, 0, 6]]
    assert batch["labels"].tolist() == [[2, 3, 4], [0, 0, 0], [0, 0, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]
    with_valid = training_batch(ROWS, max_len=3, include_valid=True)
    assert with_valid["input_ids"].tolist()[0] == [2, 3, 4] and with_valid["labels"].tolist()[0] == [3, 4, 5]
    assert with_valid["labels"].tolist()[1] == [0, 0, 6]


def test_trainable_rows_need_an_input_and_a_label() -> None:
    assert trainable_rows(ROWS, include_valid=False)["train_items"].to_pylist() == [[1, 2, 3, 4], [6, 7]]
    assert trainable_rows(ROWS, include_valid=True).num_rows == 3


def test_windows_make_every_older_item_a_label_exactly_once() -> None:
    rows = pa.table(
        {
            "user_index": pa.array([0, 1, 2], pa.int32()),
            "train_items": pa.array([list(range(1, 11)), [20, 21, 22], [30]], pa.list_(pa.int32())),
            "valid_item": pa.array([11, 23, 31], pa.int32()),
            "test_item": pa.array([12, 24, 32], pa.int32()),
            "values": pa.array(
                [[float(i) for i in range(1, 11)], [2.0, 2.1, 2.2], [3.0]], pa.list_(pa.float32())
            ),
            "valid_value": pa.array([4.0, 5.0, 3.5], pa.float32()),
            "test_value": pa.array([1.0, 2.0, 3.0], pa.float32()),
        }
    )
    out = trainable_rows(rows, include_valid=True, window=3)
    assert out.schema == rows.schema
    assert out.slice(0, 3).equals(rows)  # each user's own row first, unchanged
    older = out.slice(3)
    # user 0 trains on 1..11: newest window 8..11 (labels 9, 10, 11), then 5..8, 2..5, 1..2
    assert older["user_index"].to_pylist() == [0, 0, 0]
    assert older["train_items"].to_pylist() == [[5, 6, 7, 8], [2, 3, 4, 5], [1, 2]]
    assert older["values"].to_pylist() == [[5.0, 6.0, 7.0, 8.0], [2.0, 3.0, 4.0, 5.0], [1.0, 2.0]]
    assert set(older["valid_item"].to_pylist()) == set(older["test_item"].to_pylist()) == {0}
    assert older["valid_value"].null_count == older["test_value"].null_count == 3
    labels = training_batch(out, max_len=3, include_valid=True)["labels"]  # [6, 3]
    user0 = labels[[0, 3, 4, 5]].flatten().tolist()
    assert sorted(x for x in user0 if x) == list(range(2, 12))  # 2..11, each once; 1 is never a label
    assert labels[1].tolist() == [21, 22, 23] and labels[2].tolist() == [0, 0, 31]
    # without the validation items: user 0 has 10 items (windows 7..10, 4..7, 1..4), user 2 none
    assert trainable_rows(rows, include_valid=False, window=3)["train_items"].to_pylist()[2:] == [
        [4, 5, 6, 7],
        [1, 2, 3, 4],
    ]
    assert trainable_rows(rows, include_valid=True, window=20).equals(rows)  # nothing older than a window
    with pytest.raises(ValueError, match="window must be >= 1"):
        trainable_rows(rows, include_valid=True, window=0)


def test_grouping_by_length_pads_less_and_orders_batches_alike_on_every_worker() -> None:
    def rows(lengths: list[int], valid: list[int] | None = None) -> pa.Table:
        n = len(lengths)
        return pa.table(
            {
                "user_index": pa.array(range(n), pa.int32()),
                "train_items": pa.array([list(range(1, k + 1)) for k in lengths], pa.list_(pa.int32())),
                "valid_item": pa.array(valid or [0] * n, pa.int32()),
                "test_item": pa.array([0] * n, pa.int32()),
            }
        )

    lengths = [3, 9, 2, 7, 5, 8, 4, 6, 10, 11, 12]  # 11 rows: batches of 4, 4 and 3
    table = rows(lengths)
    batches = grouped_by_length(table, 4, include_valid=False, rng=np.random.default_rng(7))
    assert [b.num_rows for b in batches].count(4) == 2 and sum(b.num_rows for b in batches) == 11
    users = sorted(u for b in batches for u in b["user_index"].to_pylist())
    assert users == list(range(11))  # every row once
    groups = sorted(sorted(len(x) for x in b["train_items"].to_pylist()) for b in batches)
    assert groups == [[2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # neighbours in length, longest first
    width = sum(training_batch(b, 20, False)["input_ids"].shape[1] for b in batches)
    assert width == 11 + 7 + 3  # each batch pads to its longest row (less one: the last item is a label)
    # another worker's rows of other lengths, the same rng: the same order of length ranks
    other = grouped_by_length(rows([k + 1 for k in lengths]), 4, False, np.random.default_rng(7))
    longest = [max(len(x) for x in b["train_items"].to_pylist()) for b in batches]
    assert [max(len(x) for x in b["train_items"].to_pylist()) for b in other] == [k + 1 for k in longest]
    # the validation item counts when it is trained on
    same = rows([3, 3, 3, 3], valid=[0, 99, 0, 99])
    for include_valid, pairs in ((True, [[0, 2], [1, 3]]), (False, [[0, 1], [2, 3]])):
        grouped = grouped_by_length(same, 2, include_valid, np.random.default_rng(0))
        assert sorted(b["user_index"].to_pylist() for b in grouped) == pairs

    # the training loop: chunks of batch_size x group_by_length rows; the order depends on seed, epoch, chunk
    from rec_train.train.loop import _batches

    def orders(group: int, epoch: int) -> list[list[int]]:
        config = load_config(
            TrainConfig, None, ["data.path=d", "train.batch_size=2", f"data.group_by_length={group}"]
        )
        chunks = [table.slice(0, 6), table.slice(6)]
        return [b["user_index"].to_pylist() for b in _batches(chunks, config, epoch)]

    assert orders(0, 1) == [list(range(6)), list(range(6, 11))]  # off: the chunks as they come
    first = orders(3, 1)
    assert [len(b) for b in first].count(2) == 5 and sorted(sum(first, [])) == list(range(11))
    assert orders(3, 1) == first and any(orders(3, epoch) != first for epoch in (2, 3, 4))


def test_position_share_weighs_a_batch_by_its_labelled_positions() -> None:
    rows = pa.table(
        {
            "train_items": pa.array([[1, 2, 3, 4], [5, 6]], pa.list_(pa.int32())),
            "valid_item": pa.array([7, 0], pa.int32()),
            "values": pa.array([[4.0, None, 3.0, 5.0], [1.0, 2.0]], pa.list_(pa.float32())),
            "valid_value": pa.array([2.0, None], pa.float32()),
        }
    )
    batch = training_batch(rows, max_len=8, include_valid=True)  # labels 2, 3, 4, 7 and 6
    assert position_share(batch, batch_size=2, max_len=8) == 5 / 16
    assert position_share(batch, batch_size=4, max_len=10) == 5 / 40  # a full batch's positions
    rated = pointwise_batch(rows, 8, True, "rating", 3.5)  # item 2 has no rating: 3, 4, 7 and 6
    assert position_share(rated, batch_size=2, max_len=8) == 4 / 16
    with pytest.raises(ConfigError, match="train.loss_per"):
        load_config(TrainConfig, None, ["data.path=d", "train.loss_per=token"])


def test_eval_batch_history_and_targets_per_split() -> None:
    valid = eval_batch(ROWS, "valid", max_len=2)
    assert valid.targets.tolist() == [5, 6]  # the third user has no validation target
    assert valid.input_ids.tolist() == [[3, 4], [0, 5]]
    assert valid.seen.tolist() == [[1, 2, 3, 4], [0, 0, 0, 5]]
    test = eval_batch(ROWS, "test", max_len=8)
    assert test.targets.tolist() == [6, 7, 8]
    assert test.seen.tolist()[1] == [0, 0, 0, 5, 6]
    with pytest.raises(ValueError, match="split must be one of"):
        eval_batch(ROWS, "train", 2)


def test_the_training_window_is_the_max_seq_len_of_the_model_that_trains(tmp_path: Path) -> None:
    from rec_serve.synthetic import write_tiny_model
    from rec_train.errors import RayrecError
    from rec_train.train.launch import training_window

    def window(*overrides: str, init_from: str | None = None, max_seq_len: int | None = None) -> int | None:
        config = load_config(TrainConfig, None, ["data.path=d", "model.size=ml-1m", *overrides])
        return training_window(config, num_items=50, max_seq_len=max_seq_len, init_from=init_from)

    assert window() is None  # data.windows=last
    assert window("data.windows=all") == 200  # the size's
    assert window("data.windows=all", max_seq_len=64) == 64  # the dataset's or model.max_seq_len
    assert window("data.windows=all", "model.overrides.max_seq_len=32", max_seq_len=64) == 32
    exported = write_tiny_model(tmp_path / "model")
    assert window("data.windows=all", init_from=str(exported)) == 20  # the tiny size's, not ml-1m's
    with pytest.raises(RayrecError, match="neither an exported model"):
        window("data.windows=all", init_from=str(tmp_path))
    with pytest.raises(ConfigError, match="data.windows"):
        window("data.windows=some")


def test_local_paths_are_made_absolute_for_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rec_train.train.launch import absolute_paths

    monkeypatch.chdir(tmp_path)
    relative = load_config(
        TrainConfig, None,
        ["data.path=runs/data", "model.backbone=minilm", "run.tracking=tensorboard", "run.tracking_uri=tb"],
    )  # fmt: skip
    config = absolute_paths(relative)
    assert config.data.path == str(tmp_path / "runs" / "data") and config.run.tracking_uri == str(
        tmp_path / "tb"
    )
    assert config.model.backbone == "minilm" and relative.data.path == "runs/data"  # a copy; names stay
    remote = absolute_paths(load_config(TrainConfig, None, ["data.path=s3://bucket/data/", "run.tracking=mlflow",
                                                             "run.tracking_uri=databricks"]))  # fmt: skip
    assert remote.data.path == "s3://bucket/data" and remote.run.tracking_uri == "databricks"
