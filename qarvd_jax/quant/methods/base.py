"""Shared pieces of the quantizer-variant interface (every method file builds on these).

A method is a module with ``NAME``, ``Config`` (frozen dataclass, at least ``w_bits: int`` and
``a_bits: int | None``), ``HAS_INTEGER_FORM``, ``quantize_layer(kernel, bias, calib_inputs, config,
*, steps=None) -> QuantizedLayer``, ``apply(kernel, bias, state, x, static, step, chunk) -> y`` and
``quantize_model(model, calibration, config, rules=None) -> summary``.

Layouts: ``kernel`` [in, out] (Flax), ``bias`` [out] or None, ``calib_inputs`` [n, in] (None for
data-free methods), ``steps`` [n] int32 the denoising pass of each calibration row (0..S, S = the
context pass; cross-attention K/V rows: 0). Inside methods weights are handled as ``W = kernel.T``
[out, in] so the quantizer specs read like the papers (per output channel = axis 0).

Model level, :class:`MethodLinear` holds a layer's arrays: ``kernel``/``bias`` as ``nnx.Param``,
the method's state as :class:`~qarvd_jax.quant.qlinear.QuantState` (``q_<name>``) and the step
context (``step_index``, ``chunk_index``, :class:`StepContext`) that the pipeline writes explicitly
before every model call (:func:`qarvd_jax.pipeline.causal_inference.with_step_context`); nothing
counts calls. Layers whose quantized form is exactly the Q-ARVD :class:`QuantLinear` layout (per-
channel asymmetric weights, static per-tensor activations) are installed as QuantLinears, so the
integer export and kernels run them unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.quant.fake_quant import QuantParams, QuantSpec, fake_quant, minmax_params
from qarvd_jax.quant.qlinear import QuantState

__all__ = ["QuantizedLayer", "StepContext", "MethodLinear", "CoreSpec", "weight_spec", "act_spec", "core_calibrate",
           "core_apply", "static_to_dict", "static_from_dict", "layer_weight_bytes", "check_layer_inputs",
           "smoothing_scales", "check_bits", "core_weight_bytes", "rules_quantizer", "core_to_quant_linear"]


# ------------------------------------------------------------------------------------------ one layer
@jax.tree_util.register_pytree_node_class
class QuantizedLayer:
    """A quantized linear as data: ``layer(x)`` for ``x [..., in]`` is the fake-quantized output.

    Pure and jit-able (a pytree: arrays are leaves, ``method`` and ``static`` are static). ``step``
    and ``chunk`` are the denoising pass and chunk index (traced ints; per-timestep methods use them).
    """

    def __init__(self, method: str, kernel, bias, state: Mapping[str, Any], static):
        self.method = method
        self.kernel = kernel
        self.bias = bias
        self.state = dict(state)
        self.static = static

    def tree_flatten(self):
        names = tuple(sorted(self.state))
        return (self.kernel, self.bias, tuple(self.state[n] for n in names)), (self.method, self.static, names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        method, static, names = aux
        kernel, bias, vals = children
        return cls(method, kernel, bias, dict(zip(names, vals)), static)

    def __call__(self, x, step=0, chunk=0, precision=None):
        from qarvd_jax.quant import methods

        return methods.get(self.method).apply(self.kernel, self.bias, self.state, x, self.static,
                                              jnp.asarray(step, jnp.int32), jnp.asarray(chunk, jnp.int32),
                                              precision=precision)


class StepContext(nnx.Variable):
    """Denoising-pass and chunk index of the current model call (set by the pipeline, never counted)."""


class MethodLinear(nnx.Module):
    """Drop-in replacement of an ``nnx.Linear`` that runs a method's quantized layer."""

    def __init__(self, layer: QuantizedLayer, dtype=None, precision=None):
        self.kernel = nnx.Param(layer.kernel)
        self.bias = nnx.Param(layer.bias) if layer.bias is not None else None
        self.method = layer.method
        self.static = layer.static
        self.state_names = tuple(sorted(layer.state))
        for n in self.state_names:
            setattr(self, "q_" + n, QuantState(layer.state[n]))
        self.dtype = dtype
        self.precision = precision
        self.step_index = StepContext(jnp.zeros((), jnp.int32))
        self.chunk_index = StepContext(jnp.zeros((), jnp.int32))

    def quantized_layer(self) -> QuantizedLayer:
        state = {n: getattr(self, "q_" + n)[...] for n in self.state_names}
        return QuantizedLayer(self.method, self.kernel[...], self.bias[...] if self.bias is not None else None,
                              state, self.static)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype) if self.dtype is not None else x
        return self.quantized_layer()(x, self.step_index[...], self.chunk_index[...], precision=self.precision)


# ------------------------------------------------------------------------------------------ quantizers
def weight_spec(bits: int, *, symmetric: bool = False, group_size: int | None = None) -> QuantSpec:
    """Spec over W [out, in]: per output channel (axis 0), or per group of ``group_size`` along in."""
    if group_size:
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_group", axis=1, group_size=group_size)
    return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_channel", axis=0)


def act_spec(bits: int, *, dynamic: bool, symmetric: bool = False, group_size: int | None = None) -> QuantSpec:
    """Spec over x [..., in]: static per tensor, or dynamic per token (per token-group of ``group_size``)."""
    if group_size:
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_group", axis=-1, group_size=group_size)
    if dynamic:
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_token", axis=-1)
    return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_tensor")


@dataclass(frozen=True)
class CoreSpec:
    """How the main matmul ``x W^T`` is fake-quantized: ``w_spec`` over W [out, in] (None: FP),
    ``a_spec`` over x (None: FP); ``a_dynamic``: activation (Δ, z) from x at run time (min-max),
    else the static ``a_scale``/``a_zero`` of the state."""

    w_spec: QuantSpec | None
    a_spec: QuantSpec | None
    a_dynamic: bool = False


def _params(state: Mapping[str, Any], prefix: str, spec: QuantSpec) -> QuantParams:
    return QuantParams(state[prefix + "_scale"], None if spec.symmetric else state[prefix + "_zero"])


def core_calibrate(w: jax.Array, x: jax.Array | None, core: CoreSpec) -> dict[str, jax.Array]:
    """Min-max state of the core quantizers. ``w`` [out, in]; ``x`` [n, in] (static activations only).

    Returns ``w_scale``/``w_zero`` (compact shape of the weight spec) and, for static activations,
    ``a_scale``/``a_zero`` (scalars). Symmetric specs store no zero point."""
    out = {}
    if core.w_spec is not None:
        p = minmax_params(w, core.w_spec)
        out["w_scale"] = p.scale
        if p.zero_point is not None:
            out["w_zero"] = p.zero_point
    if core.a_spec is not None and not core.a_dynamic:
        if x is None:
            raise ValueError("static activation quantization needs calibration inputs (calib_inputs [n, in])")
        p = minmax_params(jnp.asarray(x, jnp.float32), core.a_spec)
        out["a_scale"] = p.scale
        if p.zero_point is not None:
            out["a_zero"] = p.zero_point
    return out


def quant_act(x: jax.Array, state: Mapping[str, Any], core: CoreSpec) -> jax.Array:
    """Fake-quantized activations (x's dtype)."""
    if core.a_spec is None:
        return x
    if core.a_dynamic:
        return fake_quant(x, minmax_params(jax.lax.stop_gradient(x), core.a_spec), core.a_spec)
    return fake_quant(x, _params(state, "a", core.a_spec), core.a_spec)


def quant_weight(w: jax.Array, state: Mapping[str, Any], core: CoreSpec) -> jax.Array:
    """Fake-quantized W [out, in] (float32) with the stored weight parameters."""
    w = jnp.asarray(w, jnp.float32)
    if core.w_spec is None:
        return w
    return fake_quant(w, _params(state, "w", core.w_spec), core.w_spec)


def core_apply(x: jax.Array, w: jax.Array, state: Mapping[str, Any], core: CoreSpec, precision=None) -> jax.Array:
    """``Q(x) Q(W)^T`` for x [..., in], W [out, in] -> [..., out] in x's dtype."""
    xq = quant_act(x, state, core)
    wq = quant_weight(w, state, core)
    return jnp.einsum("...i,oi->...o", xq, wq.astype(x.dtype), precision=precision)


def core_linear_apply(kernel, bias, state, x, static, step, chunk, precision=None):
    """``apply`` of a method whose static holds a ``core``: y [..., out] = Q(x) Q(W)^T + b."""
    y = core_apply(x, kernel.T, state, static.core, precision)
    return y if bias is None else y + bias.astype(y.dtype)


def core_to_quant_linear(state: Mapping[str, Any], core: CoreSpec):
    """The Q-ARVD :class:`QuantLinear` form (one group) of a core with per-channel asymmetric weights
    and static per-tensor asymmetric (or FP) activations: ``(LayerQuantConfig, state)``, else None."""
    from qarvd_jax.quant.recipe import LayerQuantConfig

    if core.a_dynamic or core.w_spec is None or core.w_spec.granularity != "per_channel" or core.w_spec.symmetric:
        return None
    if core.a_spec is not None and (core.a_spec.granularity != "per_tensor" or core.a_spec.symmetric):
        return None
    out = int(state["w_scale"].shape[0])
    cfg = LayerQuantConfig(name="", w_spec=QuantSpec.qarvd_weight(core.w_spec.bits, axis=0),
                           a_spec=QuantSpec.qarvd_activation(core.a_spec.bits) if core.a_spec else None,
                           reconstruct=False)
    one = jnp.ones((), jnp.float32)
    qstate = {"w_scale": state["w_scale"].reshape(1, out), "w_zero": state["w_zero"].reshape(1, out),
              "a_scale": state.get("a_scale", one).reshape(1), "a_zero": state.get("a_zero", 0 * one).reshape(1),
              "w_on": one, "a_on": one}
    return cfg, qstate


def smoothing_scales(x_absmax, w_absmax, alpha: float, beta: float | None = None, eps: float = 1e-5) -> jax.Array:
    """SmoothQuant-style ``s_j = max|X_j|^alpha / max|W_j|^beta`` (``beta`` default 1 - alpha), [in].

    Channels whose activation or weight maximum is 0 get s = 1."""
    beta = 1.0 - alpha if beta is None else beta
    xa = jnp.asarray(x_absmax, jnp.float32)
    wa = jnp.asarray(w_absmax, jnp.float32)
    ok = (xa > 0) & (wa > 0)
    s = jnp.power(jnp.maximum(xa, eps), alpha) / jnp.power(jnp.maximum(wa, eps), beta)
    return jnp.where(ok, jnp.maximum(s, eps), 1.0)


# ------------------------------------------------------------------------------------------ helpers
def check_layer_inputs(kernel, bias, calib_inputs, *, needs_data: bool, name: str):
    """Validate shapes; returns (kernel f32 [in, out], bias f32 [out] | None, x f32 [n, in] | None)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: kernel must be [in, out], got shape {kernel.shape}")
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (kernel.shape[1],):
            raise ValueError(f"{name}: bias must be [out]={kernel.shape[1]}, got {bias.shape}")
    if calib_inputs is None:
        if needs_data:
            raise ValueError(f"{name} needs calibration inputs calib_inputs [n, in]")
        return kernel, bias, None
    x = jnp.asarray(calib_inputs, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"{name}: calib_inputs have {x.shape[-1]} features, kernel has in={kernel.shape[0]}")
    return kernel, bias, x


def check_bits(name: str, w_bits: int, a_bits: int | None) -> None:
    """Config validation shared by the methods: bit widths in [2, 16] (a_bits may be None)."""
    if not 2 <= w_bits <= 16 or (a_bits is not None and not 2 <= a_bits <= 16):
        raise ValueError(f"{name}: w_bits={w_bits}, a_bits={a_bits} must be in [2, 16]")


def core_weight_bytes(layer: QuantizedLayer) -> int:
    """:func:`layer_weight_bytes` of a layer whose static has a ``core`` (or ``w_spec``)."""
    spec = layer.static.core.w_spec if hasattr(layer.static, "core") else layer.static.w_spec
    st = {n: v for n, v in layer.state.items() if n not in ("outlier_idx", "normal_idx")}
    k = layer.kernel
    return layer_weight_bytes(k.shape[0], k.shape[1], spec.bits if spec else None, st,
                              has_bias=layer.bias is not None)


def rules_quantizer(name: str):
    """The ``quantize_model(model, calibration, config, rules=None)`` of a per-layer method: the DiT in
    place by :class:`~qarvd_jax.quant.methods.model.MethodRule` rules (default ``config.layers``)."""

    def quantize_model(model, calibration, config, rules=None) -> dict:
        from qarvd_jax.quant.methods.model import quantize_model_with_rules

        return quantize_model_with_rules(model, calibration, config, rules, name)

    quantize_model.__doc__ = f"Quantize the DiT in place with {name} (rules: MethodRule, default config.layers)."
    return quantize_model


def _is_spec(tp) -> bool:
    return tp is QuantSpec or QuantSpec in typing.get_args(tp)


def static_to_dict(static) -> dict[str, Any]:
    """A method's static layer description (frozen dataclass) as JSON-ready data."""
    return {"type": type(static).__module__ + ":" + type(static).__qualname__, **dataclasses.asdict(static)}


def static_from_dict(d: Mapping[str, Any]):
    """Inverse of :func:`static_to_dict` (QuantSpec fields rebuilt, lists back to tuples)."""
    import importlib

    d = dict(d)
    mod, qual = d.pop("type").split(":")
    cls = getattr(importlib.import_module(mod), qual)
    hints = typing.get_type_hints(cls)

    def conv(tp, v):
        if v is None:
            return None
        if _is_spec(tp):
            return QuantSpec(**v)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp) or any(dataclasses.is_dataclass(a) for a in typing.get_args(tp)):
            sub = tp if dataclasses.is_dataclass(tp) else next(a for a in typing.get_args(tp)
                                                                if dataclasses.is_dataclass(a))
            sh = typing.get_type_hints(sub)
            return sub(**{k: conv(sh[k], x) for k, x in v.items()})
        if isinstance(v, list) or origin is tuple:
            return tuple(tuple(x) if isinstance(x, list) else x for x in v)
        return v

    return cls(**{k: conv(hints[k], v) for k, v in d.items()})


def layer_weight_bytes(in_features: int, out_features: int, w_bits: int | None, state: Mapping[str, Any],
                       *, has_bias: bool, fp_bytes: int = 2, code_names: Sequence[str] = ()) -> int:
    """Deployed bytes of one layer: weight codes at ``w_bits`` (16-bit when None), every state array
    at 4 bytes per element except ``code_names`` (ignored) and low-rank branches ``lr_*`` (16-bit),
    and the bias at 16 bits."""
    bits = w_bits or 16
    total = math.ceil(in_features * out_features * bits / 8)
    for n, v in state.items():
        if n in code_names or n in ("w_on", "a_on"):
            continue
        size = int(np.prod(np.shape(v)))
        total += size * (fp_bytes if n.startswith("lr_") else 4)
    if has_bias:
        total += out_features * fp_bytes
    return int(total)
