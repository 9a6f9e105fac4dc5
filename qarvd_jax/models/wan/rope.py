"""Position encodings of the Wan DiT: the timestep sinusoid and 3-axis interleaved RoPE.

Both are higher-precision islands. The original computes them in float64; here the tables are
built in float64 on the host and the on-device arithmetic is arranged so that float32 keeps the
error near float32 rounding (~1e-7), whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "rope_angles_table",
    "rope_cos_sin",
    "apply_rope",
    "sinusoidal_embedding",
]

# ---------------------------------------------------------------------------------------------
# timestep sinusoid


_SIN_BASE = 256  # t = hi * 256 + lo + frac, with hi, lo in [0, 256): exact for 0 <= t < 65536


@functools.lru_cache(maxsize=None)
def _sinusoid_tables(freq_dim: int) -> tuple[np.ndarray, ...]:
    half = freq_dim // 2
    omega = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    n = np.arange(_SIN_BASE, dtype=np.float64)[:, None]
    lo = n * omega
    hi = n * _SIN_BASE * omega
    f32 = np.float32
    return (omega.astype(f32), np.cos(lo).astype(f32), np.sin(lo).astype(f32), np.cos(hi).astype(f32),
            np.sin(hi).astype(f32))


def sinusoidal_embedding(t: jax.Array, freq_dim: int) -> jax.Array:
    """``[cos(t*w_k), sin(t*w_k)]`` with ``w_k = 10000**(-k/half)``; cosine first (Wan convention).

    Args:
      t: timesteps, any shape, values in [0, 65536) (diffusion timesteps are in [0, 1000]).
      freq_dim: embedding width (even).

    Returns:
      float32 array ``t.shape + (freq_dim,)``. Accurate to ~3e-7 absolute: the angle is split as
      ``(hi*256 + lo) * w + frac * w`` with float64 host tables for the integer parts, so large
      angles never lose precision in float32 (the original uses float64).
    """
    omega, cos_lo, sin_lo, cos_hi, sin_hi = (jnp.asarray(a) for a in _sinusoid_tables(freq_dim))
    t = jnp.asarray(t, jnp.float32)
    sign = jnp.where(t < 0, -1.0, 1.0).astype(jnp.float32)[..., None]
    a = jnp.abs(t)
    whole = jnp.floor(a)
    frac = (a - whole)[..., None]
    whole_i = whole.astype(jnp.int32)
    lo_i = jnp.clip(whole_i % _SIN_BASE, 0, _SIN_BASE - 1)
    hi_i = jnp.clip(whole_i // _SIN_BASE, 0, _SIN_BASE - 1)
    # angle = A (hi part) + B (lo part) + C (fraction), combined with the addition formulas
    ca, sa = cos_hi[hi_i], sin_hi[hi_i]
    cb, sb = cos_lo[lo_i], sin_lo[lo_i]
    c_ab = ca * cb - sa * sb
    s_ab = sa * cb + ca * sb
    angle_c = frac * omega
    cc, sc = jnp.cos(angle_c), jnp.sin(angle_c)
    cos = c_ab * cc - s_ab * sc
    sin = (s_ab * cc + c_ab * sc) * sign
    return jnp.concatenate([cos, sin], axis=-1)


# ---------------------------------------------------------------------------------------------
# 3-axis RoPE


@functools.lru_cache(maxsize=None)
def rope_angles_table(head_dim: int, max_positions: int = 1024, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    """Per-axis rotation angles (float64) of Wan's 3-axis RoPE.

    Returns ``(angles_t [P, n_t], angles_h [P, n_h], angles_w [P, n_w])`` with ``P = max_positions``
    and ``n_*`` complex pairs per axis (``c - 2*(c//3)``, ``c//3``, ``c//3`` for ``c = head_dim/2``).
    Each axis has its own ladder: rope dim ``n = head_dim - 4*(head_dim//6)`` for time and
    ``2*(head_dim//6)`` for height/width, angle ``pos * theta**(-2j/n)``.
    """
    d = head_dim
    c = d // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    pos = np.arange(max_positions, dtype=np.float64)[:, None]
    tables = []
    for n_pairs, rope_dim in zip(pairs, dims):
        freqs = 1.0 / np.power(theta, np.arange(0, rope_dim, 2, dtype=np.float64)[: rope_dim // 2] / rope_dim)
        if freqs.shape[0] != n_pairs:
            raise ValueError(f"head_dim={head_dim}: RoPE ladder of {freqs.shape[0]} pairs does not match the "
                             f"axis split {pairs}")
        tables.append(pos * freqs[None, :])
    return tuple(tables)


@functools.lru_cache(maxsize=None)
def _rope_cos_sin_tables(head_dim: int, max_positions: int, theta: float) -> tuple[np.ndarray, ...]:
    out = []
    for ang in rope_angles_table(head_dim, max_positions, theta):
        out += [np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)]
    return tuple(out)


def rope_cos_sin(grid: tuple[int, int, int], start_frame: jax.Array | int, head_dim: int,
                 max_positions: int = 1024, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotation for every token of a (frames, rows, cols) grid.

    Args:
      grid: static token grid ``(f, h, w)``; tokens are ordered frame-major, then row, then column.
      start_frame: absolute index of the first frame (traced scalar allowed; 0 in training).

    Returns:
      ``(cos, sin)``, float32 ``[f*h*w, head_dim/2]``; pair order (t pairs, h pairs, w pairs).
    """
    f, h, w = grid
    if h > max_positions or w > max_positions or f > max_positions:
        raise ValueError(f"token grid {grid} exceeds the RoPE table of {max_positions} positions")
    ct, st, ch, sh, cw, sw = (jnp.asarray(a) for a in _rope_cos_sin_tables(head_dim, max_positions, theta))
    start = jnp.asarray(start_frame, jnp.int32)
    ct_f = jax.lax.dynamic_slice_in_dim(ct, start, f, axis=0)
    st_f = jax.lax.dynamic_slice_in_dim(st, start, f, axis=0)

    def expand(tab, axis):
        shape = [f, h, w, tab.shape[-1]]
        view = [1, 1, 1, tab.shape[-1]]
        view[axis] = tab.shape[0]
        return jnp.broadcast_to(tab.reshape(view), shape)

    cos = jnp.concatenate([expand(ct_f, 0), expand(ch[:h], 1), expand(cw[:w], 2)], axis=-1)
    sin = jnp.concatenate([expand(st_f, 0), expand(sh[:h], 1), expand(sw[:w], 2)], axis=-1)
    return cos.reshape(f * h * w, -1), sin.reshape(f * h * w, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs (2i, 2i+1) of ``x`` [B, L, H, D] by the per-token angles.

    ``cos``/``sin`` are ``[L, D/2]`` float32. The rotation runs in float32 and is cast back to
    ``x.dtype`` (interleaved convention, not rotate-half).
    """
    b, l, h, d = x.shape
    if cos.shape != (l, d // 2):
        raise ValueError(f"RoPE tables {cos.shape} do not match x {x.shape} (want [{l}, {d // 2}])")
    xf = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(b, l, h, d).astype(x.dtype)
