"""Pallas Mosaic GPU (Hopper, sm_90a) kernel for the W8A8 / W4A8 / W4A16 matmuls.

Why Mosaic GPU: it is the default Pallas GPU lowering since JAX 0.9 and the
installed jax (0.10.2) exposes ``plgpu.wgmma`` with s8 x s8 -> s32; the Pallas
Triton lowering is deprecated (removal announced for 0.11), so it is not used.

Structure (one warpgroup per CTA, ``plgpu.kernel`` + ``plgpu.emit_pipeline``):

* grid ``(cdiv(M, tm), N // tn)``; each CTA owns a (tm, tn) output tile.
  The last M tile reads past M (TMA zero-fills) and its store is clipped by
  the TMA; per-row parameters are padded to a multiple of tm on the host.
  TMA on the (8, *)-tiled refs needs M % 8 == 0 (or M < 8): other M pay one
  padding copy of x (Wan's M = 4680 does not). The GPU interpreter drops
  partially out-of-bounds stores, so under interpret the output is padded.
* K loop: TMA-pipelined SMEM tiles of x (tm, tkc) and w (tn, tkc) with a
  128-byte swizzle; ``wgmma`` reads both operands from SMEM. 8-bit wgmma
  needs K-major operands, so the (N, K) weight tile is used through
  ``plgpu.transpose_ref`` (a K-major B operand).
* int4: the packed (tn, tk/2) byte tile is unpacked in registers with shifts
  into two int8 (bf16 for W4A16) tiles, staged in swizzled SMEM scratch and
  multiplied with the two activation tiles of the half-split layout.
* fused activation quantization / casting: the float x tile goes SMEM ->
  registers -> ``quantize_activation`` -> int8 SMEM scratch -> wgmma.
* activation row sums (zero-point term) are reduced from registers and
  carried through the pipeline; dual scale uses two accumulators, and the K
  loop is split statically into outlier / straddling / normal tile ranges.
* epilogue: :func:`quant_common.epilogue` on the register tile, bf16/f32
  store through swizzled SMEM and a TMA copy.

Constraints: tm % 64 == 0, tn % 128 == 0 dividing N, tk = 128 (W8, W4A16)
or 256 (W4A8), i.e. 128 bytes of the int8 operand per chunk; K % tk == 0.

Interpret mode (``InterpretGPUParams``) cannot run ``wgmma`` on a transposed
ref in jax 0.10.2, so under interpret the weight tile is first transposed
into an extra SMEM buffer (the only difference from the compiled kernel).
Verified here in interpret mode and by lowering to Mosaic GPU for
``platforms=['cuda']``; never run on a GPU, untuned (one warpgroup,
synchronous wgmma per K step, no warp specialization or persistent grid).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc

DEFAULT_BLOCKS = (64, 128, None)  # (tm, tn, tk); tk fixed by the weight format.


def _interpret_params(interpret):
  if interpret is True:
    # Private in jax 0.10.2; jax's own GPU interpret tests import it from here.
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
    # The last M tile reads past M; the TMA zero-fills there, the interpreter
    # must be told not to raise.
    return params.InterpretGPUParams(out_of_bounds_reads="uninitialized")
  return interpret or None


def _swizzled(cols: int, dtype) -> tuple:
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(cols * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


def _operand_smem(count: int, rows: int, cols: int, dtype):
  """`count` swizzled wgmma operand tiles (a tiny unused buffer if 0)."""
  if not count:
    return plgpu.SMEM((1, 8, 128), dtype)
  return plgpu.SMEM((count, rows, cols), dtype, transforms=_swizzled(cols, dtype))


def _stage_count(spec: qc.MatmulSpec, x_dtype, tkc: int) -> int:
  """SMEM staging tiles for activations that pass through registers."""
  packed = spec.weight_bits == 4
  direct = spec.act == "int8" or (spec.act == "bf16" and x_dtype == jnp.bfloat16)
  straddle = spec.n_outlier % tkc != 0
  return (0 if direct else (2 if packed else 1)) + (1 if straddle else 0)


def resolve_blocks(spec: qc.MatmulSpec, block_m=None, block_n=None, block_k=None):
  # One 128-byte swizzle row of the int8 (or 64 bf16) operand per chunk.
  tk = 128 if spec.weight_bits == 8 or spec.act == "bf16" else 256
  if block_k not in (None, tk):
    raise ValueError(f"pallas_gpu: block_k must be {tk} for this weight/"
                     f"activation format, got {block_k}")
  tm = block_m or DEFAULT_BLOCKS[0]
  tn = block_n or DEFAULT_BLOCKS[1]
  if tm % 64:
    raise ValueError(f"pallas_gpu: block_m={tm} must be a multiple of 64")
  qc.check_block("block_n", tn, spec.n, 128, "N")
  qc.check_block("block_k", tk, spec.k, tk, "K")
  return tm, tn, tk


def _row_operand(rows, spec: qc.MatmulSpec, m_pad: int):
  """(3S, m_pad) f32: per-row parameters, padded so every TMA is in bounds."""
  if rows is None:  # A16: a dummy row keeps the kernel signature fixed
    return jnp.zeros((1, m_pad), jnp.float32)
  rows = jnp.broadcast_to(jnp.stack(rows), (len(rows), spec.m))
  return jnp.pad(rows, ((0, 0), (0, m_pad - spec.m)))


def _kernel(x_gmem, w_gmem, row_gmem, colf_gmem, coli_gmem, out_gmem,
            row_smem, colf_smem, coli_smem, stage_smem, w_stage_smem, bt_smem,
            out_smem, barrier, *, spec: qc.MatmulSpec, tm, tn, tk, interpret):
  s_count = spec.n_segments
  packed = spec.weight_bits == 4
  tkc = tk // 2 if packed else tk  # K width of one chunk (one wgmma operand)
  n_k = (spec.k // 2 if packed else spec.k) // tkc
  n_stage = _stage_count(spec, x_gmem.dtype, tkc)
  acc_dtype = spec.acc_dtype
  op_dtype = jnp.bfloat16 if spec.act == "bf16" else jnp.int8
  mi = lax.axis_index("m")
  ni = lax.axis_index("n")
  m_slice = pl.ds(mi * tm, tm)
  n_slice = pl.ds(ni * tn, tn)

  # Epilogue/prologue parameters: one TMA each, waited on before the K loop.
  plgpu.copy_gmem_to_smem(row_gmem.at[:, m_slice], row_smem, barrier.at[0])
  plgpu.copy_gmem_to_smem(colf_gmem.at[:, n_slice], colf_smem, barrier.at[1])
  plgpu.copy_gmem_to_smem(coli_gmem.at[:, n_slice], coli_smem, barrier.at[2])
  for i in range(3):
    plgpu.barrier_wait(barrier.at[i])

  def row_vec(r, cols):
    return lax.broadcast_in_dim(row_smem[r], (tm, cols), [0])

  def prep(x, seg):
    if spec.act == "bf16":
      return x.astype(jnp.bfloat16)
    if spec.act == "int8":
      return x
    return qc.quantize_activation(x, row_vec(3 * seg + 1, tkc),
                                  row_vec(3 * seg + 2, tkc))

  def mma(acc_ref, a_smem, b_nk_smem):
    if interpret:
      bt_smem[...] = b_nk_smem[...].T
      plgpu.wgmma(acc_ref, a_smem, bt_smem)
    else:
      plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_nk_smem, (1, 0)))
    plgpu.wgmma_wait(0)

  def rowsum(q):
    return jnp.sum(q.astype(acc_dtype), axis=1)

  def weight_tiles(w_smem):
    if not packed:
      return [w_smem]  # int8 tile straight from the pipeline buffer
    lo, hi = int4_pack.unpack_nibbles(w_smem[...], signed=spec.w_signed)
    w_stage_smem[0] = lo.astype(op_dtype)
    w_stage_smem[1] = hi.astype(op_dtype)
    plgpu.commit_smem()
    return [w_stage_smem.at[0], w_stage_smem.at[1]]

  def chunk(c, kind, x_smem, w_tile, accs, rs):
    """kind: segment index (0 or 1) or 'straddle' (dual scale, one tile)."""
    if kind != "straddle":
      direct = spec.act == "int8" or (spec.act == "bf16"
                                      and x_smem.dtype == jnp.bfloat16)
      if direct:
        a_smem, q = x_smem, x_smem[...]
      else:
        q = prep(x_smem[...], kind)
        stage_smem[c] = q
        plgpu.commit_smem()
        a_smem = stage_smem.at[c]
      rs[kind] = rs[kind] + rowsum(q)
      mma(accs[kind], a_smem, w_tile)
      return
    x = x_smem[...]
    rem = spec.n_outlier % tkc
    # 0/1 integer column mask (no i1 registers): 1 for outlier columns.
    col = lax.broadcasted_iota(jnp.int32, (tm, tkc), 1)
    is_out = jnp.clip(rem - col, 0, 1).astype(acc_dtype)
    for seg, keep in ((0, is_out), (1, 1 - is_out)):
      q = (prep(x, seg).astype(acc_dtype) * keep).astype(op_dtype)
      stage_smem[n_stage - 1] = q
      plgpu.commit_smem()
      rs[seg] = rs[seg] + rowsum(q)
      mma(accs[seg], stage_smem.at[n_stage - 1], w_tile)

  n_x = 2 if packed else 1
  x_spec_lo = plgpu.BlockSpec((tm, tkc), lambda k: (mi, k),
                              transforms=_swizzled(tkc, x_gmem.dtype))
  x_specs = [x_spec_lo]
  if packed:
    x_specs.append(plgpu.BlockSpec((tm, tkc), lambda k: (mi, k + n_k),
                                   transforms=_swizzled(tkc, x_gmem.dtype)))
  w_spec = plgpu.BlockSpec((tn, tkc), lambda k: (ni, k),
                           transforms=_swizzled(tkc, w_gmem.dtype))

  # Static split of the K loop: [outlier tiles | straddling tile | normal].
  if s_count == 1:
    ranges = [(0, n_k, 0)]
  else:
    n_full, rem = divmod(spec.n_outlier, tkc)
    ranges = [(0, n_full, 0)] + ([(n_full, 1, "straddle")] if rem else [])
    start = n_full + (1 if rem else 0)
    ranges.append((start, n_k - start, 1))

  def run_k_loop(*acc_refs):
    rs = tuple(jnp.zeros((tm,), acc_dtype) for _ in range(s_count))
    for start, count, kind in ranges:
      if count == 0:
        continue

      def body(_, *refs, kind=kind):
        *x_smems, w_smem, carry = refs
        rs_list = list(carry)
        tiles = weight_tiles(w_smem)
        for c in range(n_x):
          chunk(c, kind if c == 0 else s_count - 1, x_smems[c], tiles[c],
                acc_refs, rs_list)
        return tuple(rs_list)

      def shift(spec_, off=start):
        return plgpu.BlockSpec(spec_.block_shape,
                               lambda k, f=spec_.index_map: f(k + off),
                               transforms=spec_.transforms)

      rs = plgpu.emit_pipeline(
          body,
          grid=(count,),
          in_specs=[shift(s_) for s_ in x_specs] + [shift(w_spec)],
          max_concurrent_steps=2, init_carry=rs,
      )(*([x_gmem] * n_x), w_gmem)
    return [r[...] for r in acc_refs], rs

  accs, rs = pl.run_scoped(
      run_k_loop, *[plgpu.ACC((tm, tn), acc_dtype) for _ in range(s_count)])

  def col_vec(ref, r):
    return lax.broadcast_in_dim(ref[r], (tm, tn), [1])

  # Only materialize what is used: layout inference rejects dead values.
  quant_x = spec.act != "bf16"
  scaled = not spec.accumulator_only
  segs = []
  for i in range(s_count):
    segs.append(qc.SegmentTile(
        x_scale=row_vec(3 * i, tn) if quant_x and scaled else None,
        x_zero=row_vec(3 * i + 2, tn).astype(jnp.int32) if quant_x else None,
        w_scale=col_vec(colf_smem, i) if scaled else None,
        w_zero=col_vec(coli_smem, i),
        w_czero=col_vec(coli_smem, s_count + i) if quant_x else None))
  bias = col_vec(colf_smem, s_count) if spec.has_bias and scaled else None
  rs_tiles = [lax.broadcast_in_dim(r, (tm, tn), [0]) for r in rs]
  if spec.accumulator_only:
    for i, corr in enumerate(qc.corrected_accumulators(accs, rs_tiles, segs)):
      out_smem[i] = corr
    plgpu.commit_smem()
    for i in range(s_count):
      plgpu.copy_smem_to_gmem(out_smem.at[i], out_gmem.at[i, m_slice, n_slice])
  else:
    out_smem[0] = qc.epilogue(accs, rs_tiles, segs, bias, out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[0], out_gmem.at[m_slice, n_slice])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def quant_matmul_gpu(x, w, qp: qc.QuantParams, spec: qc.MatmulSpec,
                     blocks: tuple[int, int, int], interpret=False):
  """Runs the kernel; returns (M, N) ``spec.out_dtype`` or (S, M, N) int32."""
  tm, tn, tk = blocks
  interpret = _interpret_params(interpret)
  s_count = spec.n_segments
  packed = spec.weight_bits == 4
  tkc = tk // 2 if packed else tk
  grid_m = pl.cdiv(spec.m, tm)
  rows, colf, coli = qc.kernel_operands(qp, spec)
  row = _row_operand(rows, spec, grid_m * tm)
  op_dtype = jnp.bfloat16 if spec.act == "bf16" else jnp.int8
  n_out = s_count if spec.accumulator_only else 1
  out_dtype = jnp.int32 if spec.accumulator_only else spec.out_dtype
  # TMA descriptors of the (8, *)-tiled x / out need M < 8 or M % 8 == 0:
  # otherwise x gets (at most 7) zero rows. The TMA clips the last tile's
  # store at M; the GPU interpreter instead drops partially out-of-bounds
  # stores, so under interpret the output is padded to whole tiles.
  m_rows = spec.m if spec.m < 8 or spec.m % 8 == 0 else pl.cdiv(spec.m, 8) * 8
  if m_rows != spec.m:
    x = jnp.pad(x, ((0, m_rows - spec.m), (0, 0)))
  m_out = grid_m * tm if interpret is not None else m_rows
  out_shape = ((s_count, m_out, spec.n) if spec.accumulator_only
               else (m_out, spec.n))
  scratch = dict(
      row_smem=plgpu.SMEM(row.shape[:1] + (tm,), jnp.float32),
      colf_smem=plgpu.SMEM((colf.shape[0], tn), jnp.float32),
      coli_smem=plgpu.SMEM((coli.shape[0], tn), jnp.int32),
      stage_smem=_operand_smem(_stage_count(spec, x.dtype, tkc), tm, tkc,
                               op_dtype),
      w_stage_smem=_operand_smem(2 if packed else 0, tn, tkc, op_dtype),
      bt_smem=plgpu.SMEM((tkc, tn) if interpret else (8, 128), op_dtype),
      out_smem=plgpu.SMEM((n_out, tm, tn), out_dtype,
                          transforms=_swizzled(tn, out_dtype)),
      barrier=plgpu.Barrier(num_barriers=3),
  )
  kernel = plgpu.kernel(
      functools.partial(_kernel, spec=spec, tm=tm, tn=tn, tk=tk,
                        interpret=interpret is not None),
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(grid_m, spec.n // tn),
      grid_names=("m", "n"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  out = kernel(x, w, row, colf, coli)
  return out[..., :spec.m, :] if m_out != spec.m else out
