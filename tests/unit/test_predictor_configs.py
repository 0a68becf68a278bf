"""Serving configs: the shipped Serve YAML files, the app arguments and the HTTP request bodies."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from rec_serve.cli import add_deploy_arguments, serve_args
from rec_serve.schemas import BatchArgs, RecommendBody, ServeArgs
from rec_train.config import ConfigError, validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "serve").glob("*.yaml"))


def test_there_are_serve_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"local.yaml", "autoscale.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_for_serve_and_for_rayrec(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# serve ") and f"configs/serve/{path.name}" in text.splitlines()[0]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    [app] = schema.applications
    assert app.import_path == "rec_serve.app:build_app"
    args = validate(ServeArgs, app.args, source=str(path))
    assert args.model
    for deployment in app.deployments:
        assert deployment.name == "Recommender"
        BatchArgs.model_validate(deployment.user_config)


def test_serve_args_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"rayrec: replica: unknown key; did you mean 'replicas'"):
        validate(ServeArgs, {"model": "/m", "replica": 2}, source="rayrec")
    with pytest.raises(ConfigError, match="max_replicas .1. must be >= min_replicas .3."):
        validate(ServeArgs, {"model": "/m", "autoscaling": {"min_replicas": 3, "max_replicas": 1}})
    with pytest.raises(ConfigError, match="model: Field required"):
        validate(ServeArgs, {})
    with pytest.raises(ConfigError, match="user_tower: Input should be 'fp32', 'bf16' or 'compiled'"):
        validate(ServeArgs, {"model": "/m", "user_tower": "int8"})
    with pytest.raises(
        ConfigError, match="retrieval: Input should be 'exact', 'ivf', 'hnsw', 'fp16' or 'int8'"
    ):
        validate(ServeArgs, {"model": "/m", "retrieval": "lsh"})
    with pytest.raises(ConfigError, match="nprobe: Input should be greater than or equal to 1"):
        validate(ServeArgs, {"model": "/m", "retrieval": "ivf", "nprobe": 0})
    # `serve run rec_serve.app:build_app model=/m replicas=2` passes strings
    assert validate(ServeArgs, {"model": "/m", "replicas": "2"}).replicas == 2
    with pytest.raises(ConfigError, match="events: 'kafka://x' is not 'memory', 'none' or a redis"):
        validate(ServeArgs, {"model": "/m", "events": "kafka://x"})
    flags = ["--model", "/m", "--retrieval", "hnsw", "--ef-search", "64", "--events", "redis://h:6379/1"]
    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    args = validate(ServeArgs, serve_args(parser.parse_args(flags)))
    assert (args.retrieval, args.ef_search, args.nprobe) == ("hnsw", 64, 32)
    assert (args.events, args.max_user_events) == ("redis://h:6379/1", 200)


def test_recommend_body_rules() -> None:
    assert RecommendBody.model_validate({"user_id": "1"}).k == 10
    assert RecommendBody.model_validate({"history": []}).exclude_history is True
    with pytest.raises(ValidationError, match="give 'user_id'"):
        RecommendBody.model_validate({"k": 3})
    for bad in (
        {"user_id": "1", "k": 0},
        {"user_id": "1", "k": 1001},
        {"user_id": 1},
        {"history": "1"},
        {"user_id": "1", "k": "5"},
        {"user_id": "1", "colour": "red"},
        {"history": ["x"] * 1001},
    ):
        with pytest.raises(ValidationError):
            RecommendBody.model_validate(bad)


def test_deploy_flags_become_serve_args() -> None:
    import argparse

    from rec_serve.cli import add_deploy_arguments, serve_args

    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    args = validate(
        ServeArgs,
        serve_args(parser.parse_args(["--model", "/m", "--user-tower", "bf16", "--autoscale", "1:3"])),
    )
    assert args.user_tower == "bf16" and args.autoscaling is not None and args.autoscaling.max_replicas == 3
    assert validate(ServeArgs, serve_args(parser.parse_args(["--model", "/m"]))).user_tower == "fp32"
