"""Uniform affine fake quantization with straight-through gradients (Q-ARVD spec §2).

Integer grid
------------
* asymmetric (Q-ARVD weights and activations): codes in ``[0, 2^b - 1]``,
  ``q = clamp(round(x/Δ) + z, 0, 2^b - 1)``, ``x̂ = (q - z)·Δ`` with an integer zero point ``z``
  (``zero_point_mode="integer"``, rounded separately from ``x/Δ``). ``zero_point_mode="real"`` is the
  LSQ+/QVGen convention ``q = clamp(round(x/Δ + z), ...)`` with a real-valued ``z``.
* symmetric: codes in ``[-2^(b-1), 2^(b-1) - 1]``, no zero point (``QuantParams.zero_point is None``).

Granularity (``QuantSpec.granularity`` and ``QuantSpec.axis``) for an input of shape ``S``; the
parameters have exactly the listed *compact* shape, anything else is an error (no broadcasting):

============  ==========================================================  ================================
per_tensor    one (Δ, z) for the whole array                              ``()``
per_channel   one per index of ``axis`` (W[out, in]: ``axis=0``)           ``(S[axis],)``
per_token     one per index of every axis except the feature ``axis``     ``S`` without ``axis``
per_group     one per ``group_size`` consecutive elements along ``axis``  ``S`` with ``S[axis] -> S[axis]//g``
              and per index of every other axis
============  ==========================================================  ================================

Numerics: everything is computed in float32 whatever the input dtype; the result has the input dtype.

Gradients (``fake_quant``)
--------------------------
* round: straight-through (d round(v)/dv = 1).
* clamp: PyTorch semantics, gradient 1 for ``qmin <= v <= qmax`` (inclusive) and 0 outside. So
  ``dx̂/dx = 1`` inside the range and 0 outside.
* step Δ (LSQ): through both ``x/Δ`` and ``(q - z)·Δ``:
  ``dx̂/dΔ = round(x/Δ) - x/Δ`` inside (integer mode; real mode: ``q - z - x/Δ``), ``q_bound - z`` outside.
  Use :func:`scale_gradient` with :func:`lsq_grad_scale` for the LSQ gradient scale.
* zero point: none unless ``QuantSpec.learnable_zero_point`` (Q-ARVD keeps z frozen). When learnable,
  ``dx̂/dz = 0`` inside and ``-Δ`` outside (integer mode rounds z with a straight-through estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import jax
import jax.numpy as jnp

__all__ = [
    "Granularity",
    "QuantSpec",
    "QuantParams",
    "GroupLayout",
    "group_layout",
    "param_shape",
    "broadcast_params",
    "group_reduce",
    "group_rows",
    "round_ste",
    "clamp_ste",
    "scale_gradient",
    "lsq_grad_scale",
    "params_from_range",
    "minmax_range",
    "minmax_params",
    "quantize",
    "dequantize",
    "fake_quant",
]

Granularity = Literal["per_tensor", "per_channel", "per_token", "per_group"]
_GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group")
_ZERO_POINT_MODES = ("integer", "real")


@dataclass(frozen=True)
class QuantSpec:
    """Static description of one quantizer (hashable: pass it as a static argument under ``jit``).

    Attributes:
      bits: bit width, 2..16.
      symmetric: signed grid without zero point, else unsigned grid with zero point.
      granularity: see the module docstring.
      axis: per_channel: the axis that keeps its own scale; per_token: the feature axis that is
        reduced; per_group: the axis that is split into groups. Ignored for per_tensor.
      group_size: elements per group along ``axis`` (per_group only; must divide that axis).
      zero_point_mode: "integer" (Q-ARVD) or "real" (LSQ+).
      learnable_zero_point: let gradients reach the zero point (asymmetric only; Q-ARVD: False).
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "per_tensor"
    axis: int = -1
    group_size: int | None = None
    zero_point_mode: Literal["integer", "real"] = "integer"
    learnable_zero_point: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be an int in [2, 16], got {self.bits!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ValueError(f"QuantSpec.axis must be an int, got {self.axis!r}")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"per_group needs a positive int group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} is only valid with granularity='per_group', "
                             f"not {self.granularity!r}")
        if self.zero_point_mode not in _ZERO_POINT_MODES:
            raise ValueError(f"QuantSpec.zero_point_mode must be one of {_ZERO_POINT_MODES}, "
                             f"got {self.zero_point_mode!r}")
        if self.symmetric and self.learnable_zero_point:
            raise ValueError("learnable_zero_point=True needs an asymmetric quantizer (symmetric has no zero point)")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @classmethod
    def qarvd_weight(cls, bits: int, axis: int = 0) -> "QuantSpec":
        """Q-ARVD weight quantizer: per-output-channel asymmetric (``axis=0`` for W[out, in])."""
        return cls(bits=bits, symmetric=False, granularity="per_channel", axis=axis)

    @classmethod
    def qarvd_activation(cls, bits: int) -> "QuantSpec":
        """Q-ARVD activation quantizer: static per-tensor asymmetric."""
        return cls(bits=bits, symmetric=False, granularity="per_tensor")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantParams:
    """Quantizer parameters (a pytree). Shapes are the compact parameter shape of the spec.

    ``scale``: step Δ > 0. ``zero_point``: z stored as float (an integer value in integer mode);
    ``None`` for symmetric quantizers and required (not None) for asymmetric ones.
    """

    scale: jax.Array
    zero_point: jax.Array | None = None


@dataclass(frozen=True)
class GroupLayout:
    """How an input of shape ``shape`` is grouped for a spec (all static Python tuples).

    The input is viewed as ``view_shape``; each quantization group is the set of elements that
    share an index on all axes except ``reduce_axes`` of the view; the parameters (compact shape
    ``param_shape``) broadcast against the view after a reshape to ``bcast_shape``.
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    bcast_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    param_shape: tuple[int, ...]


def _normalize_axis(axis: int, ndim: int, spec: QuantSpec, shape) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"QuantSpec.axis={axis} is out of range for an input of shape {tuple(shape)} "
                         f"({spec.granularity})")
    return axis % ndim


def group_layout(shape, spec: QuantSpec) -> GroupLayout:
    """The :class:`GroupLayout` of an input shape under ``spec`` (raises on incompatible shapes)."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if spec.granularity == "per_tensor":
        return GroupLayout(shape, shape, (1,) * nd, tuple(range(nd)), ())
    if nd == 0:
        raise ValueError(f"{spec.granularity} quantization needs an input with at least one axis, got a scalar")
    a = _normalize_axis(spec.axis, nd, spec, shape)
    if spec.granularity == "per_channel":
        bcast = tuple(s if i == a else 1 for i, s in enumerate(shape))
        return GroupLayout(shape, shape, bcast, tuple(i for i in range(nd) if i != a), (shape[a],))
    if spec.granularity == "per_token":
        bcast = tuple(1 if i == a else s for i, s in enumerate(shape))
        return GroupLayout(shape, shape, bcast, (a,), shape[:a] + shape[a + 1:])
    g = spec.group_size
    if shape[a] % g:
        raise ValueError(f"group_size={g} does not divide axis {spec.axis} (length {shape[a]}) "
                         f"of an input of shape {shape}")
    n_groups = shape[a] // g
    view = shape[:a] + (n_groups, g) + shape[a + 1:]
    bcast = shape[:a] + (n_groups, 1) + shape[a + 1:]
    return GroupLayout(shape, view, bcast, (a + 1,), shape[:a] + (n_groups,) + shape[a + 1:])


def param_shape(shape, spec: QuantSpec) -> tuple[int, ...]:
    """Compact shape of ``QuantParams.scale`` / ``zero_point`` for an input of shape ``shape``."""
    return group_layout(shape, spec).param_shape


def _check_param(name: str, value, lay: GroupLayout, spec: QuantSpec) -> jax.Array:
    value = jnp.asarray(value)
    if value.shape != lay.param_shape:
        raise ValueError(f"{name} has shape {value.shape}, expected {lay.param_shape} for "
                         f"{spec.granularity} (axis={spec.axis}, group_size={spec.group_size}) "
                         f"quantization of an input of shape {lay.shape}")
    return value.astype(jnp.float32).reshape(lay.bcast_shape)


def broadcast_params(params: QuantParams, lay: GroupLayout, spec: QuantSpec):
    """Validate ``params`` against ``lay`` and return float32 ``(scale, zero_point)`` that broadcast
    against the input viewed as ``lay.view_shape``. ``zero_point`` is ``None`` for symmetric specs."""
    scale = _check_param("QuantParams.scale", params.scale, lay, spec)
    if spec.symmetric:
        if params.zero_point is not None:
            raise ValueError("a symmetric QuantSpec takes QuantParams.zero_point=None")
        return scale, None
    if params.zero_point is None:
        raise ValueError("an asymmetric QuantSpec needs QuantParams.zero_point (got None)")
    return scale, _check_param("QuantParams.zero_point", params.zero_point, lay, spec)


def group_reduce(x: jax.Array, spec: QuantSpec, op: Callable = jnp.mean) -> jax.Array:
    """Reduce each quantization group with ``op(view, axis=...)`` (jnp.min/max/mean/sum...).

    Returns an array of the compact parameter shape.
    """
    lay = group_layout(x.shape, spec)
    return op(jnp.reshape(x, lay.view_shape), axis=lay.reduce_axes)


def group_rows(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """The input as ``[num_groups, group_elements]``; row r is the flattened group whose index in
    the compact parameter array (C order) is r. Used for per-group quantiles."""
    lay = group_layout(x.shape, spec)
    kept = tuple(i for i in range(len(lay.view_shape)) if i not in lay.reduce_axes)
    xv = jnp.transpose(jnp.reshape(x, lay.view_shape), kept + lay.reduce_axes)
    return jnp.reshape(xv, (math.prod(lay.param_shape), -1))


def round_ste(v: jax.Array) -> jax.Array:
    """round (half to even, like torch.round) with a straight-through (identity) gradient."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def clamp_ste(v: jax.Array, lo, hi) -> jax.Array:
    """clamp with PyTorch gradient semantics: gradient 1 for ``lo <= v <= hi``, 0 outside."""
    inside = (v >= lo) & (v <= hi)
    return jnp.where(inside, v, jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def scale_gradient(p: jax.Array, g) -> jax.Array:
    """Forward value ``p``, gradient multiplied by ``g`` (LSQ gradient scaling)."""
    return p * g + jax.lax.stop_gradient(p - p * g)


def lsq_grad_scale(num_elements: int, spec: QuantSpec) -> float:
    """LSQ gradient scale ``1/sqrt(N·Q_P)``, N = elements sharing one step, Q_P = ``spec.qmax``."""
    if num_elements < 1:
        raise ValueError(f"num_elements must be >= 1, got {num_elements}")
    return 1.0 / math.sqrt(num_elements * spec.qmax)


def params_from_range(lo, hi, spec: QuantSpec, *, min_scale: float = 1e-8) -> QuantParams:
    """(Δ, z) from a clipping range, elementwise over any shape (e.g. ``[P, *param_shape]``).

    asymmetric: ``Δ = max((hi - lo)/(2^b - 1), min_scale)``, ``z = round(-lo/Δ)`` (integer mode) or
    ``-lo/Δ`` (real mode); z is not clamped to the grid (spec §2: lo/hi need not include 0).
    symmetric: ``Δ = max(max(|lo|, |hi|)/(2^(b-1) - 1), min_scale)``, no zero point.
    ``min_scale`` only guards degenerate (constant) ranges.
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"lo and hi must have the same shape, got {lo.shape} and {hi.shape}")
    if spec.symmetric:
        scale = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / spec.qmax, min_scale)
        return QuantParams(scale, None)
    scale = jnp.maximum((hi - lo) / (2**spec.bits - 1), min_scale)
    zero_point = -lo / scale
    if spec.zero_point_mode == "integer":
        zero_point = jnp.round(zero_point)
    return QuantParams(scale, zero_point)


def minmax_range(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-group (min, max) of ``x`` (compact parameter shape), in float32."""
    x = jnp.asarray(x, jnp.float32)
    return group_reduce(x, spec, jnp.min), group_reduce(x, spec, jnp.max)


def minmax_params(x: jax.Array, spec: QuantSpec) -> QuantParams:
    """Min/max init: :func:`params_from_range` of :func:`minmax_range` (not a Q-ARVD candidate)."""
    return params_from_range(*minmax_range(x, spec), spec)


def _zero_point(zp: jax.Array | None, spec: QuantSpec):
    if zp is None:
        return 0.0
    if spec.zero_point_mode == "integer":
        return round_ste(zp) if spec.learnable_zero_point else jax.lax.stop_gradient(jnp.round(zp))
    return zp if spec.learnable_zero_point else jax.lax.stop_gradient(zp)


def _codes(xv, scale, zp, spec: QuantSpec, rnd: Callable):
    """Clamped (float) integer codes of the float32 view ``xv``."""
    if spec.zero_point_mode == "integer":
        v = rnd(xv / scale) + zp
    else:
        v = rnd(xv / scale + zp)
    return clamp_ste(v, spec.qmin, spec.qmax)


@partial(jax.jit, static_argnames=("spec",))
def fake_quant(x: jax.Array, params: QuantParams, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize ``x`` (any shape and float dtype) with STE/LSQ gradients.

    Computed in float32, returned in ``x.dtype``. Gradients: see the module docstring.
    """
    x = jnp.asarray(x)
    lay = group_layout(x.shape, spec)
    scale, zp = broadcast_params(params, lay, spec)
    zp = _zero_point(zp, spec)
    xv = jnp.reshape(x.astype(jnp.float32), lay.view_shape)
    q = _codes(xv, scale, zp, spec, round_ste)
    return jnp.reshape((q - zp) * scale, x.shape).astype(x.dtype)


@partial(jax.jit, static_argnames=("spec",))
def quantize(x: jax.Array, params: QuantParams, spec: QuantSpec) -> jax.Array:
    """Integer codes (int32, shape of ``x``) in ``[spec.qmin, spec.qmax]``; no gradient."""
    x = jnp.asarray(x)
    lay = group_layout(x.shape, spec)
    scale, zp = broadcast_params(params, lay, spec)
    zp = 0.0 if zp is None else (jnp.round(zp) if spec.zero_point_mode == "integer" else zp)
    q = _codes(jnp.reshape(x.astype(jnp.float32), lay.view_shape), scale, zp, spec, jnp.round)
    return jnp.reshape(q, x.shape).astype(jnp.int32)


@partial(jax.jit, static_argnames=("spec", "dtype"))
def dequantize(q: jax.Array, params: QuantParams, spec: QuantSpec, dtype=jnp.float32) -> jax.Array:
    """``(q - z)·Δ`` for integer codes ``q`` (shape of the original input), returned in ``dtype``."""
    q = jnp.asarray(q)
    lay = group_layout(q.shape, spec)
    scale, zp = broadcast_params(params, lay, spec)
    zp = 0.0 if zp is None else (jnp.round(zp) if spec.zero_point_mode == "integer" else zp)
    out = (jnp.reshape(q.astype(jnp.float32), lay.view_shape) - zp) * scale
    return jnp.reshape(out, q.shape).astype(dtype)
