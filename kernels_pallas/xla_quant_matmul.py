"""XLA fallback of the low-bit matmuls (any device).

One ``lax.dot_general`` per K segment with an int32 (integer activations) or
float32 (W4A16) result, activation row sums by ``jnp.sum``, then the shared
epilogue of :mod:`kernels_pallas.quant_common`. Packed int4 weights are
unpacked to int8 (or bf16 for W4A16) by XLA first. On GPU, XLA lowers
``s8 x s8 -> s32`` to cuBLAS(Lt) integer GEMMs; on TPU to the MXU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import int4_pack
from kernels_pallas import quant_common as qc

_NT = (((1,), (1,)), ((), ()))


@functools.partial(jax.jit, static_argnames=("spec",))
def quant_matmul_xla(x, w, qp: qc.QuantParams, spec: qc.MatmulSpec):
  """Same contract as the Pallas kernels (see ``quant_common.prepare``)."""
  if spec.weight_bits == 4:
    w = int4_pack.unpack_int4(w, signed=spec.w_signed)
  acc_dtype = spec.acc_dtype
  segs = qc.full_segment_tiles(qp, spec)
  accs, rowsums = [], []
  for s, (start, size) in enumerate(spec.segments):
    xs = x[:, start:start + size]
    ws = w[:, start:start + size]
    if spec.act == "quantize":
      xs = qc.quantize_activation(xs, qp.x_inv_scale[s][:, None],
                                  qp.x_zero[s][:, None])
    elif spec.act == "bf16":
      xs = xs.astype(jnp.bfloat16)
      ws = ws.astype(jnp.bfloat16)
    accs.append(jax.lax.dot_general(xs, ws, _NT, preferred_element_type=acc_dtype))
    rowsums.append(jnp.sum(xs.astype(acc_dtype), axis=1, keepdims=True))
  bias = None if qp.bias is None else qp.bias[None, :]
  if spec.accumulator_only:
    return jnp.stack(qc.corrected_accumulators(accs, rowsums, segs))
  return qc.epilogue(accs, rowsums, segs, bias, spec.out_dtype)
