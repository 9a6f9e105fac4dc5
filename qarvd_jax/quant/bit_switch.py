"""δ-GBS: δ-guided bit switching of activation precision over denoising steps (DVD-Quant).

The rule (``quantizer_variants.md`` §3(c) and U.1), restarted at every chunk of an autoregressive
video model: with F_t the model output of denoising step t and the relative change
``L1(t) = ||F_t - F_{t-1}||_1 / ||F_{t-1}||_1`` (t >= 1), keep an accumulator A of the changes since
the last reset. Step t runs at the high activation precision iff ``A >= delta``, and choosing high
resets ``A = 0``; after step t ran, ``A += L1(t)``. At the first step of a chunk there is no history:
A starts at ``init`` (default 1.0, "no history counts as a full relative change"), so the first step is
high for every ``delta <= init``; ``delta = 0`` gives high at every step, ``delta > init + sum of the
changes`` low at every step. The same two functions run inside the compiled chunk function (traced) and
on host arrays (:func:`schedule` of a scripted sequence of outputs), so tests check the code the
pipeline runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = ["BitSwitch", "decide", "update", "relative_l1", "schedule", "changes_to_outputs"]


@dataclass(frozen=True)
class BitSwitch:
    """δ-GBS controller settings: ``delta`` threshold, ``init`` accumulator at a chunk's first step,
    ``low``/``high`` activation bits (for the record; layers hold their own widths)."""

    delta: float
    init: float = 1.0
    low: int | None = 4
    high: int | None = 8

    def __post_init__(self):
        if not self.delta >= 0 or not self.init >= 0:
            raise ValueError(f"δ-GBS: delta={self.delta} and init={self.init} must be >= 0")

    def bits(self, high) -> int | None:
        return self.high if bool(high) else self.low


def relative_l1(cur, prev):
    """``||cur - prev||_1 / ||prev||_1`` in float32 (0 when prev is all zero and cur equals it)."""
    cur = jnp.asarray(cur, jnp.float32)
    prev = jnp.asarray(prev, jnp.float32)
    return jnp.sum(jnp.abs(cur - prev)) / jnp.maximum(jnp.sum(jnp.abs(prev)), 1e-20)


def decide(acc, delta):
    """High precision for this step (bool): the accumulated change reached ``delta``."""
    return acc >= delta


def update(acc, high, cur, prev, first):
    """Accumulator after a step: reset if it ran high, then add the step's change (none at the first
    step, which has no previous output)."""
    acc = jnp.where(high, 0.0, acc)
    return acc + jnp.where(first, 0.0, relative_l1(cur, prev))


def schedule(outputs: Sequence, sw: BitSwitch) -> list[bool]:
    """High/low per step for a scripted sequence of model outputs of one chunk (host reference)."""
    acc = jnp.float32(sw.init)
    prev = None
    out = []
    for t, f in enumerate(outputs):
        hi = decide(acc, sw.delta)
        out.append(bool(hi))
        acc = update(acc, hi, f, f if prev is None else prev, t == 0)
        prev = f
    return out


def changes_to_outputs(changes: Sequence[float], start: float = 1.0) -> list[np.ndarray]:
    """Outputs whose successive relative L1 changes are ``changes`` (a positive scalar series)."""
    out = [np.full((4,), start, np.float32)]
    for c in changes:
        out.append(out[-1] * np.float32(1.0 + c))
    return out
