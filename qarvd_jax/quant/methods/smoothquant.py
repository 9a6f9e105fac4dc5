"""SmoothQuant: migrate activation outliers into the weights with a per-input-channel scale.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (alpha = 0.5), ``X' = X diag(s)^-1``, ``W' = W diag(s)``
(on the K axis), then the RTN quantizers on ``X'`` and ``W'``: weights per output channel asymmetric
min-max, activations per tensor static min-max from the calibration inputs (``act_dynamic``: per token,
O1/O2). The weight is stored smoothed (``kernel = diag(s) kernel``); the inverse scale is an explicit
per-channel input scale ``smooth`` [in] applied before activation quantization: in the Wan DiT the
inputs of q/k/v and ffn.0 come from the adaLN-modulated norm (per-call modulation, not a static
affine) and ffn.2 follows a GELU, so no static fold exists for most layers (``quantizer_variants.md``
§9(d)); the fake-quant math is the same as a fold.

Paper: Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023 (arXiv 2211.10438), Eq. 4. Code: ``mit-han-lab/smoothquant`` ``smooth.py``
(``smooth_ln_fcs``: ``scales = act_scales^alpha / weight_scales^(1-alpha)``, clamp 1e-5).

Integer form: none here (the integer kernels take no per-channel input scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import CoreSpec, QuantizedLayer

NAME = "smoothquant"
HAS_INTEGER_FORM = False

__all__ = ["NAME", "Config", "Static", "quantize_layer", "apply", "quantize_model", "needs_calibration",
           "weight_bytes"]


@dataclass(frozen=True)
class Config:
    """``alpha``: migration strength (paper default 0.5); other fields as RTN."""

    w_bits: int = 8
    a_bits: int | None = 8
    alpha: float = 0.5
    act_dynamic: bool = False
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha={self.alpha} must be in [0, 1]")
        base.check_bits(NAME, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Static:
    core: CoreSpec


def needs_calibration(cfg: Config) -> bool:
    return True  # the channel maxima max|X_j|


def smooth_scales(kernel, x, alpha: float):
    """s [in] from kernel [in, out] and calibration inputs x [n, in]."""
    return base.smoothing_scales(jnp.max(jnp.abs(x), axis=0), jnp.max(jnp.abs(kernel), axis=1), alpha)


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in]."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=True, name=NAME)
    s = smooth_scales(kernel, x, config.alpha)
    ks = kernel * s[:, None]
    a = base.act_spec(config.a_bits, dynamic=config.act_dynamic) if config.a_bits else None
    core = CoreSpec(base.weight_spec(config.w_bits), a, a_dynamic=config.act_dynamic)
    state = base.core_calibrate(ks.T, x / s, core)
    state["smooth"] = s
    return QuantizedLayer(NAME, ks, bias, state, Static(core))


def apply(kernel, bias, state, x, static: Static, step, chunk, precision=None):
    """y = Q(x / s) Q(W diag(s))^T + b; ``kernel`` is the smoothed kernel."""
    xs = (x.astype(jnp.float32) / state["smooth"]).astype(x.dtype)
    y = base.core_apply(xs, kernel.T, state, static.core, precision)
    return y if bias is None else y + bias.astype(y.dtype)


weight_bytes = base.core_weight_bytes


quantize_model = base.rules_quantizer(NAME)
