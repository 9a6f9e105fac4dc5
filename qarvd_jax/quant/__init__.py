"""Q-ARVD quantizer primitives: pure JAX functions on arrays (see ``docs`` / qarvd_method.md §1-6).

Modules: :mod:`.fake_quant` (uniform affine fake quantization, STE/LSQ gradients, granularities),
:mod:`.range_init` (percentile/MSE range search, histogram quantiles), :mod:`.outliers` (weight
outlier input channels, report and plot; host numpy), :mod:`.dual_scale` (single/dual-scale quantized
linear), :mod:`.objective` (chunk weights, reconstruction loss), :mod:`.adaround` (AdaRound).
"""

from .adaround import (AdaRoundConfig, beta_schedule, hard_weight, init_v, rectified_sigmoid, rounding_loss,
                       rounding_regularizer, soft_weight)
from .dual_scale import (ChannelSplit, DualScaleQuantParams, LinearQuantParams, dual_scale_linear, init_dual_scale,
                         init_linear_quant, make_split, quantized_linear, split_input, split_weight)
from .fake_quant import (Granularity, GroupLayout, QuantParams, QuantSpec, broadcast_params, clamp_ste, dequantize,
                         fake_quant, group_layout, group_reduce, group_rows, lsq_grad_scale, minmax_params,
                         minmax_range, param_shape, params_from_range, quantize, round_ste, scale_gradient)
from .objective import chunk_sample_weights, chunk_weights, reconstruction_loss, sensitivity_from_errors
from .outliers import (OutlierMethod, OutlierResult, align_count, column_norms, count_outliers, detect_outliers,
                       layer_type, outlier_report, plot_outliers, top_k_channels)
from .range_init import (DEFAULT_PERCENTILES, HISTOGRAM_BINS, RangeSearchResult, candidate_scores, exact_quantiles,
                         histogram_percentile_mse_init, histogram_quantiles, percentile_mse_init, stack_samples)

__all__ = [
    # fake_quant
    "Granularity", "GroupLayout", "QuantParams", "QuantSpec", "broadcast_params", "clamp_ste", "dequantize",
    "fake_quant", "group_layout", "group_reduce", "group_rows", "lsq_grad_scale", "minmax_params", "minmax_range",
    "param_shape", "params_from_range", "quantize", "round_ste", "scale_gradient",
    # range_init
    "DEFAULT_PERCENTILES", "HISTOGRAM_BINS", "RangeSearchResult", "candidate_scores", "exact_quantiles",
    "histogram_percentile_mse_init", "histogram_quantiles", "percentile_mse_init", "stack_samples",
    # outliers
    "OutlierMethod", "OutlierResult", "align_count", "column_norms", "count_outliers", "detect_outliers",
    "layer_type", "outlier_report", "plot_outliers", "top_k_channels",
    # dual_scale
    "ChannelSplit", "DualScaleQuantParams", "LinearQuantParams", "dual_scale_linear", "init_dual_scale",
    "init_linear_quant", "make_split", "quantized_linear", "split_input", "split_weight",
    # objective
    "chunk_sample_weights", "chunk_weights", "reconstruction_loss", "sensitivity_from_errors",
    # adaround
    "AdaRoundConfig", "beta_schedule", "hard_weight", "init_v", "rectified_sigmoid", "rounding_loss",
    "rounding_regularizer", "soft_weight",
]
