"""Real integer inference of a Q-ARVD-quantized DiT: export (packed integer weights + scales) and
:class:`IntLinear` layers running the :mod:`kernels_pallas` matmuls (XLA or Pallas backends)."""

from qarvd_jax.quant.integer.export import (INT_FORMAT, SUPPORTED_W_BITS, export_checkpoint, export_layer,
                                            export_model, format_bytes_report, is_integer_export, layer_bytes,
                                            load_export, resolve_quantized_checkpoint, save_export)
from qarvd_jax.quant.integer.int_linear import (INT_BACKENDS, IntLayerSpec, IntLinear, IntState,
                                                int_linear_apply, kernel_constraints_ok, layer_kernel_backends,
                                                load_integer_model, resolve_backend)

__all__ = ["INT_FORMAT", "SUPPORTED_W_BITS", "export_checkpoint", "export_layer", "export_model",
           "format_bytes_report", "is_integer_export", "layer_bytes", "load_export", "resolve_quantized_checkpoint",
           "save_export", "INT_BACKENDS", "IntLayerSpec", "IntLinear", "IntState", "int_linear_apply",
           "kernel_constraints_ok", "layer_kernel_backends", "load_integer_model", "resolve_backend"]
