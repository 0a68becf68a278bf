"""Pointwise (rating / click) fine-tuning pieces: batches, metrics, the head on every position, config."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rec_train.config import ConfigError, load_config
from rec_train.model import RecModel, build_config
from rec_train.train.batches import pointwise_batch, pointwise_eval_batch
from rec_train.train.config import TrainConfig
from rec_train.train.metrics import pointwise_metrics

NAN = float("nan")
# user 0: items 1 2 3 | valid 4 | test 5 ; user 1: item 6 (no rating) 7 | valid 8 (no rating) | test 9
ROWS = pa.table(
    {
        "train_items": pa.array([[1, 2, 3], [6, 7]], pa.list_(pa.int32())),
        "valid_item": pa.array([4, 8], pa.int32()),
        "test_item": pa.array([5, 9], pa.int32()),
        "values": pa.array([[5.0, 4.0, 2.0, 1.0, 3.0], [NAN, 4.0, NAN, 2.0]], pa.list_(pa.float32())),
        "valid_value": pa.array([1.0, NAN], pa.float32()),
        "test_value": pa.array([3.0, 2.0], pa.float32()),
    }
)


def test_pointwise_batch_rates_each_next_item_and_skips_unrated_events() -> None:
    batch = pointwise_batch(ROWS, max_len=3, include_valid=False, task="rating", click_threshold=0.5)
    assert batch["input_ids"].tolist() == [[1, 2], [0, 6]]
    assert batch["candidates"].tolist() == [[2, 3], [0, 7]]
    assert batch["targets"].tolist() == [[4.0, 2.0], [0.0, 4.0]]
    with_valid = pointwise_batch(ROWS, max_len=2, include_valid=True, task="click", click_threshold=3.5)
    # user 0 trains on 1 2 3 4 (the last two inputs), user 1's validation event has no value
    assert with_valid["input_ids"].tolist() == [[2, 3], [6, 7]]
    assert with_valid["candidates"].tolist() == [[3, 4], [7, 0]]
    assert with_valid["targets"].tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_pointwise_eval_batch_needs_a_rated_target() -> None:
    valid = pointwise_eval_batch(ROWS, "valid", 8, "rating", 0.5)
    assert valid.candidates.tolist() == [4] and valid.targets.tolist() == [1.0]
    assert valid.input_ids.tolist() == [[1, 2, 3]]
    test = pointwise_eval_batch(ROWS, "test", 8, "click", 2.5)
    assert test.candidates.tolist() == [5, 9] and test.targets.tolist() == [1.0, 0.0]
    assert test.input_ids.tolist() == [[1, 2, 3, 4], [0, 6, 7, 8]]


def test_rating_metrics() -> None:
    m = pointwise_metrics(np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0]), "rating")
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3)) and m["mae"] == pytest.approx(1.0)
    assert m["rated_users"] == 3


def test_click_auc_matches_pair_counting_and_log_loss_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=300), 1)  # rounded: many ties
    labels = (rng.random(300) < 1 / (1 + np.exp(-logits))).astype(float)
    m = pointwise_metrics(logits, labels, "click")
    pos, neg = logits[labels == 1], logits[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m["auc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    p = 1 / (1 + np.exp(-logits))
    assert m["logloss"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    assert "auc" not in pointwise_metrics(logits, np.ones(300), "click")  # one class: no AUC


def test_head_over_every_position_equals_one_user_at_a_time() -> None:
    torch.manual_seed(0)
    model = RecModel(build_config("tiny", num_items=20, pointwise_head="rating")).eval()
    batch = pointwise_batch(ROWS, max_len=4, include_valid=True, task="rating", click_threshold=0.5)
    out = model(batch["input_ids"], batch["attention_mask"], candidates=batch["candidates"])
    # the same (history prefix, next item) pairs scored one by one through the user vector
    singles = [
        model(torch.tensor([[1]]), candidates=torch.tensor([2])).pointwise_logits,
        model(torch.tensor([[1, 2]]), candidates=torch.tensor([3])).pointwise_logits,
        model(torch.tensor([[1, 2, 3]]), candidates=torch.tensor([4])).pointwise_logits,
        model(torch.tensor([[6]]), candidates=torch.tensor([7])).pointwise_logits,
    ]
    assert torch.allclose(out.pointwise_logits, torch.cat(singles), atol=1e-5)


def test_added_head_starts_at_the_bias_and_bidirectional_models_refuse_positions() -> None:
    model = RecModel(build_config("tiny", num_items=20)).eval()
    model.add_pointwise_head("rating", bias=3.5)
    assert model.config.pointwise_head == "rating"
    logits = model(torch.tensor([[1, 2]]), candidates=torch.tensor([3])).pointwise_logits
    assert abs(logits.item() - 3.5) < 0.5
    bert = RecModel(build_config("tiny", num_items=20, encoder="bert", objective="masked_item",
                                 pointwise_head="click"))  # fmt: skip
    with pytest.raises(ValueError, match="causal encoder"):
        bert(torch.tensor([[1, 2]]), candidates=torch.tensor([[2, 3]]))


def test_task_and_metric_must_agree() -> None:
    base = ["data.path=x", "finetune.freeze=none"]
    config = load_config(TrainConfig, overrides=[*base, "finetune.task=rating", "eval.metric=rmse"])
    assert config.task == "rating" and config.metric_order == "min"
    assert (
        load_config(TrainConfig, overrides=[*base, "finetune.task=click", "eval.metric=auc"]).metric_order
        == "max"
    )
    with pytest.raises(ConfigError, match=r"finetune.task=rating needs eval.metric in \['rmse', 'mae'\]"):
        load_config(TrainConfig, overrides=[*base, "finetune.task=rating"])
    with pytest.raises(ConfigError, match="is for pointwise fine-tuning"):
        load_config(TrainConfig, overrides=["data.path=x", "eval.metric=rmse"])
    with pytest.raises(ConfigError, match="eval.metric='rsme' must look like"):
        load_config(TrainConfig, overrides=["data.path=x", "eval.metric=rsme"])
