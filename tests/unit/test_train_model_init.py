"""Model setup for continued pre-training and fine-tuning: vocabulary checks, LoRA folding, plotting."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from rec_train.errors import DataError, RayrecError
from rec_train.model import RecModel, build_config
from rec_train.model.peft_utils import apply_lora
from rec_train.train.model_init import check_vocab, merge_lora
from rec_train.train.plot import plot_run


def items(ids: list[str]) -> pa.Table:
    return pa.table({"item_index": pa.array(range(1, len(ids) + 1), pa.int32()), "item_id": ids})


def test_vocab_may_grow_but_known_items_must_keep_their_index() -> None:
    check_vocab(items(["a", "b"]), items(["a", "b", "c"]), "old-model", "new-data")
    with pytest.raises(DataError, match=r"item 'b' was index 2.*vocab_from=old-model"):
        check_vocab(items(["a", "b"]), items(["a", "c", "b"]), "old-model", "new-data")


def test_merged_lora_state_scores_like_the_peft_model() -> None:
    torch.manual_seed(0)
    base = RecModel(build_config("tiny", num_items=30)).eval()
    peft_model = apply_lora(base, r=4, alpha=8)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # adapters that change the output
    ids = torch.tensor([[0, 3, 5, 7], [1, 2, 3, 4]])
    expected = peft_model.encode_users(ids) @ peft_model.item_embeddings().T

    plain = RecModel(build_config("tiny", num_items=30)).eval()
    plain.load_state_dict(merge_lora(peft_model.state_dict(), 8 / 4))
    got = plain.encode_users(ids) @ plain.item_embeddings().T
    assert torch.allclose(got, expected, atol=1e-5)


def test_plot_writes_a_png_of_loss_and_ndcg(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"epoch": 1, "loss": 4.0, "valid_ndcg@10": 0.1},
        {"event": "resumed", "epoch": 1, "step": 3},
        {"epoch": 2, "loss": 3.5, "valid_ndcg@10": 0.2},
        {"final": True, "epoch": 2, "test_ndcg@10": 0.2},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = plot_run(str(run))
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures["epochs"] == 2 and figures["curves"] == ["loss", "valid_ndcg@10"]
    with pytest.raises(RayrecError, match="no metrics.jsonl"):
        plot_run(str(tmp_path / "missing"))
