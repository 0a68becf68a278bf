"""Freeze policies and LoRA: exactly which parameters train."""

from __future__ import annotations

import pytest
import torch

from rec_train.model import RecModel, build_config
from rec_train.model.peft_utils import apply_freeze_policy, apply_lora, trainable_parameter_names

LLAMA_BLOCK = [
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
]
HEAD = [
    "pointwise.dense.bias",
    "pointwise.dense.weight",
    "pointwise.out_proj.bias",
    "pointwise.out_proj.weight",
]


def block(i: int) -> list[str]:
    return [f"encoder.layers.{i}.{name}" for name in LLAMA_BLOCK]


@pytest.fixture
def model() -> RecModel:
    torch.manual_seed(0)
    return RecModel(build_config("tiny", num_hidden_layers=3, pointwise_head="rating"))


def test_freeze_policies(model: RecModel) -> None:
    everything = sorted(name for name, _ in model.named_parameters())
    assert apply_freeze_policy(model, "none") == everything
    assert apply_freeze_policy(model, "embeddings") == sorted(
        block(0) + block(1) + block(2) + ["encoder.norm.weight"] + HEAD
    )
    assert apply_freeze_policy(model, "backbone") == sorted(["items.id_embeddings.weight"] + HEAD)
    assert apply_freeze_policy(model, "all_but_top_n", top_n=1) == sorted(
        block(2) + ["encoder.norm.weight"] + HEAD
    )
    assert apply_freeze_policy(model, "all_but_top_n", top_n=2) == sorted(
        block(1) + block(2) + ["encoder.norm.weight"] + HEAD
    )
    assert trainable_parameter_names(model) == sorted(block(1) + block(2) + ["encoder.norm.weight"] + HEAD)


def test_freeze_policy_errors(model: RecModel) -> None:
    with pytest.raises(ValueError, match="not one of"):
        apply_freeze_policy(model, "heads")
    with pytest.raises(ValueError, match="top_n=4"):
        apply_freeze_policy(model, "all_but_top_n", top_n=4)


def test_frozen_parameters_do_not_move(model: RecModel) -> None:
    apply_freeze_policy(model, "backbone")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[2, 3, 4]])).loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["items.id_embeddings.weight"], after["items.id_embeddings.weight"])


def test_lora_on_attention_and_mlp(model: RecModel) -> None:
    peft_model = apply_lora(model, r=2, alpha=4)
    projections = [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    expected = [
        f"base_model.model.encoder.layers.{i}.{proj}.lora_{ab}.default.weight"
        for i in range(3)
        for proj in projections
        for ab in "AB"
    ]
    head = [
        f"base_model.model.pointwise.modules_to_save.default.{name[len('pointwise.') :]}" for name in HEAD
    ]
    assert trainable_parameter_names(peft_model) == sorted(expected + head)
    # the adapted model still runs both paths, and merges back into a plain RecModel
    history = torch.tensor([[1, 2, 3]])
    out = peft_model(history, labels=torch.tensor([[2, 3, 4]]))
    out.loss.backward()
    assert peft_model(history, candidates=torch.tensor([5]), targets=torch.tensor([4.0])).loss.ndim == 0
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, RecModel)
    assert merged.encode_users(history).shape == (1, 16)


@pytest.mark.parametrize(
    ("encoder", "extra", "adapted"),
    [
        ("sasrec", {}, ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "down_proj", "up_proj"]),
        ("hstu", {}, ["o_proj", "uvqk_proj"]),
        ("gpt2", {}, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        (
            "qwen2",
            {},
            [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")],
        ),
        (
            "bert",
            {"objective": "masked_item"},
            [
                "attention.output.dense",
                "attention.self.key",
                "attention.self.query",
                "attention.self.value",
                "intermediate.dense",
                "output.dense",
            ],
        ),
    ],
)
def test_lora_targets_per_encoder(encoder: str, extra: dict, adapted: list[str]) -> None:
    peft_model = apply_lora(
        RecModel(build_config("tiny", encoder=encoder, num_hidden_layers=1, **extra)), r=2
    )
    expected = [
        f"base_model.model.encoder.layers.0.{m}.lora_{ab}.default.weight" for m in adapted for ab in "AB"
    ]
    assert trainable_parameter_names(peft_model) == sorted(expected)
    # adapters that change the output merge into weights that give the same output
    history = torch.tensor([[1, 2, 3, 4]])
    peft_model.eval()
    with torch.no_grad():
        base_users = peft_model.encode_users(history)  # lora_B starts at zero: the base model's output
        torch.manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        adapted_users = peft_model.encode_users(history)
        assert not torch.allclose(adapted_users, base_users, atol=1e-3)
        merged = peft_model.merge_and_unload()
        assert torch.allclose(merged.encode_users(history), adapted_users, atol=1e-5)
