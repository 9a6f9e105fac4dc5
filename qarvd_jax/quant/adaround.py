"""AdaRound primitives (Nagel et al. 2020) with the Q-ARVD constants (spec §5).

* rectified sigmoid ``h(V) = clamp(σ(V)·(ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1;
* soft weight ``Ŵ = (clamp(⌊W/Δ⌋ + h(V) + z, qmin, qmax) - z)·Δ`` (Δ, z frozen from the weight init;
  clamp with PyTorch gradient semantics);
* V init with ``h(V) = frac(W/Δ)``: ``V = -log((ζ - γ)/(frac - γ) - 1)``, so the soft weight starts at
  the clamped unrounded weight;
* regulariser ``λ·Σ(1 - |2h(V) - 1|^β)`` summed over every element (λ = 0.01);
* schedule on the 1-based iteration t (the PyTorch loss counter): no regulariser while
  ``t < warmup·iters`` (t = 1..399 for 2000 iterations, warm-up 0.2); β = 20 until the decay starts,
  then ``β(t) = 2 + 18·max(0, 1 - (t - 400)/1600)``;
* hard rounding merge ``W ← (clamp(⌊W/Δ⌋ + 1[V >= 0] + z, qmin, qmax) - z)·Δ``.

With ``zero_point_mode="real"`` the grid is ``⌊W/Δ + z⌋`` (z inside the floor); symmetric specs use
z = 0. Weights may have any layout the spec's granularity accepts (Q-ARVD: W[out, in], per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .fake_quant import QuantParams, QuantSpec, broadcast_params, clamp_ste, group_layout

__all__ = [
    "AdaRoundConfig",
    "rectified_sigmoid",
    "init_v",
    "soft_weight",
    "hard_weight",
    "beta_schedule",
    "rounding_regularizer",
    "rounding_loss",
]


@dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound hyper-parameters (Q-ARVD defaults)."""

    zeta: float = 1.1
    gamma: float = -0.1
    reg_weight: float = 0.01
    iters: int = 2000
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def __post_init__(self):
        if not self.zeta > 1.0 or not self.gamma < 0.0:
            raise ValueError(f"need zeta > 1 and gamma < 0, got zeta={self.zeta}, gamma={self.gamma}")
        if not 0.0 <= self.warmup < 1.0 or self.iters < 1:
            raise ValueError(f"need 0 <= warmup < 1 and iters >= 1, got warmup={self.warmup}, iters={self.iters}")

    @property
    def warmup_iters(self) -> float:
        """First iteration with the regulariser on and β decaying (400 for the defaults)."""
        return self.warmup * self.iters


def rectified_sigmoid(v: jax.Array, cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)`` (gradient 0 where clamped)."""
    return clamp_ste(jax.nn.sigmoid(v) * (cfg.zeta - cfg.gamma) + cfg.gamma, 0.0, 1.0)


def _grid(w: jax.Array, params: QuantParams, spec: QuantSpec):
    """``(layout, u, z_after, scale, z)``, arrays in the layout view: ``floor(u)`` is the lower grid
    point, ``z_after`` the zero point added after the floor (integer mode), ``z`` the zero point
    subtracted at dequantization."""
    lay = group_layout(w.shape, spec)
    scale, zp = broadcast_params(params, lay, spec)
    u = jnp.reshape(jnp.asarray(w, jnp.float32), lay.view_shape) / scale
    if zp is None:
        return lay, u, 0.0, scale, 0.0
    if spec.zero_point_mode == "integer":
        zp = jnp.round(zp)
        return lay, u, zp, scale, zp
    return lay, u + zp, 0.0, scale, zp


def init_v(w: jax.Array, params: QuantParams, spec: QuantSpec, cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """V (float32, shape of ``w``) with ``h(V) = frac(W/Δ)``; always finite since frac ∈ [0, 1]."""
    lay, u, _, _, _ = _grid(w, params, spec)
    frac = u - jnp.floor(u)
    v = -jnp.log((cfg.zeta - cfg.gamma) / (frac - cfg.gamma) - 1.0)
    return jnp.reshape(v, lay.shape)


def _merge(w, h_fn, params, spec):
    lay, u, z_after, scale, zp = _grid(w, params, spec)
    q = clamp_ste(jnp.floor(u) + h_fn(lay) + z_after, spec.qmin, spec.qmax)
    return jnp.reshape((q - zp) * scale, lay.shape).astype(jnp.asarray(w).dtype)


def soft_weight(w: jax.Array, v: jax.Array, params: QuantParams, spec: QuantSpec,
                cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """Soft-rounded weight ``(clamp(⌊W/Δ⌋ + h(V) + z) - z)·Δ`` in ``w.dtype`` (differentiable in V)."""
    _check_v(w, v)
    return _merge(w, lambda lay: jnp.reshape(rectified_sigmoid(v, cfg), lay.view_shape), params, spec)


def hard_weight(w: jax.Array, v: jax.Array, params: QuantParams, spec: QuantSpec) -> jax.Array:
    """Hard-rounded (merged) weight ``(clamp(⌊W/Δ⌋ + 1[V >= 0] + z) - z)·Δ`` in ``w.dtype``."""
    _check_v(w, v)
    return _merge(w, lambda lay: jnp.reshape((v >= 0).astype(jnp.float32), lay.view_shape), params, spec)


def _check_v(w, v):
    if jnp.shape(v) != jnp.shape(w):
        raise ValueError(f"V must have the weight's shape {jnp.shape(w)}, got {jnp.shape(v)}")


def beta_schedule(t, cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """β at 1-based iteration ``t`` (int or traced): ``beta_start`` before ``warmup·iters``, then linear
    to ``beta_end`` at ``iters`` (20 at t <= 400, 11 at 1200, 2 at 2000 for the defaults)."""
    t = jnp.asarray(t, jnp.float32)
    start = cfg.warmup_iters
    rel = (t - start) / (cfg.iters - start)
    decayed = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * jnp.maximum(0.0, 1.0 - rel)
    return jnp.where(t < start, cfg.beta_start, decayed)


def rounding_regularizer(vs, beta, cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """``λ·Σ(1 - |2h(V) - 1|^β)`` summed over every element of every array in the pytree ``vs``
    (one V, or the two V tensors of a dual-scale layer)."""
    leaves = jax.tree_util.tree_leaves(vs)
    if not leaves:
        raise ValueError("rounding_regularizer needs at least one V array")
    total = sum(jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v, cfg) - 1.0) ** beta) for v in leaves)
    return cfg.reg_weight * total


def rounding_loss(vs, t, cfg: AdaRoundConfig = AdaRoundConfig()) -> jax.Array:
    """Regulariser at 1-based iteration ``t``: 0 during warm-up (``t < warmup·iters``), else
    :func:`rounding_regularizer` with ``β = beta_schedule(t)``."""
    t = jnp.asarray(t, jnp.float32)
    reg = rounding_regularizer(vs, beta_schedule(t, cfg), cfg)
    return jnp.where(t < cfg.warmup_iters, 0.0, reg)
