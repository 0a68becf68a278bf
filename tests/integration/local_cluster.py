"""Helpers for tests that start Ray: a free port, the processes to clean up, the serving tests' API key."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Serving tests that configure `api_key_env` read the key from this variable on the replicas, which inherit
# the environment of the process that starts Ray: the shared Ray (conftest.py) is started with it set.
TEST_API_KEY_ENV = "RAYREC_TEST_API_KEY"
TEST_API_KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(marker: str) -> list[int]:
    """Pids of this user's processes whose command line names `marker` (the cluster's temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if proc.stat().st_uid == os.getuid() and marker in cmdline:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
