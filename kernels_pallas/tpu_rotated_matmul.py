"""Pallas Mosaic TPU kernel of the rotated W4A4 / W4A8 matmul (:mod:`kernels_pallas.rotated_w4a4_matmul`).

Structure (follows :mod:`kernels_pallas.tpu_quant_matmul`):

* grid ``(cdiv(M, tm), N // tn, n_k)``, K innermost ("arbitrary"), ``n_k = K / (2 lam_block)``: grid
  step ``kk`` covers two whole Λ-blocks of width ``w = lam_block``: block ``kk`` (the low nibbles of the
  ``(tn, w)`` packed byte tile) and block ``n_k + kk`` (the high nibbles; half-split layout).
* prologue, once per output tile (``kk == 0``): per-token min / max of ``xr / Λ`` over the whole row (a
  resident ``(tm, K)`` block, refetched only when the M tile changes) -> ``s_t``, ``z_t`` in VMEM scratch.
  Every step quantizes its two ``(tm, w)`` activation tiles (passed again with their own index maps) to
  int8 codes ``clip(round(u / s_t) + z_t, 0, L) - c``; ``L`` and ``c`` are SMEM scalars, so one compiled
  kernel serves A4 and A8.
* weights: ``(tn, w)`` uint8 bytes -> two unsigned nibble tiles (VPU shifts) -> int8 -> ``lax.dot_general``
  NT int8 x int8 -> int32 on the MXU, one dot per Λ-block, plus activation row sums.
* per Λ-block correction in int32 ``P_b = acc - z_w r + (c - z_t) colsum_b``, then the float accumulator
  ``+= λ_b P_b`` (λ_b from SMEM); epilogue on the last step ``acc s_t s_w + bias``.
  ``accumulator_only`` writes the P_b instead (tests).

Constraints: ``lam_block % 128 == 0``, ``K % (2 lam_block) == 0``, ``N % tn == 0`` with ``tn % 128 == 0``;
``tm % 32 == 0`` unless ``tm == M``; the default ``tm`` keeps the f32 ``(tm, K)`` row block <= 4 MiB.
Verified only in interpret mode and by lowering to Mosaic for ``platforms=['tpu']``; the Mosaic compile,
VMEM fit at Wan widths, numerics on hardware and performance are unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc
from kernels_pallas.rotated_w4a4_matmul import act_levels

_NT = (((1,), (1,)), ((), ()))
ROW_BLOCK_BYTES = 4 * 2**20  # budget of one (tm, K) float32 activation row block
DEFAULT_TN = 512


def _kernel(scal_ref, lamb_ref, xrow_ref, xlo_ref, xhi_ref, lamlo_ref, lamhi_ref, w_ref, zw_ref, cslo_ref,
            cshi_ref, colf_ref, lamrow_ref, out_ref, acc_ref, tok_ref, *, n_k, has_bias, accumulator_only):
  kk = pl.program_id(2)
  levels, c = scal_ref[0], scal_ref[1]

  @pl.when(kk == 0)
  def _prologue():
    u = xrow_ref[...] / lamrow_ref[...]
    lo = jnp.min(u, axis=1, keepdims=True)
    hi = jnp.max(u, axis=1, keepdims=True)
    s = jnp.maximum((hi - lo) / levels, 1e-8)
    tok_ref[0] = s
    tok_ref[1] = jnp.round(-lo / s)
    if not accumulator_only:
      acc_ref[...] = jnp.zeros_like(acc_ref)

  s_t, z_t = tok_ref[0], tok_ref[1]
  corr_x = (c - z_t).astype(jnp.int32)  # (tm, 1)
  z_w = zw_ref[...]  # (1, tn) int32
  w_lo, w_hi = int4_pack.unpack_nibbles(w_ref[...], signed=False)
  for half, (x_ref, lam_ref, w_q, cs_ref) in enumerate(((xlo_ref, lamlo_ref, w_lo, cslo_ref),
                                                        (xhi_ref, lamhi_ref, w_hi, cshi_ref))):
    u = x_ref[...] / lam_ref[...]
    q = (jnp.clip(jnp.round(u / s_t) + z_t, 0.0, levels) - c).astype(jnp.int8)
    acc = jax.lax.dot_general(q, w_q.astype(jnp.int8), _NT, preferred_element_type=jnp.int32)
    rowsum = jnp.sum(q.astype(jnp.int32), axis=1, keepdims=True)
    p = acc - z_w * rowsum + corr_x * cs_ref[0]
    if accumulator_only:
      out_ref[half, 0] = p
    else:
      acc_ref[...] += lamb_ref[kk + half * n_k] * p.astype(jnp.float32)

  if not accumulator_only:
    @pl.when(kk == n_k - 1)
    def _epilogue():
      colf = colf_ref[...]
      y = acc_ref[...] * s_t * colf[0:1, :]
      if has_bias:
        y = y + colf[1:2, :]
      out_ref[...] = y.astype(out_ref.dtype)


def resolve_blocks(m: int, n: int, k: int, block_m=None, block_n=None):
  """Default / validated (tm, tn)."""
  tn = block_n or qc.pick_block(n, DEFAULT_TN, 128)
  qc.check_block("block_n", tn, n, 128, "N")
  tm = block_m or max(32, min(256, ROW_BLOCK_BYTES // (4 * k)) // 32 * 32)
  if tm >= m:
    tm = m
  elif tm % 32:
    raise ValueError(f"block_m={tm} must be a multiple of 32 (or >= M={m})")
  return tm, tn


@functools.partial(jax.jit, static_argnames=("a_bits", "a_bits_high", "lam_block", "accumulator_only",
                                             "interpret", "block_m", "block_n"))
def rotated_matmul_tpu(xr, lam, w_packed, w_zero, w_scale, colsum, *, high, a_bits, a_bits_high, lam_block,
                       bias=None, accumulator_only=False, interpret=False, block_m=None, block_n=None):
  """Runs the kernel: (M, N) float32, or (K / lam_block, M, N) int32 with ``accumulator_only``."""
  m, k = xr.shape
  n = w_packed.shape[0]
  w = lam_block
  n_k = k // (2 * w)
  nb = 2 * n_k
  tm, tn = resolve_blocks(m, n, k, block_m, block_n)
  xr = jnp.asarray(xr, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  _, levels, c = act_levels(high, a_bits, a_bits_high)
  scal = jnp.stack([levels, c]).astype(jnp.float32)
  lam_b = lam.reshape(nb, w)[:, 0]
  lam_row = lam[None, :]
  zw = jnp.asarray(w_zero, jnp.int32)[None, :]
  cs = jnp.asarray(colsum, jnp.int32)[:, None, :]  # (nb, 1, N): one (1, 1, tn) block per Λ-block
  colf = [jnp.asarray(w_scale, jnp.float32)] + ([] if bias is None else [jnp.asarray(bias, jnp.float32)])
  colf = jnp.stack(colf)
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  in_specs = [
      smem, smem,
      pl.BlockSpec((tm, k), lambda i, j, kk: (i, 0)),
      pl.BlockSpec((tm, w), lambda i, j, kk: (i, kk)),
      pl.BlockSpec((tm, w), lambda i, j, kk: (i, kk + n_k)),
      pl.BlockSpec((1, w), lambda i, j, kk: (0, kk)),
      pl.BlockSpec((1, w), lambda i, j, kk: (0, kk + n_k)),
      pl.BlockSpec((tn, w), lambda i, j, kk: (j, kk)),
      pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
      pl.BlockSpec((1, 1, tn), lambda i, j, kk: (kk, 0, j)),
      pl.BlockSpec((1, 1, tn), lambda i, j, kk: (kk + n_k, 0, j)),
      pl.BlockSpec((colf.shape[0], tn), lambda i, j, kk: (0, j)),
      pl.BlockSpec((1, k), lambda i, j, kk: (0, 0)),
  ]
  args = [scal, lam_b, xr, xr, xr, lam_row, lam_row, w_packed, zw, cs, cs, colf, lam_row]
  if accumulator_only:
    out_shape = jax.ShapeDtypeStruct((2, n_k, m, n), jnp.int32)
    out_spec = pl.BlockSpec((2, 1, tm, tn), lambda i, j, kk: (0, kk, i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((m, n), jnp.float32)
    out_spec = pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j))
  cost = pl.CostEstimate(flops=2 * m * n * k, transcendentals=0,
                         bytes_accessed=3 * m * k * 4 * (n // tn) + w_packed.size * pl.cdiv(m, tm) + m * n * 4)
  out = pl.pallas_call(
      functools.partial(_kernel, n_k=n_k, has_bias=bias is not None, accumulator_only=accumulator_only),
      out_shape=out_shape,
      grid=(pl.cdiv(m, tm), n // tn, n_k),
      in_specs=in_specs,
      out_specs=out_spec,
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32), pltpu.VMEM((2, tm, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
  )(*args)
  return out.reshape(nb, m, n) if accumulator_only else out

