"""Every YAML under configs/ starts with the command that runs it and validates with that command's
config; a training config also builds its model (on the meta device), so a bad committed config fails
here, not in a Ray worker. The cluster/ YAML files are checked by test_cluster_configs.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rec_serve.schemas import BatchArgs, ServeArgs
from rec_train.config import load_config, validate
from rec_train.data.config import PrepareConfig
from rec_train.model import SIZES, count_parameters
from rec_train.train.config import TrainConfig
from rec_train.train.model_init import fresh_model_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def check_prepare(path: Path) -> None:
    load_config(PrepareConfig, path)


def check_training(path: Path) -> None:
    config = load_config(TrainConfig, path)
    finetune = path.relative_to(CONFIGS).parts[0] == "finetune"
    assert (config.finetune is not None) == finetune, f"{path}: a finetune section iff under configs/finetune"
    num_items = SIZES[config.model.size]["num_items"]  # the dataset's in a run
    model = fresh_model_config(config, num_items, config.model.max_seq_len)
    assert count_parameters(model)["total"] > 0


def check_serve(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        assert app.import_path == "rec_serve.app:build_app", f"{path}: {app.import_path}"
        validate(ServeArgs, app.args, source=f"{path} applications[{app.name}].args")
        for deployment in app.deployments:
            where = f"{path} {app.name}.{deployment.name}.user_config"
            validate(BatchArgs, deployment.user_config or {}, source=where)


# configs/<folder>/: the commands that run its files, and the check of their config
KINDS: dict[str, tuple[tuple[str, ...], Callable[[Path], None]]] = {
    "data": (("rec-train prepare",), check_prepare),
    "pretrain": (("rec-train pretrain",), check_training),
    "finetune": (("rec-train finetune",), check_training),
    "serve": (("serve run", "serve deploy"), check_serve),
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_validates_with_the_config_of_its_command(path: Path) -> None:
    relative = path.relative_to(REPO).as_posix()
    kind = path.relative_to(CONFIGS).parts[0]
    assert kind in KINDS, f"{relative}: no config class is known for configs/{kind}/; add it to KINDS"
    commands, check = KINDS[kind]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and relative in first, (
        f"{relative}: the first line is the command that runs it"
    )
    assert any(command in first for command in commands), f"{relative}: {first!r} runs none of {commands}"
    check(path)


def test_every_kind_of_config_is_shipped() -> None:
    kinds = {p.relative_to(CONFIGS).parts[0] for p in SHIPPED}
    assert kinds == set(KINDS)
