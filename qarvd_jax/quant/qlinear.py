"""Fake-quantized linear layer (single or dual scale) and the model surgery that installs it.

Quantization state lives in its own variable collection, :class:`QuantState`, separate from the
``nnx.Param`` weights. Per layer (``G`` = 1 group, or 2 for dual scale: outlier group first):

==============  ==============  ==========================================================
``w_scale``     [G, out]        per-output-channel weight step Δ_w (asymmetric)
``w_zero``      [G, out]        weight zero point (integer-valued float)
``a_scale``     [G]             per-tensor activation step Δ_a (learned in reconstruction)
``a_zero``      [G]             activation zero point (frozen)
``w_on``        []              1.0: fake-quantize the weight; 0.0: use it as is
``a_on``        []              1.0: fake-quantize the input
``outlier_idx`` [K] int32       input channels of the outlier group (dual scale only)
``normal_idx``  [in-K] int32    the other input channels (dual scale only)
``group_mask``  [in] float32    mask form only (training), instead of the two index arrays:
                                1.0 = outlier channel (group 0), 0.0 = normal (group 1)
==============  ==============  ==========================================================

The flags are traced values, so turning quantization on or off (per chunk, per pass) swaps state
leaves without recompiling. The forward is ``y = Σ_g Q(X_g) Q(W_g) + b`` (bias once).

Mask form (``cfg.group_mask``; :mod:`qarvd_jax.quant.stackable` converts to and from it): the same sum
over input channels as one matmul, ``y = Q(X; a_{g(c)}) Q(W; w_{g(c), o})ᵀ + b``, with each channel's
activation step and each (o, c) weight step taken from its group ``g(c)`` by ``jnp.where`` (so the
gradient of a group's step is the sum over its channels, as in the gathered form). Arrays have fixed
shapes whatever K is, so the blocks of a model stack for ``lax.scan`` (QAT).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.quant.adaround import AdaRoundConfig, soft_weight
from qarvd_jax.quant.fake_quant import QuantParams, QuantSpec, fake_quant, group_layout
from qarvd_jax.quant.recipe import LayerQuantConfig, match_rule

__all__ = ["QuantState", "QuantLinear", "qlinear_apply", "mask_form_specs", "install_layers", "quantize_model",
           "iter_quant_layers", "set_quant_flags", "with_quant_flags", "set_collect"]


class QuantState(nnx.Variable):
    """Quantizer state (scales, zero points, flags, outlier channel indices)."""


def _groups(x, kernel, state: dict, cfg: LayerQuantConfig):
    """[(x_g [..., in_g], W_g [out, in_g])] in group order."""
    w = kernel.T
    if not cfg.n_outlier:
        return [(x, w)]
    o, n = state["outlier_idx"], state["normal_idx"]
    return [(jnp.take(x, o, axis=-1), jnp.take(w, o, axis=1)), (jnp.take(x, n, axis=-1), jnp.take(w, n, axis=1))]


def mask_form_specs(cfg: LayerQuantConfig) -> tuple[QuantSpec | None, QuantSpec | None]:
    """(activation, weight) specs of the mask form of ``cfg``'s quantizers: the activation's per-tensor step
    of each group becomes a per-input-channel step (``per_channel``, last axis) and the weight's per-row step
    of each group a per-element step of ``W [out, in]`` (``per_group`` of size 1 along ``in``).

    Raises ``ValueError`` for quantizers whose per-group parameters depend on which channels are in the group
    (activations other than per_tensor; weights per input channel or per group)."""
    a = w = None
    if cfg.a_spec is not None:
        if cfg.a_spec.granularity != "per_tensor":
            raise ValueError(f"{cfg.name}: the mask form needs a per_tensor activation quantizer, "
                             f"not {cfg.a_spec.granularity}")
        a = dataclasses.replace(cfg.a_spec, granularity="per_channel", axis=-1)
    if cfg.w_spec is not None:
        if cfg.w_spec.granularity == "per_group" or group_layout((2, 2), cfg.w_spec).bcast_shape[1] != 1:
            raise ValueError(f"{cfg.name}: the mask form needs weight steps shared along the input axis "
                             f"(per_tensor, or per output channel), not {cfg.w_spec}")
        w = dataclasses.replace(cfg.w_spec, granularity="per_group", axis=1, group_size=1)
    return a, w


def _mask_apply(x, kernel, bias, state: dict, cfg: LayerQuantConfig, precision):
    """:func:`qlinear_apply` of a mask-form layer (module docstring): one matmul over every channel."""
    if "group_mask" not in state:
        raise ValueError(f"{cfg.name}: a mask-form config needs the group_mask state leaf")
    dtype = x.dtype
    a_spec, w_spec = mask_form_specs(cfg)
    outlier = state["group_mask"] > 0  # [in]
    w = kernel.T  # [out, in]
    if a_spec is not None:
        per_chan = lambda p: jnp.where(outlier, p[0], p[1])  # noqa: E731  [in]
        aq = QuantParams(per_chan(state["a_scale"]), per_chan(state["a_zero"]))
        x = jnp.where(state["a_on"] > 0, fake_quant(x, aq, a_spec), x)
    if w_spec is not None:
        rows = group_layout(w.shape, cfg.w_spec).bcast_shape  # (out, 1) or (1, 1)
        per_elem = lambda p: jnp.broadcast_to(  # noqa: E731  [out, in]
            jnp.where(outlier[None, :], p[0].reshape(rows), p[1].reshape(rows)), w.shape)
        wq = QuantParams(per_elem(state["w_scale"]), per_elem(state["w_zero"]))
        w = jnp.where(state["w_on"] > 0, fake_quant(w, wq, w_spec), w)
    y = jnp.einsum("...i,oi->...o", x, w.astype(dtype), precision=precision)
    return y + bias.astype(dtype) if bias is not None else y


def qlinear_apply(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, state: dict, cfg: LayerQuantConfig, *,
                  v: tuple[jax.Array, ...] | None = None, adaround: AdaRoundConfig | None = None,
                  precision=None) -> jax.Array:
    """The quantized linear as a pure function.

    Args:
      x: [..., in] in the compute dtype; kernel: [in, out] (Flax layout); bias: [out] or None.
      state: the layer's QuantState values (see the module docstring).
      cfg: static settings (specs, number of outlier channels).
      v: AdaRound variables, one [out, in_g] per group: use soft-rounded weights instead of
        round-to-nearest (reconstruction).

    Returns:
      y [..., out] in x's dtype. Quantizers compute in float32; the matmul runs in x's dtype.
      A mask-form ``cfg`` (``group_mask``) runs one matmul over all channels (no AdaRound ``v``).
    """
    if cfg.group_mask:
        if v is not None:
            raise ValueError(f"{cfg.name}: AdaRound (v) is not supported in the mask form of a dual-scale layer; "
                             f"convert the model back with qarvd_jax.quant.stackable.from_mask_form")
        return _mask_apply(x, kernel, bias, state, cfg, precision)
    dtype = x.dtype
    y = None
    for g, (xg, wg) in enumerate(_groups(x, kernel, state, cfg)):
        if cfg.a_spec is not None:
            aq = QuantParams(state["a_scale"][g], state["a_zero"][g])
            xg = jnp.where(state["a_on"] > 0, fake_quant(xg, aq, cfg.a_spec), xg)
        if cfg.w_spec is not None:
            wq = QuantParams(state["w_scale"][g], state["w_zero"][g])
            if v is not None:
                wg = soft_weight(wg, v[g], wq, cfg.w_spec, adaround or AdaRoundConfig())
            else:
                wg = jnp.where(state["w_on"] > 0, fake_quant(wg, wq, cfg.w_spec), wg)
        yg = jnp.einsum("...i,oi->...o", xg, wg.astype(dtype), precision=precision)
        y = yg if y is None else y + yg
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


class QuantLinear(nnx.Module):
    """Drop-in replacement of an ``nnx.Linear`` (same ``kernel``/``bias`` params) that fake-quantizes.

    Set ``collect = True`` to record every input (``nnx.Intermediate`` "inputs") for calibration.
    """

    def __init__(self, linear: nnx.Linear, cfg: LayerQuantConfig, outlier_channels=None):
        self.kernel = linear.kernel
        self.bias = linear.bias
        self.dtype = linear.dtype
        self.precision = linear.precision
        self.cfg = cfg
        self.collect = False
        din, dout = linear.in_features, linear.out_features
        g = cfg.groups
        f32 = jnp.float32
        self.w_scale = QuantState(jnp.ones((g, dout), f32))
        self.w_zero = QuantState(jnp.zeros((g, dout), f32))
        self.a_scale = QuantState(jnp.ones((g,), f32))
        self.a_zero = QuantState(jnp.zeros((g,), f32))
        self.w_on = QuantState(jnp.zeros((), f32))
        self.a_on = QuantState(jnp.zeros((), f32))
        if cfg.n_outlier:
            chans = np.sort(np.asarray(outlier_channels, np.int32))
            if chans.shape != (cfg.n_outlier,) or len(np.unique(chans)) != cfg.n_outlier or chans.max() >= din:
                raise ValueError(f"{cfg.name}: outlier channels {chans.tolist()[:8]} are not {cfg.n_outlier} distinct "
                                 f"indices < {din}")
            self.outlier_idx = QuantState(jnp.asarray(chans))
            self.normal_idx = QuantState(jnp.asarray(np.setdiff1d(np.arange(din, dtype=np.int32), chans)))

    def state_dict(self) -> dict:
        """The layer's QuantState values by name."""
        names = ["w_scale", "w_zero", "a_scale", "a_zero", "w_on", "a_on"]
        if self.cfg.n_outlier:
            names += ["outlier_idx", "normal_idx"]
        if self.cfg.group_mask:
            names.append("group_mask")
        return {n: getattr(self, n)[...] for n in names}

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype) if self.dtype is not None else x
        if self.collect:
            self.sow(nnx.Intermediate, "inputs", x)
        bias = self.bias[...] if self.bias is not None else None
        return qlinear_apply(x, self.kernel[...], bias, self.state_dict(), self.cfg, precision=self.precision)


def _parent_and_key(model: nnx.Module, path: tuple):
    node = model
    for p in path[:-1]:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node, path[-1]


def _torch_name(path: tuple) -> str:
    from qarvd_jax.models.wan.params import flax_path_to_torch_name

    return flax_path_to_torch_name(path)


def iter_quant_layers(model: nnx.Module) -> Iterator[tuple[str, QuantLinear]]:
    """``(pytorch_name, layer)`` for every QuantLinear, in module order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            yield _torch_name(path), node


def install_layers(model: nnx.Module, layers: dict[str, LayerQuantConfig],
                   outliers: dict[str, np.ndarray] | None = None) -> None:
    """Replace (in place) the ``nnx.Linear`` named in ``layers`` by QuantLinears with those configs.

    ``outliers[name]`` gives the outlier input channels of layers with ``n_outlier > 0`` (any valid
    placeholder works when the state is restored afterwards). Unknown names are an error.
    """
    outliers = outliers or {}
    found = set()
    for path, lin in [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]:
        name = _torch_name(path)
        if name not in layers:
            continue
        cfg = layers[name]
        chans = outliers.get(name)
        if cfg.n_outlier and chans is None:
            raise ValueError(f"{name}: n_outlier={cfg.n_outlier} but no outlier channels given")
        parent, key = _parent_and_key(model, path)
        q = QuantLinear(lin, cfg, chans)
        if isinstance(key, int):
            parent[key] = q
        else:
            setattr(parent, key, q)
        found.add(name)
    missing = sorted(set(layers) - found)
    if missing:
        raise ValueError(f"no linear layer named {missing[:5]} in the model")


def quantize_model(model: nnx.Module, rules, *, outliers: dict[str, np.ndarray] | None = None,
                   chunk_weighting: bool = True, chunk_weighting_dual: bool = False) -> dict[str, LayerQuantConfig]:
    """Replace (in place) every ``nnx.Linear`` whose PyTorch name matches a rule by a QuantLinear.

    Args:
      rules: :class:`~qarvd_jax.quant.recipe.QuantRule` sequence (first match wins).
      outliers: ``name -> input-channel indices`` for dual-scale layers (from outlier detection);
        layers of rules with ``dual_scale=False`` ignore it.
      chunk_weighting / chunk_weighting_dual: whether chunk weights enter the activation search and
        reconstruction loss of single-/dual-scale layers (Q-ARVD: on / off).

    Returns:
      ``name -> LayerQuantConfig`` of the quantized layers. Quantizers start disabled (flags 0).
    """
    outliers = outliers or {}
    resolved = {}
    for path, _ in [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]:
        name = _torch_name(path)
        rule = match_rule(name, rules)
        if rule is None:
            continue
        k = len(outliers[name]) if rule.dual_scale and name in outliers else 0
        resolved[name] = LayerQuantConfig(
            name=name,
            w_spec=QuantSpec.qarvd_weight(rule.w_bits, axis=0) if rule.w_bits else None,
            a_spec=QuantSpec.qarvd_activation(rule.a_bits) if rule.a_bits else None,
            n_outlier=k, reconstruct=rule.reconstruct,
            chunk_weighting=chunk_weighting_dual if k else chunk_weighting, act_samples=rule.act_samples)
    install_layers(model, resolved, {n: c for n, c in outliers.items() if n in resolved and resolved[n].n_outlier})
    return resolved


def set_quant_flags(model: nnx.Module, *, weights: bool | None = None, acts: bool | None = None,
                    names=None) -> None:
    """Turn weight / activation fake-quant on or off (None: leave as is) for all or ``names`` layers."""
    for name, layer in iter_quant_layers(model):
        if names is not None and name not in names:
            continue
        if weights is not None:
            layer.w_on[...] = jnp.float32(weights)
        if acts is not None:
            layer.a_on[...] = jnp.float32(acts)


def with_quant_flags(state, on: bool):
    """``state`` (an ``nnx.State`` or pure dict) with every QuantLinear ``w_on``/``a_on`` leaf set to
    ``on``; other leaves are shared, not copied. Same structure, so swapping it into a jitted call
    does not recompile."""
    value = jnp.float32(1.0 if on else 0.0)

    def one(path, x):
        names = [getattr(k, "key", None) for k in path]
        return jnp.full_like(x, value) if "w_on" in names or "a_on" in names else x

    return jax.tree_util.tree_map_with_path(one, state)


def set_collect(model: nnx.Module, on: bool, names=None) -> None:
    """Record inputs of all (or ``names``) QuantLinears as ``nnx.Intermediate`` on the next calls."""
    for name, layer in iter_quant_layers(model):
        layer.collect = bool(on) and (names is None or name in names)
