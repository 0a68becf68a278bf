"""Checkpoints are read without running pickled code: real DeepSpeed engines (CPU, gloo, one process) write
ZeRO-0, -2 and -3 checkpoints; a payload planted in each file that resuming, consolidation (export) or
`--init-from` reads is refused with an error naming the file, and never runs. Untouched checkpoints, and
those of the older format with a pickled RNG state, still load.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from rec_serve.synthetic import write_tiny_model
from rec_train.config import load_config
from rec_train.errors import UnsafeCheckpointError
from rec_train.model import RecConfig, RecModel
from rec_train.train import checkpoint as ckpt
from rec_train.train import safe_load
from rec_train.train.config import TrainConfig
from rec_train.train.deepspeed_config import deepspeed_config
from rec_train.train.model_init import apply_finetune_policy, build_model
from rec_train.train.optim import build_optimizer, lr_lambda
from rec_train.train.saved_model import load_model

NUM_ITEMS = 30
HISTORY = torch.tensor([[0, 3, 5, 7], [1, 2, 3, 4]])
CANDIDATES = torch.tensor([6, 9])


class Payload:
    """Unpickling this creates `marker`: the stand-in for the code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@dataclass
class Run:
    """A DeepSpeed engine and the checkpoint it wrote after one training step."""

    stage: int
    config: TrainConfig
    engine: Any
    folder: Path


def make_engine(stage: int, *overrides: str, seed: int = 0) -> tuple[TrainConfig, Any, RecConfig]:
    """The model (adapted for fine-tuning when the overrides say so) in a DeepSpeed engine, as the loop
    builds them; the model's config besides."""
    import deepspeed

    base = ["data.path=unused", "model.size=tiny", f"deepspeed.zero_stage={stage}", "train.batch_size=2"]
    config = load_config(TrainConfig, None, [*base, *overrides])
    torch.manual_seed(seed)
    model = build_model(config, NUM_ITEMS, None, pa.table({}), None)
    model_config = model.config
    if config.finetune is not None:
        model = apply_finetune_policy(model, config.finetune)
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.data.normal_(0, 0.5)  # adapters and a head that change the output
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0.0, 0.1))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, 1, on_gpu=False, hidden_size=32), dist_init_required=False,
    )  # fmt: skip
    return config, engine, model_config


def step(engine: Any, head: str | None) -> float:
    """One optimizer step on a fixed batch (ratings, clicks or next items); returns the loss."""
    if head is not None:
        targets = torch.tensor([4.0, 2.0] if head == "rating" else [1.0, 0.0])
        loss = engine(HISTORY, candidates=CANDIDATES, targets=targets).loss
    else:
        loss = engine(HISTORY, labels=torch.tensor([[3, 5, 7, 8], [2, 3, 4, 5]])).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def train_one_step(stage: int, folder: Path, *overrides: str) -> Run:
    """Build the model and engine as the loop does, take one step, save a checkpoint into `folder`."""
    config, engine, model_config = make_engine(stage, *overrides)
    loss = step(engine, model_config.pointwise_head)
    state = ckpt.TrainerState(epoch=1, step=engine.global_steps, metrics={"loss": loss})
    run_info = {"config": config.model_dump(mode="json"), "init_from": None, "run": str(folder.parent)}
    ckpt.save(engine, folder, state, 0, model_config, run_info)
    return Run(stage, config, engine, folder)


LORA = ("finetune.lora_rank=2", "finetune.lora_alpha=4")
LORA_RUNS = {
    2: ("model.overrides.pointwise_head=rating", *LORA),
    3: ("model.overrides.pointwise_head=click", *LORA),
}


@pytest.fixture(scope="module")
def runs(process_group: None, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """ZeRO-0 and ZeRO-3 pre-training; ZeRO-2 LoRA fine-tuning with a rating head."""
    return {
        stage: train_one_step(stage, tmp_path_factory.mktemp(f"zero{stage}") / "checkpoint", *extra)
        for stage, extra in ((0, ()), (2, LORA_RUNS[2]), (3, ()))
    }


@pytest.fixture(scope="module")
def lora_click(process_group: None, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """ZeRO-3 LoRA fine-tuning with a click head."""
    return train_one_step(3, tmp_path_factory.mktemp("lora3") / "checkpoint", *LORA_RUNS[3])


def engine_state(run: Run) -> dict[str, torch.Tensor]:
    """The engine module's full weights (gathered under ZeRO-3)."""
    import deepspeed

    module = run.engine.module
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if run.stage == 3 else nullcontext()
    with gather:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def copy_run(run: Run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.folder, tmp_path / "checkpoint"))


def plant(path: Path, marker: Path) -> None:
    """Rewrite the torch file `path` with a payload next to its real content."""
    content = safe_load.load(path, numpy_arrays=True)
    content["payload"] = Payload(marker)
    torch.save(content, path)


def pickled_rng_state() -> dict[str, Any]:
    """The RNG state as checkpoints held it before it moved to JSON (torch.save of tuples and arrays)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


# ------------------------------------------------------------------ what still loads


@pytest.mark.parametrize("stage", [0, 3])
def test_a_checkpoint_resumes_and_consolidates_without_pickle(runs: dict[int, Run], stage: int) -> None:
    run = runs[stage]
    assert (run.folder / "rng_state_0.json").is_file() and not (run.folder / "rng_state_0.pt").exists()
    state = ckpt.restore(run.engine, run.folder, 0)
    assert (state.epoch, state.step) == (1, 1)
    consolidated = ckpt.model_from_checkpoint(run.folder).state_dict()
    for key, value in engine_state(run).items():
        assert torch.equal(consolidated[key], value), key


def test_resume_restores_every_rng_from_json(runs: dict[int, Run], tmp_path: Path) -> None:
    run = runs[0]
    folder = copy_run(run, tmp_path)
    (folder / "rng_state_0.json").write_text(json.dumps(ckpt.rng_state()))
    expected = draws()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    ckpt.restore(run.engine, folder, 0)
    assert draws() == expected


def test_an_older_checkpoint_with_a_pickled_rng_state_still_resumes(
    runs: dict[int, Run], tmp_path: Path
) -> None:
    run = runs[3]
    folder = copy_run(run, tmp_path)
    (folder / "rng_state_0.json").unlink()
    torch.save(pickled_rng_state(), folder / "rng_state_0.pt")
    expected = draws()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    assert ckpt.restore(run.engine, folder, 0).epoch == 1
    assert draws() == expected


@pytest.mark.parametrize("stage", [2, 3])
def test_a_lora_checkpoint_consolidates_to_the_merged_model(
    runs: dict[int, Run], lora_click: Run, stage: int
) -> None:
    """ZeRO-2 with a rating head, ZeRO-3 with a click head: one model, adapters merged, scoring as the
    engine's adapted model did."""
    run = runs[2] if stage == 2 else lora_click
    peft_model = run.engine.module.eval()
    with torch.no_grad():
        expected_scores = peft_model.encode_users(HISTORY) @ peft_model.item_embeddings().T
        expected_logits = peft_model(HISTORY, candidates=CANDIDATES).pointwise_logits
    model = ckpt.model_from_checkpoint(run.folder)
    assert type(model) is RecModel and not any("lora" in key for key in model.state_dict())
    assert model.config.pointwise_head == ("rating" if stage == 2 else "click")
    assert torch.allclose(model.encode_users(HISTORY) @ model.item_embeddings().T, expected_scores, atol=1e-5)
    assert torch.allclose(model(HISTORY, candidates=CANDIDATES).pointwise_logits, expected_logits, atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_lora_run_resumes_its_adapters_head_and_optimizer(
    runs: dict[int, Run], lora_click: Run, stage: int
) -> None:
    """A fresh engine (other initial weights) restored from the LoRA checkpoint holds the run's adapters and
    head, and its next step (the optimizer's moments restored too) lands where the run's own next step does."""
    run = runs[2] if stage == 2 else lora_click
    _, engine, model_config = make_engine(stage, *LORA_RUNS[stage], seed=1)
    fresh = Run(stage, run.config, engine, run.folder)
    state = ckpt.restore(engine, run.folder, 0)
    assert (state.epoch, state.step, engine.global_steps) == (1, 1, 1)
    expected = engine_state(run)
    restored = engine_state(fresh)
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], expected[k]) for k in expected)
    losses = []
    for resumed in (fresh, run):  # the same batch and dropout masks
        resumed.engine.train()
        torch.manual_seed(7)
        losses.append(step(resumed.engine, model_config.pointwise_head))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    expected, restored = engine_state(run), engine_state(fresh)
    assert all(torch.equal(restored[k], expected[k]) for k in expected)


# ------------------------------------------------------------------ what is refused


def test_the_planted_payload_runs_when_unpickled_without_restriction(
    runs: dict[int, Run], tmp_path: Path
) -> None:
    """The control: the payload the tests below plant is live."""
    folder, marker = copy_run(runs[0], tmp_path), tmp_path / "ran"
    path = folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


MODEL_STATES = "deepspeed/state/mp_rank_00_model_states.pt"
ZERO_MODEL_STATES = "deepspeed/state/zero_pp_rank_0_mp_rank_00_model_states.pt"
ZERO_OPTIM_STATES = "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize(
    ("path", "stage", "file"),
    [
        ("resume", 0, MODEL_STATES),
        ("resume", 2, ZERO_OPTIM_STATES),
        ("resume", 3, ZERO_MODEL_STATES),
        ("resume", 3, "rng_state_0.pt"),
        ("consolidation", 0, MODEL_STATES),
        ("consolidation", 2, MODEL_STATES),
        ("consolidation", 3, ZERO_OPTIM_STATES),
        ("init_from", 0, MODEL_STATES),
        ("init_from", 3, ZERO_MODEL_STATES),
    ],
)
def test_a_pickle_payload_is_refused_naming_the_file_and_never_runs(
    runs: dict[int, Run], tmp_path: Path, path: str, stage: int, file: str
) -> None:
    run = runs[stage]
    folder, marker = copy_run(run, tmp_path), tmp_path / "ran"
    target = folder / file
    if file == "rng_state_0.pt":  # the older format's RNG file
        (folder / "rng_state_0.json").unlink()
        torch.save(pickled_rng_state(), target)
    plant(target, marker)

    with pytest.raises(UnsafeCheckpointError) as refused:
        if path == "resume":
            ckpt.restore(run.engine, folder, 0)
        elif path == "consolidation":  # what `rec-train export` runs
            ckpt.model_from_checkpoint(folder)
        else:
            build_model(run.config, NUM_ITEMS, None, pa.table({}), init_from=str(folder))
    message = str(refused.value)
    assert message.startswith(f"{target}: refused to load") and "refers to io.open" in message
    assert "re-create this one by running its training again" in message
    assert not marker.exists()


def test_an_exported_folder_with_pickle_weights_is_refused(tmp_path: Path) -> None:
    folder, marker = write_tiny_model(tmp_path / "model"), tmp_path / "ran"
    torch.save({"payload": Payload(marker)}, folder / "pytorch_model.bin")
    model, _ = load_model(str(folder))  # safetensors next to it: the pickle is never opened
    assert isinstance(model, RecModel) and not marker.exists()

    (folder / "model.safetensors").unlink()
    with pytest.raises(
        UnsafeCheckpointError, match=re.escape(f"{folder}: no model.safetensors, only pickle")
    ):
        load_model(str(folder))
    assert not marker.exists()
