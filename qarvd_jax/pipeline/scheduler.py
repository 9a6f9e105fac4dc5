"""Shifted flow-matching scheduler of Self-Forcing, as pure functions.

``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)``:

* base sigmas ``linspace(1, 0, N + 1)[:-1]`` (float32, torch's two-sided linspace),
* shift ``s * sigma / (1 + (s - 1) * sigma)``, timesteps ``= N * sigma`` (float32 tables),
* ``sigma(t)`` is the **nearest table entry** (``argmin |timesteps - t|``),
* noising ``x_t = (1 - sigma) x0 + sigma eps``; model output is the flow ``v ~ eps - x0``;
  ``x0 = x_t - sigma v`` (float32 here; float64 in the original, <= 1 ulp apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlowMatchTables", "flow_match_tables", "denoising_timesteps", "sigma_at", "add_noise", "flow_to_x0"]


@dataclass(frozen=True)
class FlowMatchTables:
    """The scheduler's lookup tables, float32 numpy ``[num_train_timesteps]`` each (decreasing)."""

    timesteps: np.ndarray
    sigmas: np.ndarray


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """Bit-exact float32 ``torch.linspace`` on CPU: ``start + step*i`` for the first half and
    ``end - step*(steps-1-i)`` for the second, each a fused multiply-add (one rounding), as torch's
    vectorised kernel does. Matches the fixture tables bit for bit."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    fwd = np.float64(start32) + step * idx
    bwd = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, fwd, bwd).astype(np.float32)


def flow_match_tables(shift: float = 5.0, num_train_timesteps: int = 1000, sigma_min: float = 0.0,
                      sigma_max: float = 1.0, extra_one_step: bool = True) -> FlowMatchTables:
    """Timestep and sigma tables of the training-mode scheduler (``set_timesteps(N, training=True)``)."""
    n = num_train_timesteps
    if extra_one_step:
        sig = _torch_linspace_f32(sigma_max, sigma_min, n + 1)[:-1]
    else:
        sig = _torch_linspace_f32(sigma_max, sigma_min, n)
    s = np.float32(shift)
    sig = (s * sig / (np.float32(1) + (s - np.float32(1)) * sig)).astype(np.float32)
    return FlowMatchTables(timesteps=(sig * np.float32(n)).astype(np.float32), sigmas=sig)


def denoising_timesteps(step_list, tables: FlowMatchTables, warp: bool = True) -> np.ndarray:
    """Timesteps actually fed to the model for a denoising step list (float32).

    With ``warp`` (Self-Forcing's ``warp_denoising_step``): ``cat(timesteps, [0])[N - step]``;
    without, the integer steps themselves.
    """
    steps = np.asarray(step_list, dtype=np.int64)
    n = tables.timesteps.shape[0]
    if np.any(steps < 0) or np.any(steps > n):
        raise ValueError(f"denoising steps {steps.tolist()} must lie in [0, {n}]")
    if not warp:
        return steps.astype(np.float32)
    table = np.concatenate([tables.timesteps, np.zeros(1, np.float32)])
    return table[n - steps].astype(np.float32)


def sigma_at(t: jax.Array, tables: FlowMatchTables) -> jax.Array:
    """Nearest-entry sigma for timesteps ``t`` (any shape, traced OK), float32."""
    ts = jnp.asarray(tables.timesteps)
    idx = jnp.argmin(jnp.abs(ts - jnp.asarray(t, jnp.float32)[..., None]), axis=-1)
    return jnp.asarray(tables.sigmas)[idx]


def _per_frame_sigma(t, x, tables):
    """sigma for ``t`` [B, F] (or scalar) broadcast against latents x [B, F, C, H, W]."""
    sigma = sigma_at(t, tables)
    if sigma.ndim == 0:
        return sigma
    if sigma.shape != x.shape[: sigma.ndim]:
        raise ValueError(f"timesteps {sigma.shape} do not match latents {x.shape}")
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, tables: FlowMatchTables) -> jax.Array:
    """``(1 - sigma(t)) * x0 + sigma(t) * noise`` in float32, cast to ``noise.dtype``."""
    sigma = _per_frame_sigma(t, x0, tables)
    out = (1.0 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
    return out.astype(noise.dtype)


def flow_to_x0(flow: jax.Array, xt: jax.Array, t: jax.Array, tables: FlowMatchTables) -> jax.Array:
    """``x0 = x_t - sigma(t) * flow`` in float32 (a higher-precision island), cast to ``flow.dtype``."""
    sigma = _per_frame_sigma(t, xt, tables)
    return (xt.astype(jnp.float32) - sigma * flow.astype(jnp.float32)).astype(flow.dtype)


def guided_flow(flow_cond: jax.Array, flow_uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance ``u + scale (c - u)``, computed in float32, returned in ``flow_cond``'s dtype."""
    c, u = flow_cond.astype(jnp.float32), flow_uncond.astype(jnp.float32)
    return (u + scale * (c - u)).astype(flow_cond.dtype)
