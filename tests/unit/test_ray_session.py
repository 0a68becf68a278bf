"""The one rule for what Ray workers inherit: every AWS_* and MLFLOW_* variable, nothing else."""

from __future__ import annotations

import os

import pytest

from rec_train.ray_session import forwarded_env, worker_runtime_env


def test_every_aws_variable_and_nothing_else_is_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    assert worker_runtime_env() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ca.pem")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_REGION", "")  # empty: not forwarded
    monkeypatch.setenv("HOME_AWS_X", "no")
    monkeypatch.setenv("RAYREC_SECRET", "no")
    expected = {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_SESSION_TOKEN": "t",
        "AWS_CA_BUNDLE": "/etc/ca.pem",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    }
    assert forwarded_env() == expected
    assert worker_runtime_env() == {"env_vars": expected}
