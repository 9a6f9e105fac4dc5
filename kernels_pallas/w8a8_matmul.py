"""W8A8 matmul: int8 activations x int8 weights -> int32 -> scaled output.

``y = x_hat @ w_hat.T + b`` with ``x_hat = s_x (q_x - z_x)`` (static, per
tensor or per token) and ``w_hat[n] = s_w[n] (q_w[n] - z_w[n])`` (per output
channel, asymmetric), optionally in Q-ARVD's dual-scale form. The integer
algebra (exact int32 zero-point correction with precomputed weight column sums
and in-kernel activation row sums) is spelled out in
:mod:`kernels_pallas.quant_common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import dispatch
from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc


def w8a8_matmul(x, w, w_scale, w_zero, *, x_scale, x_zero, bias=None,
                w_colsum=None, n_outlier: int = 0, out_dtype=jnp.bfloat16,
                accumulator_only: bool = False, backend: str | None = None,
                interpret=False, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None):
  """Quantized linear layer ``y[m, n] = sum_k x_hat[m, k] w_hat[n, k] + b[n]``.

  Args:
    x: (M, K) int8 quantized activations, or bfloat16/float16/float32
      activations that the kernel quantizes in its prologue with the static
      ``x_scale``/``x_zero`` (``clip(round(x * (1/s_x)) + z_x, -128, 127)``),
      so no separate quantization pass touches HBM. Any M; K % 128 == 0.
      For the dual-scale form the outlier input channels must come first.
    w: (N, K) int8 weights (PyTorch ``Linear.weight`` layout, K contiguous);
      N % 128 == 0.
    w_scale: (N,) per-output-channel scales; (2, N) [outlier, normal] if
      ``n_outlier > 0``.
    w_zero: integer zero points, same shape as ``w_scale``.
    x_scale: activation scale: () per tensor or (M,) per token; (2,) or (2, M)
      [outlier, normal] if ``n_outlier > 0``.
    x_zero: integer activation zero point, same forms as ``x_scale``.
    bias: optional (N,) bias, added once in float32.
    w_colsum: optional precomputed ``quant_common.weight_colsum(w, ...)``
      ((N,) or (2, N) int32); computed here when None (an extra weight pass).
    n_outlier: 0 (single scale) or the outlier segment length, a multiple of
      32 below K: channels [0, n_outlier) use the first set of scales.
    out_dtype: output dtype (default bfloat16).
    accumulator_only: return the zero-point-corrected int32 accumulators
      ``sum_k (q_x - z_x)(q_w - z_w)`` per segment, shape (S, M, N), instead
      of the scaled output (testing, custom epilogues).
    backend: None (TPU -> 'pallas_tpu', Hopper GPU -> 'pallas_gpu', else
      'xla'), or one of 'pallas_tpu', 'pallas_gpu', 'xla', 'reference'.
    interpret: Pallas backends only. True: interpret mode on CPU (the generic
      Pallas interpreter for 'pallas_tpu', ``InterpretGPUParams`` for
      'pallas_gpu'); or an explicit ``pltpu.InterpretParams`` /
      ``InterpretGPUParams`` instance.
    block_m, block_n, block_k: tile overrides (backend defaults otherwise).

  Returns:
    (M, N) ``out_dtype`` array, or (S, M, N) int32 if ``accumulator_only``.

  Backends: 'pallas_tpu' (Mosaic TPU, int8 MXU), 'pallas_gpu' (Mosaic GPU
  ``wgmma`` s8 x s8 -> s32, the current Hopper lowering; the Pallas Triton
  backend is deprecated), 'xla' (``lax.dot_general`` with an int32 result and
  the same epilogue), 'reference' (:func:`w8a8_matmul_reference`).
  """
  spec, qp = qc.prepare(x, w, weight_bits=8, w_signed=True, w_scale=w_scale,
                        w_zero=w_zero, x_scale=x_scale, x_zero=x_zero,
                        w_colsum=w_colsum, bias=bias, n_outlier=n_outlier,
                        out_dtype=out_dtype, accumulator_only=accumulator_only,
                        op="w8a8_matmul")
  return dispatch.run(
      x, w, spec, qp, backend=backend, interpret=interpret,
      blocks=(block_m, block_n, block_k),
      reference=lambda: int_matmul_reference(x, w, spec, qp))


def w8a8_matmul_reference(x, w, w_scale, w_zero, *, x_scale, x_zero, bias=None,
                          w_colsum=None, n_outlier: int = 0,
                          out_dtype=jnp.bfloat16, accumulator_only: bool = False):
  """Pure-jnp reference of :func:`w8a8_matmul` (same arguments).

  Computes the definition ``sum_k (q_x - z_x)(q_w - z_w)`` per segment
  directly in int32 (no column/row-sum algebra, ``w_colsum`` is ignored),
  then the shared float32 epilogue.
  """
  del w_colsum
  spec, qp = qc.prepare(x, w, weight_bits=8, w_signed=True, w_scale=w_scale,
                        w_zero=w_zero, x_scale=x_scale, x_zero=x_zero,
                        bias=bias, n_outlier=n_outlier, out_dtype=out_dtype,
                        accumulator_only=accumulator_only,
                        op="w8a8_matmul_reference")
  return int_matmul_reference(x, w, spec, qp)


@functools.partial(jax.jit, static_argnames=("spec",))
def int_matmul_reference(x, w, spec: qc.MatmulSpec, qp: qc.QuantParams):
  """Definition-based integer matmul (packed int4 weights are unpacked)."""
  w_int = (int4_pack.unpack_int4(w, signed=spec.w_signed)
           if spec.weight_bits == 4 else w)
  segs = qc.full_segment_tiles(qp, spec)
  corrected = []
  for s, (start, size) in enumerate(spec.segments):
    xs = x[:, start:start + size]
    if spec.act == "quantize":
      xs = qc.quantize_activation(xs, qp.x_inv_scale[s][:, None],
                                  qp.x_zero[s][:, None])
    dx = xs.astype(jnp.int32) - qp.x_zero[s][:, None]
    dw = w_int[:, start:start + size].astype(jnp.int32) - qp.w_zero[s][:, None]
    corrected.append(jax.lax.dot_general(
        dx, dw, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
  if spec.accumulator_only:
    return jnp.stack(corrected)
  bias = None if qp.bias is None else qp.bias[None, :]
  return qc.dequantize_output(corrected, segs, bias).astype(spec.out_dtype)
