"""Shared bits of the benchmark scripts: device header line and peak device memory."""

from __future__ import annotations

import datetime

import jax

__all__ = ["device_header", "peak_device_memory"]


def device_header() -> str:
    """``date ...  jax ...  device ...`` for the top of a benchmark table."""
    dev = jax.devices()[0]
    return f"date {datetime.date.today()}  jax {jax.__version__}  device {dev.device_kind} ({jax.default_backend()})"


def peak_device_memory() -> str:
    """Peak bytes in use on the first device, or a note when the backend does not report it (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (backend reports no memory stats)"
