"""Helpers for tests that start their own Ray processes: a free port, and the processes to clean up."""

from __future__ import annotations

import os
import socket
from pathlib import Path


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
