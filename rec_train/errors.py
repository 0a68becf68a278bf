"""Errors a user can fix; the CLI prints their message and exits with status 2."""

from __future__ import annotations


class RayrecError(Exception):
    """Base for errors caused by input, config or environment; the message says what to change."""


class DataError(RayrecError):
    """Raw or prepared data that cannot be used: names the file, column and row count."""


class UnsafeCheckpointError(RayrecError):
    """A torch file whose pickle would build more than tensors and plain values: refused, never run."""
