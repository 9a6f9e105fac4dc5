"""Pallas Mosaic TPU kernel for the W8A8 / W4A8 / W4A16 matmuls.

One kernel body covers every variant (static options in ``MatmulSpec``):

* grid ``(cdiv(M, tm), N // tn, n_k)``, K innermost ("arbitrary"); the last
  M tile may be partial (Pallas masks its writes; the padded rows never mix
  with real rows since every row is independent).
* weights ``(N, K)`` int8, or ``(N, K // 2)`` uint8 packed int4 in the
  half-split layout of :mod:`kernels_pallas.int4_pack`: grid step ``k`` reads
  ``tk // 2`` bytes per row, unpacks them with shifts into two int8 (bf16 for
  W4A16) tiles and multiplies them with two activation tiles, columns
  ``[k tk/2, (k+1) tk/2)`` and ``K/2 + [k tk/2, (k+1) tk/2)`` (``x`` is passed
  twice with two index maps). No lane interleave is needed.
* activations ``(M, K)``: int8, or float quantized in the prologue with the
  static scale/zero point (``act='quantize'``), or cast to bf16 (W4A16).
* ``lax.dot_general`` contracting the last dims of both tiles (NT form),
  int8 x int8 -> int32 on the MXU (bf16 x bf16 -> f32 for W4A16); row sums
  of the quantized activations accumulate beside it for the zero-point term.
* dual scale: the outlier channels ``[0, n_outlier)`` come first; tiles fully
  inside one segment feed that segment's accumulator, the (at most one)
  straddling tile is split with a column mask into both.
* epilogue on the last K step: :func:`quant_common.epilogue` on the tile.

Parameter operands (``quant_common.kernel_operands``): ``row`` (Mr, 3S) f32
= [s_x, 1/s_x, z_x] per segment (Mr = 1 per tensor, block (1, 3S); Mr = M per
token, block (tm, 3S)); ``colf`` (S [+1], N) f32 = w_scale [+ bias];
``coli`` (2S, N) int32 = w_zero, w_czero (A16: w_zero only); blocks (., tn).

Constraints: N % tn == 0, K % tk == 0, tn % 128 == 0, tk % 128 == 0
(% 256 for int4), tm % 32 == 0 unless tm == M. Verified here only in
interpret mode and by lowering to Mosaic for ``platforms=['tpu']``; the
Mosaic compile (layouts of the in-kernel int4 unpack, int8 VPU ops) and
performance are unverified on hardware. v7x has no integer MXU (use fp8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc

_NT = (((1,), (1,)), ((), ()))
DEFAULT_BLOCKS = (256, 512, 512)  # (tm, tn, tk): untuned defaults.


def _kernel(*refs, spec: qc.MatmulSpec, tk: int, n_k: int):
  s_count = spec.n_segments
  packed = spec.weight_bits == 4
  n_x = 2 if packed else 1
  x_refs, refs = refs[:n_x], refs[n_x:]
  w_ref, refs = refs[0], refs[1:]
  row_ref = None
  if spec.act != "bf16":
    row_ref, refs = refs[0], refs[1:]
  colf_ref, coli_ref, out_ref, acc_ref, rs_ref = refs
  k = pl.program_id(2)
  acc_dtype = spec.acc_dtype
  op_dtype = jnp.bfloat16 if spec.act == "bf16" else jnp.int8

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    rs_ref[...] = jnp.zeros_like(rs_ref)

  def prep(x, seg):
    """Activation tile -> MXU operand (quantized with segment seg's params)."""
    if spec.act == "int8":
      return x
    if spec.act == "bf16":
      return x.astype(jnp.bfloat16)
    row = row_ref[...]
    return qc.quantize_activation(x, row[:, 3 * seg + 1:3 * seg + 2],
                                  row[:, 3 * seg + 2:3 * seg + 3])

  def update(seg, q, w):
    acc_ref[seg] += jax.lax.dot_general(q, w, _NT, preferred_element_type=acc_dtype)
    rs_ref[seg] += jnp.sum(q.astype(acc_dtype), axis=1, keepdims=True)

  def chunk(x_ref, w, width, always_normal):
    """Accumulates x_ref's tile (columns [k*width, (k+1)*width) of its half)."""
    last = s_count - 1
    if s_count == 1 or always_normal:
      update(last, prep(x_ref[...], last), w)
      return
    n_full, rem = divmod(spec.n_outlier, width)
    first_normal = n_full + (1 if rem else 0)
    if n_full:
      @pl.when(k < n_full)
      def _outlier():
        update(0, prep(x_ref[...], 0), w)

    if rem:
      @pl.when(k == n_full)
      def _straddle():
        x = x_ref[...]
        col = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        is_out = col < rem
        update(0, jnp.where(is_out, prep(x, 0), 0).astype(op_dtype), w)
        update(1, jnp.where(is_out, 0, prep(x, 1)).astype(op_dtype), w)

    if first_normal < n_k:
      @pl.when(k >= first_normal)
      def _normal():
        update(1, prep(x_ref[...], 1), w)

  if packed:
    lo, hi = int4_pack.unpack_nibbles(w_ref[...], signed=spec.w_signed)
    chunk(x_refs[0], lo.astype(op_dtype), tk // 2, False)
    chunk(x_refs[1], hi.astype(op_dtype), tk // 2, True)  # K/2 >= n_outlier
  else:
    chunk(x_refs[0], w_ref[...].astype(op_dtype), tk, False)

  @pl.when(k == n_k - 1)
  def _epilogue():
    colf = colf_ref[...]
    coli = coli_ref[...]
    row = None if row_ref is None else row_ref[...]
    segs = []
    for i in range(s_count):
      segs.append(qc.SegmentTile(
          x_scale=None if row is None else row[:, 3 * i:3 * i + 1],
          x_zero=None if row is None else row[:, 3 * i + 2:3 * i + 3].astype(jnp.int32),
          w_scale=colf[i:i + 1, :],
          w_zero=coli[i:i + 1, :],
          w_czero=None if row is None else coli[s_count + i:s_count + i + 1, :]))
    bias = colf[s_count:s_count + 1, :] if spec.has_bias else None
    accs = [acc_ref[i] for i in range(s_count)]
    rowsums = [rs_ref[i] for i in range(s_count)]
    if spec.accumulator_only:
      for i, corr in enumerate(qc.corrected_accumulators(accs, rowsums, segs)):
        out_ref[i] = corr
    else:
      out_ref[...] = qc.epilogue(accs, rowsums, segs, bias, out_ref.dtype)


def resolve_blocks(spec: qc.MatmulSpec, block_m=None, block_n=None, block_k=None):
  """Default/validated (tm, tn, tk) for the TPU kernel."""
  dm, dn, dk = DEFAULT_BLOCKS
  k_align = 256 if spec.weight_bits == 4 else 128
  tn = block_n or qc.pick_block(spec.n, dn, 128)
  tk = block_k or qc.pick_block(spec.k, dk, k_align)
  qc.check_block("block_n", tn, spec.n, 128, "N")
  qc.check_block("block_k", tk, spec.k, k_align, "K")
  tm = block_m or dm
  if tm >= spec.m:
    tm = spec.m  # one full-height block is always legal
  elif tm % 32:
    raise ValueError(f"block_m={tm} must be a multiple of 32 (or >= M={spec.m})")
  return tm, tn, tk


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def quant_matmul_tpu(x, w, qp: qc.QuantParams, spec: qc.MatmulSpec,
                     blocks: tuple[int, int, int], interpret=False):
  """Runs the kernel; returns (M, N) ``spec.out_dtype`` or (S, M, N) int32."""
  tm, tn, tk = blocks
  m, n, k = spec.m, spec.n, spec.k
  s_count = spec.n_segments
  rows, colf, coli = qc.kernel_operands(qp, spec)
  row = None if rows is None else jnp.stack(rows, axis=1)  # (Mr, 3S)
  if spec.weight_bits == 4:
    half_tiles = (k // 2) // (tk // 2)
    n_k = half_tiles
    x_specs = [pl.BlockSpec((tm, tk // 2), lambda i, j, kk: (i, kk)),
               pl.BlockSpec((tm, tk // 2), lambda i, j, kk: (i, kk + half_tiles))]
    x_args = [x, x]
    w_spec = pl.BlockSpec((tn, tk // 2), lambda i, j, kk: (j, kk))
  else:
    n_k = k // tk
    x_specs = [pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk))]
    x_args = [x]
    w_spec = pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk))
  in_specs = x_specs + [w_spec]
  args = x_args + [w]
  if row is not None:
    if spec.per_token:
      in_specs.append(pl.BlockSpec((tm, row.shape[1]), lambda i, j, kk: (i, 0)))
    else:
      in_specs.append(pl.BlockSpec(row.shape, lambda i, j, kk: (0, 0)))
    args.append(row)
  in_specs += [pl.BlockSpec((colf.shape[0], tn), lambda i, j, kk: (0, j)),
               pl.BlockSpec((coli.shape[0], tn), lambda i, j, kk: (0, j))]
  args += [colf, coli]
  if spec.accumulator_only:
    out_shape = jax.ShapeDtypeStruct((s_count, m, n), jnp.int32)
    out_spec = pl.BlockSpec((s_count, tm, tn), lambda i, j, kk: (0, i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((m, n), spec.out_dtype)
    out_spec = pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j))
  acc_dtype = spec.acc_dtype
  x_bytes = 1 if spec.act == "int8" else jnp.dtype(x.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * n * k, transcendentals=0,
      bytes_accessed=(m * k * x_bytes * (n // tn) + w.size * (pl.cdiv(m, tm))
                      + m * n * jnp.dtype(out_shape.dtype).itemsize * s_count))
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec, tk=tk, n_k=n_k),
      out_shape=out_shape,
      grid=(pl.cdiv(m, tm), n // tn, n_k),
      in_specs=in_specs,
      out_specs=out_spec,
      scratch_shapes=[pltpu.VMEM((s_count, tm, tn), acc_dtype),
                      pltpu.VMEM((s_count, tm, 1), acc_dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
  )(*args)
