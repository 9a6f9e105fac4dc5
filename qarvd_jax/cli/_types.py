"""argparse ``type=`` checks: a bad number is a one-line usage error (exit code 2) naming the flag."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "nonnegative_int"]


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, batch sizes)."""
    return _int(text, 1, ">= 1")


def nonnegative_int(text: str) -> int:
    """An int >= 0 (iterations, steps that may be zero)."""
    return _int(text, 0, ">= 0")
