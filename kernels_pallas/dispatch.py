"""Backend dispatch shared by the public ops (w8a8 / w4a8 / w4a16)."""

from __future__ import annotations

from typing import Callable

from kernels_pallas import quant_common as qc
from kernels_pallas import tpu_quant_matmul
from kernels_pallas import xla_quant_matmul


def run(x, w, spec: qc.MatmulSpec, qp: qc.QuantParams, *, backend, interpret,
        blocks, reference: Callable[[], object]):
  """Runs one prepared call on the selected backend.

  backend: None (pick from ``jax.default_backend()``) or one of
  ``quant_common.BACKENDS``. interpret: False; True (Pallas interpret mode:
  the generic interpreter for TPU kernels, ``InterpretGPUParams()`` for the
  Mosaic GPU kernel); or an explicit ``pltpu.InterpretParams`` /
  ``InterpretGPUParams`` instance. blocks: (block_m, block_n, block_k), each
  None for the backend default.
  """
  backend = qc.resolve_backend(backend)
  if backend == "reference":
    return reference()
  if backend == "xla":
    return xla_quant_matmul.quant_matmul_xla(x, w, qp, spec)
  if backend == "pallas_tpu":
    tiles = tpu_quant_matmul.resolve_blocks(spec, *blocks)
    return tpu_quant_matmul.quant_matmul_tpu(x, w, qp, spec, tiles,
                                             interpret=interpret)
  # Imported lazily: the Mosaic GPU module pulls in the GPU interpreter.
  from kernels_pallas import gpu_quant_matmul  # pylint: disable=g-import-not-at-top
  tiles = gpu_quant_matmul.resolve_blocks(spec, *blocks)
  return gpu_quant_matmul.quant_matmul_gpu(x, w, qp, spec, tiles,
                                           interpret=interpret)
