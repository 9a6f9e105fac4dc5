"""Quantized linear layers, single- and dual-scale (Q-ARVD spec §4), as pure functions.

Layouts: x ``[..., in]``, W ``[out, in]`` (PyTorch layout; transpose a Flax kernel [in, out] first),
bias ``[out]``, y ``[..., out]``.

* :func:`quantized_linear`: ``y = Q_a(x) Q_w(W)^T + b``.
* :func:`dual_scale_linear`: ``y = Q(X_O) Q(W_O)^T + b + Q(X_N) Q(W_N)^T`` with X_O = x[..., O],
  W_O = W[:, O] for the outlier channels O and N the rest; each group has its own per-output-channel
  weight quantizer and per-tensor activation quantizer, at the same bit width. The bias is added once.

The matmul runs in the dtype of the (fake-quantized) operands, e.g. bf16 when x and W are bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .fake_quant import QuantParams, QuantSpec, fake_quant
from .range_init import (DEFAULT_PERCENTILES, HISTOGRAM_BINS, histogram_percentile_mse_init, percentile_mse_init,
                         stack_samples)

__all__ = [
    "ChannelSplit",
    "LinearQuantParams",
    "DualScaleQuantParams",
    "make_split",
    "split_weight",
    "split_input",
    "quantized_linear",
    "dual_scale_linear",
    "init_linear_quant",
    "init_dual_scale",
]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ChannelSplit:
    """Input-channel partition (a pytree of int32 index arrays): ``outlier`` [K], ``normal`` [in-K]."""

    outlier: jax.Array
    normal: jax.Array

    @property
    def in_features(self) -> int:
        return int(self.outlier.shape[0] + self.normal.shape[0])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LinearQuantParams:
    """Quantizer parameters of one linear: ``weight`` (per output channel) and ``act`` (per tensor);
    ``None`` leaves that operand in full precision (e.g. Q-ARVD pass A: W on, A off)."""

    weight: QuantParams | None = None
    act: QuantParams | None = None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DualScaleQuantParams:
    """Quantizer parameters of the outlier group and of the normal group."""

    outlier: LinearQuantParams
    normal: LinearQuantParams


def make_split(channels, in_features: int) -> ChannelSplit:
    """:class:`ChannelSplit` from outlier channel indices (host-side validation).

    ``normal`` is the ascending complement. Raises if indices repeat, fall outside [0, in_features),
    or leave either group empty.
    """
    idx = np.asarray(channels)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"channels must be a 1-D integer array, got dtype {idx.dtype} shape {idx.shape}")
    if not 0 < idx.size < in_features:
        raise ValueError(f"need 0 < len(channels) < in_features={in_features}, got {idx.size} channels")
    if idx.min() < 0 or idx.max() >= in_features:
        raise ValueError(f"channel indices must lie in [0, {in_features}), got min {idx.min()} max {idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError("channel indices must be unique")
    normal = np.setdiff1d(np.arange(in_features), idx)
    return ChannelSplit(jnp.asarray(idx, jnp.int32), jnp.asarray(normal, jnp.int32))


def _check_in(name: str, shape, axis: int, split: ChannelSplit):
    if len(shape) < 1 or shape[axis] != split.in_features:
        raise ValueError(f"{name} of shape {tuple(shape)} does not have {split.in_features} input "
                         f"channels on axis {axis} (the split's size)")


def split_weight(w: jax.Array, split: ChannelSplit) -> tuple[jax.Array, jax.Array]:
    """``(W[:, O], W[:, N])`` of a weight W[out, in]."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"split_weight needs W[out, in], got shape {w.shape}")
    _check_in("W", w.shape, 1, split)
    return jnp.take(w, split.outlier, axis=1), jnp.take(w, split.normal, axis=1)


def split_input(x: jax.Array, split: ChannelSplit) -> tuple[jax.Array, jax.Array]:
    """``(x[..., O], x[..., N])`` of an input x[..., in]."""
    x = jnp.asarray(x)
    _check_in("x", x.shape, -1, split)
    return jnp.take(x, split.outlier, axis=-1), jnp.take(x, split.normal, axis=-1)


def quantized_linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None,
                     qparams: LinearQuantParams | None = None, *, w_spec: QuantSpec | None = None,
                     a_spec: QuantSpec | None = None) -> jax.Array:
    """``Q_a(x) Q_w(W)^T + b``; x [..., in], W [out, in], bias [out] or None -> y [..., out].

    A quantizer is applied when its params in ``qparams`` are not None (its spec is then required).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"quantized_linear needs x[..., in] and W[out, in], got x {x.shape} and W {w.shape}")
    qparams = qparams or LinearQuantParams()
    if qparams.act is not None:
        if a_spec is None:
            raise ValueError("activation params given without a_spec")
        x = fake_quant(x, qparams.act, a_spec)
    if qparams.weight is not None:
        if w_spec is None:
            raise ValueError("weight params given without w_spec")
        w = fake_quant(w, qparams.weight, w_spec)
    y = jnp.einsum("...i,oi->...o", x, w)
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {bias.shape}")
        y = y + bias.astype(y.dtype)
    return y


def dual_scale_linear(x: jax.Array, w_outlier: jax.Array, w_normal: jax.Array, bias: jax.Array | None,
                      qparams: DualScaleQuantParams, split: ChannelSplit, *, w_spec: QuantSpec,
                      a_spec: QuantSpec) -> jax.Array:
    """``Q(X_O) Q(W_O)^T + b + Q(X_N) Q(W_N)^T``.

    x [..., in]; w_outlier [out, K], w_normal [out, in-K] (from :func:`split_weight`); bias [out].
    """
    x_o, x_n = split_input(x, split)
    y_o = quantized_linear(x_o, w_outlier, bias, qparams.outlier, w_spec=w_spec, a_spec=a_spec)
    return y_o + quantized_linear(x_n, w_normal, None, qparams.normal, w_spec=w_spec, a_spec=a_spec)


def init_linear_quant(w: jax.Array, x_samples=None, *, w_spec: QuantSpec, a_spec: QuantSpec,
                      sample_weights: jax.Array | None = None,
                      percentiles=DEFAULT_PERCENTILES, bins: int = HISTOGRAM_BINS) -> LinearQuantParams:
    """Q-ARVD init of one linear: weight by :func:`percentile_mse_init` (per row, data-free);
    activation by :func:`histogram_percentile_mse_init` over ``x_samples`` ([N, ..., in] or a list)
    with ``sample_weights`` ω (None: ones). Without samples ``act`` is None."""
    weight = percentile_mse_init(w, w_spec, percentiles).params
    if x_samples is None:
        return LinearQuantParams(weight, None)
    act = histogram_percentile_mse_init(x_samples, a_spec, sample_weights=sample_weights,
                                        percentiles=percentiles, bins=bins).params
    return LinearQuantParams(weight, act)


def init_dual_scale(w: jax.Array, split: ChannelSplit, x_samples=None, *, w_spec: QuantSpec,
                    a_spec: QuantSpec, percentiles=DEFAULT_PERCENTILES,
                    bins: int = HISTOGRAM_BINS) -> tuple[jax.Array, jax.Array, DualScaleQuantParams]:
    """Split W[out, in] and initialise both groups independently (:func:`init_linear_quant`).

    Activation scoring uses ω ≡ 1, as Q-ARVD does for every dual-scale layer.
    Returns ``(w_outlier, w_normal, params)``.
    """
    w_o, w_n = split_weight(w, split)
    xs_o = xs_n = None
    if x_samples is not None:
        xs_o, xs_n = split_input(stack_samples(x_samples), split)
    kw = dict(w_spec=w_spec, a_spec=a_spec, percentiles=percentiles, bins=bins)
    return w_o, w_n, DualScaleQuantParams(init_linear_quant(w_o, xs_o, **kw), init_linear_quant(w_n, xs_n, **kw))
