"""The extended-test switch: slow cases that run only with ``QARVD_EXTENDED_TESTS=1`` (README, "Tests").

``extended_marks(reason)`` gives the marks for ``pytest.param(..., marks=...)``; ``@extended(reason)``
applies them to a test function.
"""

from __future__ import annotations

import os

import pytest

ENABLED = bool(os.environ.get("QARVD_EXTENDED_TESTS"))


def extended_marks(reason: str) -> tuple:
    return (pytest.mark.slow, pytest.mark.skipif(not ENABLED, reason=f"{reason}: set QARVD_EXTENDED_TESTS=1"))


def extended(reason: str):
    def apply(fn):
        for mark in extended_marks(reason):
            fn = mark(fn)
        return fn
    return apply
