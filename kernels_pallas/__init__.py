"""Pallas low-bit matmul kernels (TPU Mosaic, Hopper Mosaic GPU, XLA fallback).

Public ops (each with a pure-jnp ``*_reference`` beside it):
``w8a8_matmul``, ``w4a8_matmul`` (int8 activations, dual-scale capable,
optional fused activation quantization) and ``w4a16_matmul`` (decode).
Packing: ``pack_int4`` / ``unpack_int4`` (half-split layout along K).
"""

from kernels_pallas.int4_pack import pack_int4, unpack_int4
from kernels_pallas.quant_common import BACKENDS, quantize_int8, weight_colsum
from kernels_pallas.w4a8_matmul import w4a8_matmul, w4a8_matmul_reference
from kernels_pallas.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference
from kernels_pallas.w8a8_matmul import w8a8_matmul, w8a8_matmul_reference

__all__ = [
    "BACKENDS", "pack_int4", "unpack_int4", "quantize_int8", "weight_colsum",
    "w8a8_matmul", "w8a8_matmul_reference", "w4a8_matmul",
    "w4a8_matmul_reference", "w4a16_matmul", "w4a16_matmul_reference",
]
