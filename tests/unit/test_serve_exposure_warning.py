"""`rec-serve deploy` warns on stderr when other machines can reach it and no API key is set.

The command runs for real; its model folder is missing, so it stops with status 2 right after the flags
are checked, before Ray starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rec_serve.cli import main

WARNING = "rec-serve deploy: warning: --host"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "recs.example.com"])
def test_a_reachable_host_without_an_api_key_is_warned_about(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--model", str(tmp_path / "missing"), "--host", host, "--port", "8123"]) == 2
    err = capsys.readouterr().err
    assert f"{WARNING} {host} accepts connections from other machines and no API key is set" in err
    assert "port 8123" in err and "--api-key-env VAR" in err and "listen on 127.0.0.1" in err
    assert "error: " in err.splitlines()[-1]  # then the missing folder, as before


@pytest.mark.parametrize(
    "flags",
    [
        ["--host", "127.0.0.1"],
        ["--host", "127.0.0.2"],
        ["--host", "::1"],
        ["--host", "localhost"],
        [],  # the default: 127.0.0.1
        ["--host", "0.0.0.0", "--api-key-env", "RAYREC_API_KEY"],
    ],
)
def test_loopback_or_a_key_gets_no_warning(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--model", str(tmp_path / "missing"), *flags]) == 2
    assert WARNING not in capsys.readouterr().err
