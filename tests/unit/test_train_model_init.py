"""Model setup for continued pre-training and fine-tuning: vocabulary checks, LoRA folding, plotting."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from rec_train.errors import DataError, RayrecError
from rec_train.model import RecModel, build_config
from rec_train.model.peft_utils import apply_lora, load_weights
from rec_train.train.model_init import check_vocab
from rec_train.train.plot import plot_run


def items(ids: list[str]) -> pa.Table:
    return pa.table({"item_index": pa.array(range(1, len(ids) + 1), pa.int32()), "item_id": ids})


def test_vocab_may_grow_but_known_items_must_keep_their_index() -> None:
    check_vocab(items(["a", "b"]), items(["a", "b", "c"]), "old-model", "new-data")
    with pytest.raises(DataError, match=r"item 'b' was index 2.*vocab_from=old-model"):
        check_vocab(items(["a", "b"]), items(["a", "c", "b"]), "old-model", "new-data")


def test_merged_lora_state_scores_like_the_peft_model() -> None:
    torch.manual_seed(0)
    config = build_config("tiny", num_items=30, pointwise_head="rating")
    peft_model = apply_lora(RecModel(config).eval(), r=4, alpha=8)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            param.data.normal_(0, 0.5)  # adapters and a trained head that change the output
    ids, candidates = torch.tensor([[0, 3, 5, 7], [1, 2, 3, 4]]), torch.tensor([6, 9])
    expected = peft_model.encode_users(ids) @ peft_model.item_embeddings().T
    expected_head = peft_model(ids, candidates=candidates).pointwise_logits

    plain = load_weights(RecModel(config).eval(), peft_model.state_dict(), lora_rank=4, lora_alpha=8)
    assert type(plain) is RecModel and not any("lora" in key for key in plain.state_dict())
    got = plain.encode_users(ids) @ plain.item_embeddings().T
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(plain(ids, candidates=candidates).pointwise_logits, expected_head, atol=1e-5)
    with pytest.raises(ValueError, match="unexpected"):
        load_weights(RecModel(config), peft_model.state_dict())  # LoRA keys into the plain model


class Gathered:
    """Stands in the place of DeepSpeed's `GatheredTensor` in a lazy state: a shape, and the tensor made on
    `contiguous()` (counted, and kept by no one once copied)."""

    made = 0

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.shape = tensor, tensor.shape

    def contiguous(self) -> torch.Tensor:
        Gathered.made += 1
        return self.tensor.clone()


def test_a_lazy_state_loads_tensor_by_tensor_and_shapes_are_checked() -> None:
    torch.manual_seed(0)
    config = build_config("tiny", num_items=30)
    source = RecModel(config).eval()
    state = {k: Gathered(v) for k, v in source.state_dict().items()}
    Gathered.made = 0
    loaded = load_weights(RecModel(config).eval(), state)
    assert Gathered.made == len(state)
    ids = torch.tensor([[0, 3, 5, 7], [1, 2, 3, 4]])
    assert torch.equal(loaded.encode_users(ids), source.encode_users(ids))
    name = next(k for k, v in source.state_dict().items() if v.dim() == 2)
    wrong = {**source.state_dict(), name: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=f"{name}: shape \\(3, 3\\)"):
        load_weights(RecModel(config), wrong)


def test_plot_writes_a_png_of_loss_and_ndcg(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"epoch": 1, "loss": 4.0, "valid_ndcg@10": 0.1},
        {"event": "resumed", "epoch": 1, "step": 3},
        {"epoch": 2, "loss": 3.5, "valid_ndcg@10": 0.2, "valid_ndcg@10_short": 0.1, "valid_coverage@10": 0.4},
        {"final": True, "epoch": 2, "test_ndcg@10": 0.2},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = plot_run(str(run))
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures["epochs"] == 2 and figures["curves"] == ["loss", "valid_ndcg@10", "valid_coverage@10"]
    with pytest.raises(RayrecError, match="no metrics.jsonl"):
        plot_run(str(tmp_path / "missing"))


def test_a_changed_test_item_leaves_popularity_negatives_unchanged() -> None:
    from rec_train.config import load_config
    from rec_train.train.config import TrainConfig
    from rec_train.train.launch import _split_events
    from rec_train.train.model_init import build_model

    rows = {
        "train_items": pa.array([[1, 2, 3, 2], [2, 3, 4]], pa.list_(pa.int32())),
        "valid_item": pa.array([4, 1], pa.int32()),
        "test_item": pa.array([5, 5], pa.int32()),
    }
    changed = {**rows, "test_item": pa.array([6, 6], pa.int32())}
    overrides = ["data.path=unused", "model.size=tiny", "model.overrides.loss=sampled_softmax",
                 "model.overrides.negative_sampler=popularity", "model.overrides.logq_correction=true"]  # fmt: skip
    config = load_config(TrainConfig, None, overrides)
    negatives, counts = [], []
    for table in (pa.table(rows), pa.table(changed)):
        events = _split_events(table, 6)  # what launch passes to every worker
        popularity = events["train"][0].values.to_numpy() + events["valid"][0].values.to_numpy()
        torch.manual_seed(0)
        model = build_model(config, 6, 8, items(list("abcdef")), None, popularity=popularity)
        counts.append(model.item_counts.clone())
        torch.manual_seed(1)
        negatives.append(model._sample_negatives(torch.tensor([1, 2]), (2, 50)))
    assert counts[0].tolist() == [0, 2, 3, 2, 2, 0, 0]  # items 5 and 6 are test targets only
    assert torch.equal(counts[0], counts[1]) and torch.equal(negatives[0], negatives[1])
    assert not (negatives[0] == 5).any()  # a test-only item is never drawn as a negative
