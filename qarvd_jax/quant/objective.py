"""Chunk weights and the frame-weighted layer reconstruction loss (Q-ARVD spec §3 and §5).

Sensitivity: ``s_k = e_k / Σ_j e_j`` from the per-chunk final-latent MSEs ``e_k``; chunk weights
``ω_k = s_k / mean(s)`` (mean 1); calibration sample i of chunk c(i) gets weight ``ω_{c(i)}``.
Dual-scale layers use ω ≡ 1 (pass ``sample_weights=None``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sensitivity_from_errors", "chunk_weights", "chunk_sample_weights", "reconstruction_loss",
           "validate_sensitivity"]


def validate_sensitivity(values, num_chunks: int | None = None, source: str = "sensitivity") -> list[float]:
    """A checked chunk-sensitivity vector as Python floats.

    Refuses (ValueError naming ``source``) anything that is not a non-empty 1-D list of finite numbers
    >= 0 with a positive sum, and, when ``num_chunks`` is given, a length other than the video's number of
    chunks. Any positive scale is accepted (only the ratios matter: ω = s / mean(s)).
    """
    import math

    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{source}: expected a list of per-chunk numbers, got {type(values).__name__}")
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{source}: every entry must be a number, got {list(values)!r}") from None
    if not vals:
        raise ValueError(f"{source}: the sensitivity vector is empty")
    bad = [v for v in vals if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"{source}: sensitivities must be finite and >= 0, got {bad} in {vals}")
    if sum(vals) <= 0:
        raise ValueError(f"{source}: the sensitivities sum to 0; at least one chunk must have a positive value")
    if num_chunks is not None and len(vals) != num_chunks:
        raise ValueError(f"{source}: {len(vals)} chunk sensitivities but the video has {num_chunks} chunks "
                         "(same --num-frames as the sensitivity run?)")
    return vals


def _vector(name: str, v) -> jax.Array:
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {v.shape}")
    return v


def sensitivity_from_errors(errors) -> jax.Array:
    """``s = e / Σ e`` for per-chunk errors ``e`` [K] (float32 [K], sums to 1)."""
    e = _vector("errors", errors)
    return e / jnp.sum(e)


def chunk_weights(sensitivity) -> jax.Array:
    """``ω = s / mean(s)`` for a sensitivity vector ``s`` [K] (any positive scale). float32 [K]."""
    s = _vector("sensitivity", sensitivity)
    return s / jnp.mean(s)


def chunk_sample_weights(omega, chunk_ids) -> jax.Array:
    """Per-sample weights ``ω[chunk_ids]``: omega [K], chunk_ids int [N] -> float32 [N].

    An id outside ``[0, K)`` gives NaN (no wrap-around or clamping), so a bad id poisons the loss
    instead of silently reusing another chunk's weight."""
    omega = _vector("omega", omega)
    chunk_ids = jnp.asarray(chunk_ids)
    if chunk_ids.ndim != 1 or not jnp.issubdtype(chunk_ids.dtype, jnp.integer):
        raise ValueError(f"chunk_ids must be a 1-D integer array, got {chunk_ids.dtype} {chunk_ids.shape}")
    valid = (chunk_ids >= 0) & (chunk_ids < omega.shape[0])
    return jnp.where(valid, jnp.take(omega, jnp.clip(chunk_ids, 0, omega.shape[0] - 1)), jnp.nan)


def reconstruction_loss(y_hat: jax.Array, y: jax.Array, sample_weights: jax.Array | None = None) -> jax.Array:
    """Q-ARVD layer reconstruction loss (float32 scalar).

    y_hat, y: ``[B, T..., C]`` (B samples, any token axes, C output channels), same shape.
    sample_weights: ``[B]`` ω per sample, or None for ones.

    ``L = (1/(B·C)) Σ_i Σ_c ω_i Σ_t (ŷ_{i,t,c} - y_{i,t,c})²``: the squared error is **summed over the
    token axes** and averaged over samples and output channels (PyTorch
    ``((pred - tgt)**2).sum(1) * ω`` then ``.mean()``). So it is T times the mean over all elements.
    """
    y_hat, y = jnp.asarray(y_hat), jnp.asarray(y)
    if y_hat.shape != y.shape:
        raise ValueError(f"y_hat and y must have the same shape, got {y_hat.shape} and {y.shape}")
    if y.ndim < 2:
        raise ValueError(f"reconstruction_loss needs [B, T..., C] (at least 2 axes), got shape {y.shape}")
    d = y_hat.astype(jnp.float32) - y.astype(jnp.float32)
    per_sample_channel = jnp.sum(d * d, axis=tuple(range(1, y.ndim - 1)))  # [B, C]
    if sample_weights is not None:
        w = jnp.asarray(sample_weights, jnp.float32)
        if w.shape != (y.shape[0],):
            raise ValueError(f"sample_weights must have shape ({y.shape[0]},), got {w.shape}")
        per_sample_channel = per_sample_channel * w[:, None]
    return jnp.mean(per_sample_channel)
