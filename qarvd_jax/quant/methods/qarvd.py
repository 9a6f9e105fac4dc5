"""Q-ARVD on the method interface: the existing recipe, unchanged (``qarvd_method.md``).

Outlier-aware dual-scale weights (MAD z-score / IQR on input-column norms, count aligned), per-output-
channel percentile-MSE weight init, static per-tensor activations from a chunk-weighted histogram
percentile-MSE search, layer-wise AdaRound with a learned activation step, hard-rounding merge.
``Config`` is :class:`~qarvd_jax.quant.recipe.QARVDConfig`. :func:`quantize_model` without rules is
exactly :func:`~qarvd_jax.quant.calibration.run_qarvd_ptq` (the recipe's own passes: activation ranges
from pass B with quantized weights, reconstruction on full-precision pass C, chunk weights from the
sensitivity); with rules (mixed methods) the generic per-layer driver calls :func:`quantize_layer`
on full-precision inputs. :func:`quantize_layer` composes the same functions on one layer; its
reconstruction views the rows as samples of ``recon_tokens`` tokens, unweighted.

Paper: "Q-ARVD" (this project's ``qarvd_method.md``: outlier-aware dual-scale quantization with
chunk-sensitivity-weighted calibration for autoregressive video diffusion). Code: this package,
``qarvd_jax.quant.{calibration,outliers,range_init,adaround,qlinear}``; AdaRound/BRECQ settings as
``yhhhli/BRECQ``.

Integer form: yes (``qarvd export``; W4/W8 weights, A8).
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from qarvd_jax.quant.fake_quant import QuantSpec
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import QuantizedLayer
from qarvd_jax.quant.recipe import LayerQuantConfig, QARVDConfig

NAME = "qarvd"
HAS_INTEGER_FORM = True
Config = QARVDConfig
RECON_TOKENS = 64

__all__ = ["NAME", "Config", "quantize_layer", "apply", "quantize_model", "to_quant_linear", "needs_calibration",
           "weight_bytes"]


def needs_calibration(cfg: QARVDConfig) -> bool:
    return cfg.a_bits is not None or cfg.reconstruct


def quantize_layer(kernel, bias, calib_inputs, config: QARVDConfig, *, steps=None, name: str = "layer"
                   ) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in]. State and static are the
    :class:`QuantLinear` layout (``LayerQuantConfig``)."""
    from qarvd_jax.quant.calibration import _reconstruct, _shape_key
    from qarvd_jax.quant.outliers import detect_outliers
    from qarvd_jax.quant.range_init import histogram_percentile_mse_init, percentile_mse_init

    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=needs_calibration(config),
                                              name=NAME)
    k_in, k_out = kernel.shape
    chans = None
    if config.dual_scale:
        res = detect_outliers(np.asarray(kernel), config.outlier_method, align=config.align, in_axis=0,
                              mad_threshold=config.mad_threshold, min_ratio_vs_median=config.min_ratio_vs_median)
        chans = np.sort(np.asarray(res.channels, np.int32)) if res.count else None
    n_out = 0 if chans is None else len(chans)
    cfg = LayerQuantConfig(name=name, w_spec=QuantSpec.qarvd_weight(config.w_bits, axis=0),
                           a_spec=QuantSpec.qarvd_activation(config.a_bits) if config.a_bits else None,
                           n_outlier=n_out, reconstruct=config.reconstruct, chunk_weighting=False)
    g = cfg.groups
    state = {"w_scale": jnp.ones((g, k_out)), "w_zero": jnp.zeros((g, k_out)), "a_scale": jnp.ones((g,)),
             "a_zero": jnp.zeros((g,)), "w_on": jnp.float32(1), "a_on": jnp.float32(1)}
    w = kernel.T
    if n_out:
        normal = np.setdiff1d(np.arange(k_in, dtype=np.int32), chans)
        state.update(outlier_idx=jnp.asarray(chans), normal_idx=jnp.asarray(normal))
        wgs, sel = [w[:, chans], w[:, normal]], [chans, normal]
    else:
        wgs, sel = [w], [np.arange(k_in)]
    for i, wg in enumerate(wgs):
        p = percentile_mse_init(wg, cfg.w_spec, config.percentiles).params
        state["w_scale"] = state["w_scale"].at[i].set(p.scale)
        state["w_zero"] = state["w_zero"].at[i].set(p.zero_point)
        if cfg.a_spec is not None:
            a = histogram_percentile_mse_init(x[None][..., sel[i]], cfg.a_spec, percentiles=config.percentiles,
                                              bins=config.hist_bins).params
            state["a_scale"] = state["a_scale"].at[i].set(a.scale)
            state["a_zero"] = state["a_zero"].at[i].set(a.zero_point)
    if config.reconstruct:
        t = min(RECON_TOKENS, x.shape[0])
        xs = x[: (x.shape[0] // t) * t].reshape(-1, t, k_in)
        y = jnp.einsum("nti,io->nto", xs, kernel, precision=jax.lax.Precision.HIGHEST)
        if bias is not None:
            y = y + bias
        key = jax.random.fold_in(jax.random.key(config.recon_seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        merged, a_scale, _ = _reconstruct(kernel, bias, state, xs, y, jnp.ones((xs.shape[0],)), key,
                                          jnp.float32(1.0), layer_cfg=_shape_key(cfg), qcfg=config)
        kernel = merged
        state["a_scale"] = a_scale
    return QuantizedLayer(NAME, kernel, bias, state, cfg)


def apply(kernel, bias, state, x, static: LayerQuantConfig, step, chunk, precision=None):
    from qarvd_jax.quant.qlinear import qlinear_apply

    return qlinear_apply(x, kernel, bias, state, static, precision=precision)


def to_quant_linear(layer: QuantizedLayer):
    return dataclasses.replace(layer.static), dict(layer.state)


weight_bytes = base.core_weight_bytes


def quantize_model(model, calibration, config: QARVDConfig, rules=None) -> dict:
    """Without rules: the Q-ARVD recipe (:func:`run_qarvd_ptq`) on ``calibration`` (a
    :class:`~qarvd_jax.quant.methods.model.Calibration`; its ``sensitivity`` gives the chunk weights)."""
    if rules is not None:
        from qarvd_jax.quant.methods.model import quantize_model_with_rules

        return quantize_model_with_rules(model, calibration, config, rules, NAME)
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
    from qarvd_jax.quant.calibration import run_qarvd_ptq

    pipe = CausalInferencePipeline(model, calibration.sampler)
    out = run_qarvd_ptq(model, pipe, calibration.prompt_embeds, list(calibration.seeds), calibration.latent_shape,
                        config, sensitivity=calibration.sensitivity)
    return {"method": NAME, "config": dataclasses.asdict(config), **out}
