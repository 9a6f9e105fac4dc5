"""W4A8 matmul: int8 activations x packed int4 weights -> int32 -> output.

Same math as :mod:`kernels_pallas.w8a8_matmul`; the weights arrive as
``(N, K // 2)`` uint8 bytes in the half-split layout of
:mod:`kernels_pallas.int4_pack` and are unpacked to int8 inside the kernel
(TPU: VPU shifts in VMEM, then the int8 MXU; GPU: register shifts, int8 tile
staged in shared memory, then ``wgmma`` s8). Neither Hopper nor the TPU MXU
has a mixed s8 x s4 mode, so the math runs at the int8 rate; int4 halves the
weight bytes.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas import dispatch
from kernels_pallas import quant_common as qc
from kernels_pallas.w8a8_matmul import int_matmul_reference


def w4a8_matmul(x, w_packed, w_scale, w_zero, *, x_scale, x_zero, bias=None,
                w_colsum=None, n_outlier: int = 0, w_signed: bool = True,
                out_dtype=jnp.bfloat16, accumulator_only: bool = False,
                backend: str | None = None, interpret=False,
                block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None):
  """Quantized linear layer with 4-bit weights and 8-bit activations.

  Args:
    x: (M, K) int8, or float activations quantized in the kernel prologue
      (see :func:`w8a8_matmul`). K % 256 == 0 (K/2 bytes tile by 128).
    w_packed: (N, K // 2) uint8 from ``int4_pack.pack_int4(q_w, signed=w_signed)``
      with ``q_w`` (N, K); N % 128 == 0.
    w_signed: nibbles are -8..7 (True) or 0..15 (False, e.g. Q-ARVD's
      unsigned 4-bit grid with its zero point as is).
    n_outlier: outlier segment length, a multiple of 32 and <= K/2 (the
      outliers must sit in the first half of K, which Q-ARVD's 50 % cap
      guarantees).
    Other arguments and the result: as :func:`w8a8_matmul`.
  """
  spec, qp = qc.prepare(x, w_packed, weight_bits=4, w_signed=w_signed,
                        w_scale=w_scale, w_zero=w_zero, x_scale=x_scale,
                        x_zero=x_zero, w_colsum=w_colsum, bias=bias,
                        n_outlier=n_outlier, out_dtype=out_dtype,
                        accumulator_only=accumulator_only, op="w4a8_matmul")
  return dispatch.run(
      x, w_packed, spec, qp, backend=backend, interpret=interpret,
      blocks=(block_m, block_n, block_k),
      reference=lambda: int_matmul_reference(x, w_packed, spec, qp))


def w4a8_matmul_reference(x, w_packed, w_scale, w_zero, *, x_scale, x_zero,
                          bias=None, w_colsum=None, n_outlier: int = 0,
                          w_signed: bool = True, out_dtype=jnp.bfloat16,
                          accumulator_only: bool = False):
  """Pure-jnp reference of :func:`w4a8_matmul`: unpack, then the W8A8
  definition-based reference (``w_colsum`` is ignored)."""
  del w_colsum
  spec, qp = qc.prepare(x, w_packed, weight_bits=4, w_signed=w_signed,
                        w_scale=w_scale, w_zero=w_zero, x_scale=x_scale,
                        x_zero=x_zero, bias=bias, n_outlier=n_outlier,
                        out_dtype=out_dtype, accumulator_only=accumulator_only,
                        op="w4a8_matmul_reference")
  return int_matmul_reference(x, w_packed, spec, qp)
