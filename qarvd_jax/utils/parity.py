"""Array comparison reports shared by ``scripts/parity.py`` and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ArrayReport", "compare", "format_reports"]


@dataclass(frozen=True)
class ArrayReport:
    """Result of comparing one array against its golden value.

    ``passed`` is ``max|got - want| <= atol + rtol * max|want|`` (a whole-array criterion, so tiny
    reference entries do not blow up the relative error).
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    max_ref: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""


def compare(name: str, got, want, *, atol: float = 1e-4, rtol: float = 1e-4, note: str = "") -> ArrayReport:
    """Compare ``got`` with ``want`` in float64; a shape mismatch is a failed report, not an exception."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return ArrayReport(name, tuple(want.shape), float("inf"), float("inf"), float("nan"), atol, rtol, False,
                           f"shape mismatch: got {got.shape}, want {want.shape}")
    if want.size == 0:
        return ArrayReport(name, tuple(want.shape), 0.0, 0.0, 0.0, atol, rtol, True, note)
    diff = np.abs(got - want)
    max_abs = float(diff.max())
    max_ref = float(np.abs(want).max())
    max_rel = float((diff / np.maximum(np.abs(want), 1e-12)).max()) if max_abs > 0 else 0.0
    passed = bool(np.all(np.isfinite(got))) and max_abs <= atol + rtol * max_ref
    return ArrayReport(name, tuple(want.shape), max_abs, max_rel, max_ref, atol, rtol, passed, note)


def format_reports(reports: list[ArrayReport]) -> str:
    """A fixed-width table: name, shape, max abs err, max rel err, max |ref|, tolerance, PASS/FAIL."""
    rows = [("array", "shape", "max_abs", "max_rel", "max|ref|", "atol+rtol*ref", "status")]
    for r in reports:
        tol = r.atol + r.rtol * (r.max_ref if np.isfinite(r.max_ref) else 0.0)
        rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                     f"{r.max_ref:.3e}", f"{tol:.3e}", ("PASS" if r.passed else "FAIL") + (f"  {r.note}" if r.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines)
