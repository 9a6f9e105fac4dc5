"""SmoothQuant: migrate activation outliers into the weights with a per-input-channel scale.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (alpha = 0.5), ``X' = X diag(s)^-1``, ``W' = W diag(s)``
(on the K axis), then the RTN quantizers on ``X'`` and ``W'``: weights per output channel asymmetric
min-max, activations per tensor static min-max from the calibration inputs (``act_dynamic``: per token,
O1/O2). The weight is stored smoothed (``kernel = diag(s) kernel``); the inverse scale is an explicit
per-channel input scale ``smooth`` [in] applied before activation quantization, except where the graph
allows a static fold: at model level (``fold_norm=true``) the ``1/s`` of every ``blocks.*.cross_attn.q``
is folded into the affine ``norm3`` that feeds only it (``norm3.scale /= s``, ``norm3.bias /= s``, then
``smooth = 1``). The other inputs have no static fold: self-attention q/k/v and ffn.0 read the
adaLN-modulated norm (a per-call modulation, ``quantizer_variants.md`` §9(d)), ffn.2 follows a GELU,
the o projections follow the attention and cross-attention k/v share one context across blocks.

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
    fold_norm: bool = True
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


def fold_into_norms(model) -> list[str]:
    """Fold the input scale of every SmoothQuant ``blocks.*.cross_attn.q`` into its block's affine
    ``norm3`` (in place); returns the folded layer names."""
    from flax import nnx

    from qarvd_jax.quant.methods.model import iter_method_layers

    norms = {}
    for path, node in nnx.iter_graph(model):
        if path and path[-1] == "norm3" and hasattr(node, "scale") and hasattr(node, "bias"):
            norms[".".join(str(p) for p in path if p != "layers")] = node
    folded = []
    for name, layer in iter_method_layers(model):
        norm = norms.get(name.replace(".cross_attn.q", ".norm3"))
        if layer.method != NAME or not name.endswith(".cross_attn.q") or norm is None:
            continue
        s = layer.q_smooth[...]
        for p in (norm.scale, norm.bias):
            p[...] = (p[...].astype(jnp.float32) / s).astype(p[...].dtype)
        layer.q_smooth[...] = jnp.ones_like(s)
        folded.append(name)
    return folded


_quantize_by_rules = base.rules_quantizer(NAME)


def quantize_model(model, calibration, config: Config, rules=None) -> dict:
    """By rules (:class:`~qarvd_jax.quant.methods.model.MethodRule`), then the norm3 folds (``fold_norm``)."""
    out = _quantize_by_rules(model, calibration, config, rules)
    out["folded_into_norm3"] = fold_into_norms(model) if config.fold_norm else []
    return out
