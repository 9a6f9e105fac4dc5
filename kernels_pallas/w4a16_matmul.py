"""W4A16 matmul: bf16 activations x packed int4 weights, for small M (decode).

The kernel unpacks the nibbles to bf16 (exact for -8..15) and feeds the MXU /
tensor cores in bf16 with a float32 accumulator; the per-channel weight scale
and zero point come out of the K sum:

  y[m, n] = sum_s s_w[n] (sum_k x[m, k] q_w[n, k] - z_w[n] sum_k x[m, k]) + b[n]

(the row sum of x accumulates in float32 next to the product).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import dispatch
from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc


def w4a16_matmul(x, w_packed, w_scale, w_zero, *, bias=None,
                 n_outlier: int = 0, w_signed: bool = True, out_dtype=None,
                 backend: str | None = None, interpret=False,
                 block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None):
  """``y = x @ w_hat.T + b`` with ``w_hat[n] = s_w[n] (q_w[n] - z_w[n])``.

  Args:
    x: (M, K) bfloat16 (float16/float32 are rounded to bf16 in the kernel).
      K % 256 == 0. Meant for small M; any M works.
    w_packed: (N, K // 2) uint8 half-split packed int4 (see ``int4_pack``).
    w_scale, w_zero: (N,) per output channel, or (2, N) [outlier, normal]
      when ``n_outlier > 0`` (weight-only dual scale; outliers first).
    bias: optional (N,).
    out_dtype: default ``x.dtype``.
    backend, interpret, block_*: as :func:`w8a8_matmul`.

  Returns:
    (M, N) ``out_dtype``.
  """
  spec, qp = qc.prepare(x, w_packed, weight_bits=4, w_signed=w_signed,
                        w_scale=w_scale, w_zero=w_zero, bias=bias,
                        n_outlier=n_outlier,
                        out_dtype=x.dtype if out_dtype is None else out_dtype,
                        a16=True, op="w4a16_matmul")
  return dispatch.run(
      x, w_packed, spec, qp, backend=backend, interpret=interpret,
      blocks=(block_m, block_n, block_k),
      reference=lambda: _reference(x, w_packed, spec, qp))


def w4a16_matmul_reference(x, w_packed, w_scale, w_zero, *, bias=None,
                           n_outlier: int = 0, w_signed: bool = True,
                           out_dtype=None):
  """Pure-jnp reference: dequantize the weights to float32, then one
  float32 matmul per segment (x rounded to bf16 first, like the kernel)."""
  spec, qp = qc.prepare(x, w_packed, weight_bits=4, w_signed=w_signed,
                        w_scale=w_scale, w_zero=w_zero, bias=bias,
                        n_outlier=n_outlier,
                        out_dtype=x.dtype if out_dtype is None else out_dtype,
                        a16=True, op="w4a16_matmul_reference")
  return _reference(x, w_packed, spec, qp)


@functools.partial(jax.jit, static_argnames=("spec",))
def _reference(x, w_packed, spec: qc.MatmulSpec, qp: qc.QuantParams):
  w_int = int4_pack.unpack_int4(w_packed, signed=spec.w_signed, dtype=jnp.int32)
  xf = x.astype(jnp.bfloat16).astype(jnp.float32)
  out = None
  for s, (start, size) in enumerate(spec.segments):
    w_hat = ((w_int[:, start:start + size] - qp.w_zero[s][:, None])
             .astype(jnp.float32) * qp.w_scale[s][:, None])
    term = jnp.dot(xf[:, start:start + size], w_hat.T,
                   precision=jax.lax.Precision.HIGHEST)
    out = term if out is None else out + term
  if qp.bias is not None:
    out = out + qp.bias[None, :]
  return out.astype(spec.out_dtype)
