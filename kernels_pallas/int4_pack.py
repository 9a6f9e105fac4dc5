"""Two 4-bit integers per byte: the packed int4 weight format of the kernels.

Layout ("half-split" along the packed axis, default the last one = K):
for an array ``w`` whose packed axis has even length ``L``, byte ``j`` of
``pack_int4(w)`` (``0 <= j < L/2``) holds

* low nibble (bits 0-3):  ``w[..., j]``            (first half of the axis)
* high nibble (bits 4-7): ``w[..., j + L // 2]``   (second half of the axis)

so ``packed.shape[axis] == L // 2`` and the dtype is ``uint8``. Unlike the
GPTQ/AWQ "even index in the low nibble" order, unpacking a contiguous tile of
bytes yields two *contiguous* tiles of weights (columns ``[j0, j1)`` and
``[L/2 + j0, L/2 + j1)``), so a matmul kernel needs no lane interleave: it
multiplies each half against the matching activation tile. The layout depends
only on ``L``, never on the kernel's tile sizes, so it is also the checkpoint
format.

``signed=True`` stores two's-complement nibbles (values -8..7, sign-extended on
unpack); ``signed=False`` stores plain nibbles (values 0..15). Both round-trip
exactly; ``pack_int4`` raises ``ValueError`` on concrete out-of-range input (a
traced input is masked to 4 bits without a check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pack_int4", "unpack_int4", "unpack_nibbles", "int4_range"]


def int4_range(signed: bool) -> tuple[int, int]:
  """(min, max) of a 4-bit integer: (-8, 7) if ``signed`` else (0, 15)."""
  return (-8, 7) if signed else (0, 15)


def _check_axis(shape, axis: int, what: str) -> int:
  if not shape:
    raise ValueError(f"{what}: expected an array with at least one axis, got a scalar")
  axis = axis % len(shape)
  return axis


def pack_int4(w: jax.Array, *, signed: bool = True, axis: int = -1) -> jax.Array:
  """Packs 4-bit integers two per byte along ``axis`` (half-split layout).

  Args:
    w: integer array (any int/uint dtype, incl. ``jnp.int4``/``jnp.uint4``);
      values in -8..7 (``signed``) or 0..15; ``w.shape[axis]`` must be even.
    signed: nibble interpretation, see the module docstring.
    axis: the axis to pack (the contracting axis K for matmul weights).

  Returns:
    ``uint8`` array, ``w.shape`` with ``shape[axis]`` halved.
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.integer):
    raise ValueError(f"pack_int4: expected an integer array, got dtype {w.dtype}")
  axis = _check_axis(w.shape, axis, "pack_int4")
  length = w.shape[axis]
  if length % 2:
    raise ValueError(
        f"pack_int4: axis {axis} of shape {w.shape} has odd length {length}; "
        "it must be even")
  lo_lim, hi_lim = int4_range(signed)
  if not isinstance(w, jax.core.Tracer) and w.size:
    w_np = np.asarray(w).astype(np.int64)
    if w_np.min() < lo_lim or w_np.max() > hi_lim:
      raise ValueError(
          f"pack_int4: values must lie in [{lo_lim}, {hi_lim}] for "
          f"signed={signed}, got range [{w_np.min()}, {w_np.max()}]")
  v = w.astype(jnp.int32) & 0xF
  half = length // 2
  lo = jax.lax.slice_in_dim(v, 0, half, axis=axis)
  hi = jax.lax.slice_in_dim(v, half, length, axis=axis)
  return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_nibbles(packed: jax.Array, *, signed: bool = True):
  """Splits bytes into their (low, high) nibbles as ``int32`` arrays.

  Pure elementwise integer ops (and, shift), so kernels call it on tiles.
  """
  p = packed.astype(jnp.int32)
  if signed:
    # Arithmetic right shifts sign-extend bit 3 (low) or bit 7 (high).
    return (p << 28) >> 28, (p << 24) >> 28
  return p & 0xF, (p >> 4) & 0xF


def unpack_int4(packed: jax.Array, *, signed: bool = True, axis: int = -1,
                dtype=jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_int4`: ``packed.shape[axis]`` doubles.

  Args:
    packed: ``uint8`` (or ``int8``) array in the half-split layout.
    signed: nibble interpretation used when packing.
    axis: the packed axis.
    dtype: integer result dtype (default ``int8``; both ranges fit).
  """
  packed = jnp.asarray(packed)
  if packed.dtype not in (jnp.uint8, jnp.int8):
    raise ValueError(
        f"unpack_int4: expected uint8 (or int8) bytes, got dtype {packed.dtype}")
  axis = _check_axis(packed.shape, axis, "unpack_int4")
  lo, hi = unpack_nibbles(packed, signed=signed)
  return jnp.concatenate([lo, hi], axis=axis).astype(dtype)
