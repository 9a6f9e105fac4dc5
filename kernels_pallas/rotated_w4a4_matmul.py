"""Rotated W4A4 / W4A8 matmul (DVD-Quant ARQ): dynamic Λ-scaled per-token codes x packed int4 weights.

Input: the already-rotated activations ``xr`` (M, K) float32 (the online Walsh-Hadamard transform and the
per-call channel scale Λ, a reduction over all tokens, are one separate pass before this op) and Λ per
K-block of ``lam_block`` channels. The op computes, per token ``t`` and K-block ``b``
(``qarvd_jax.quant.methods.dvd_quant.integer_apply``)::

    u = xr / Λ;  s_t = max((max_k u - min_k u) / L, 1e-8);  z_t = round(-min_k u / s_t)   (L = 2^a - 1)
    q = clip(round(u / s_t) + z_t, 0, L) - c                 (int8, c = 2^(a - 1); a = 4 or 8)
    P_b = sum_{k in b} q (q_w - z_w) + (c - z_t) colsum_b     (exact int32)
    y = s_t s_w sum_b λ_b P_b + bias                          (float32 epilogue)

``q_w`` are the unsigned 4-bit weight codes (0..15) packed two per byte in the half-split layout of
:mod:`kernels_pallas.int4_pack`; ``colsum_b[n] = sum_{k in b} (q_w - z_w)``. The activation width is the
traced flag ``high`` (``a_bits_high`` if set, else ``a_bits``): one compiled kernel serves the δ-GBS
A4/A8 switch with the same int4 weight codes. ``sum_k q (q_w - z_w)`` is computed as
``sum_k q q_w - z_w sum_k q`` (the kernels multiply the raw nibbles; equal in int32).

Backends: ``'pallas_tpu'`` (:mod:`kernels_pallas.tpu_rotated_matmul`), ``'xla'`` / ``'reference'``: the
pure-jnp reference below (``lax.dot_general`` s8 x s8 -> s32 per K-block). No Mosaic GPU variant.
Kernel constraints (:func:`rotated_kernel_ok`): ``lam_block % 128 == 0``, ``K % (2 lam_block) == 0``,
``N % 128 == 0``; any M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import int4_pack

__all__ = ["token_codes", "act_levels", "rotated_kernel_ok", "rotated_w4a4_matmul",
           "rotated_w4a4_matmul_reference", "ROTATED_BACKENDS"]

ROTATED_BACKENDS = ("pallas_tpu", "xla", "reference")


def token_codes(u, bits):
  """Per-token asymmetric min-max codes of u [..., K] at ``bits`` (traced float): (q, scale, zero)."""
  levels = 2.0 ** bits - 1
  lo, hi = jnp.min(u, axis=-1, keepdims=True), jnp.max(u, axis=-1, keepdims=True)
  s = jnp.maximum((hi - lo) / levels, 1e-8)
  z = jnp.round(-lo / s)
  return jnp.clip(jnp.round(u / s) + z, 0, levels), s, z


def act_levels(high, a_bits: int, a_bits_high: int | None):
  """(bits, levels 2^b - 1, offset 2^(b-1)) float32 scalars of the traced flag ``high``."""
  b = jnp.where(jnp.asarray(high), a_bits_high or a_bits, a_bits).astype(jnp.float32)
  return b, 2.0 ** b - 1, 2.0 ** (b - 1)


def rotated_kernel_ok(k: int, n: int, lam_block: int) -> bool:
  """Whether the Pallas kernel takes the shapes (one K step = two whole Λ-blocks, 128-lane aligned)."""
  return lam_block % 128 == 0 and k % (2 * lam_block) == 0 and n % 128 == 0


def _check(xr, lam, w_packed, w_zero, w_scale, colsum, lam_block):
  m, k = xr.shape
  n = w_packed.shape[0]
  if w_packed.shape != (n, k // 2) or w_packed.dtype != jnp.uint8 or k % 2:
    raise ValueError(f"rotated_w4a4_matmul: w_packed must be uint8 (N, K/2) = ({n}, {k // 2}), got "
                     f"{w_packed.dtype}{tuple(w_packed.shape)}")
  if lam_block < 1 or k % lam_block:
    raise ValueError(f"rotated_w4a4_matmul: lam_block={lam_block} must divide K={k}")
  nb = k // lam_block
  for name, a, shape in (("lam", lam, (k,)), ("w_zero", w_zero, (n,)), ("w_scale", w_scale, (n,)),
                         ("colsum", colsum, (nb, n))):
    if tuple(a.shape) != shape:
      raise ValueError(f"rotated_w4a4_matmul: {name} has shape {tuple(a.shape)}, expected {shape}")
  return m, k, n, nb


def rotated_w4a4_matmul_reference(xr, lam, w_packed, w_zero, w_scale, colsum, *, high, a_bits: int = 4,
                                  a_bits_high: int | None = 8, lam_block: int = 128, bias=None,
                                  accumulator_only: bool = False):
  """Pure-jnp definition (also the XLA backend). Returns (M, N) float32, or with ``accumulator_only``
  the corrected int32 accumulators P_b, (K / lam_block, M, N)."""
  m, k, n, nb = _check(xr, lam, w_packed, w_zero, w_scale, colsum, lam_block)
  xr = jnp.asarray(xr, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  bits, _, c = act_levels(high, a_bits, a_bits_high)
  q, s_t, z_t = token_codes(xr / lam, bits)
  qs = (q - c).astype(jnp.int8).reshape(m, nb, lam_block)
  wq = int4_pack.unpack_int4(w_packed, signed=False, dtype=jnp.int32)
  wc = (wq - jnp.asarray(w_zero, jnp.int32)[:, None]).astype(jnp.int8).reshape(n, nb, lam_block)
  p = jax.lax.dot_general(qs, wc, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)  # [nb, M, N]
  p = p + (c - z_t).astype(jnp.int32)[None] * jnp.asarray(colsum, jnp.int32)[:, None, :]
  if accumulator_only:
    return p
  lam_b = lam.reshape(nb, lam_block)[:, 0]
  y = jnp.einsum("b,bto->to", lam_b, p.astype(jnp.float32)) * s_t * jnp.asarray(w_scale, jnp.float32)[None, :]
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)
  return y


def rotated_w4a4_matmul(xr, lam, w_packed, w_zero, w_scale, colsum, *, high, a_bits: int = 4,
                        a_bits_high: int | None = 8, lam_block: int = 128, bias=None,
                        accumulator_only: bool = False, backend: str = "xla", interpret=False,
                        block_m: int | None = None, block_n: int | None = None):
  """The rotated W4A4/W4A8 layer on ``backend`` (see the module docstring).

  Args:
    xr: (M, K) rotated activations (float); lam: (K,) Λ, constant per K-block of ``lam_block``.
    w_packed: (N, K/2) uint8, ``pack_int4(q_w, signed=False)``; w_zero: (N,) integer zero points;
    w_scale: (N,) float; colsum: (K / lam_block, N) int32 per-block sums of ``q_w - z_w``.
    high: traced bool, the δ-GBS high state (``a_bits_high`` bits) else ``a_bits``.
    backend: 'pallas_tpu' (shapes must pass :func:`rotated_kernel_ok`), 'xla' or 'reference'.
    interpret: Pallas interpret mode (True or a ``pltpu.InterpretParams``), for CPU tests.
  """
  if backend not in ROTATED_BACKENDS:
    raise ValueError(f"rotated_w4a4_matmul: backend must be one of {ROTATED_BACKENDS}, got {backend!r}")
  kw = dict(high=high, a_bits=a_bits, a_bits_high=a_bits_high, lam_block=lam_block, bias=bias,
            accumulator_only=accumulator_only)
  if backend in ("xla", "reference"):
    return rotated_w4a4_matmul_reference(xr, lam, w_packed, w_zero, w_scale, colsum, **kw)
  _, k, n, _ = _check(xr, lam, w_packed, w_zero, w_scale, colsum, lam_block)
  if not rotated_kernel_ok(k, n, lam_block):
    raise ValueError(f"rotated_w4a4_matmul: pallas_tpu needs lam_block % 128 == 0, K % (2 lam_block) == 0 "
                     f"and N % 128 == 0; got K={k}, N={n}, lam_block={lam_block} (use backend='xla')")
  from kernels_pallas import tpu_rotated_matmul  # pylint: disable=g-import-not-at-top

  return tpu_rotated_matmul.rotated_matmul_tpu(xr, lam, w_packed, w_zero, w_scale, colsum, interpret=interpret,
                                               block_m=block_m, block_n=block_n, **kw)
