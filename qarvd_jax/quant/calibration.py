"""Q-ARVD post-training calibration of a CausalWanModel (qarvd_method.md sections 2, 4, 5).

Steps, each a function so users can recombine them:

1. :func:`detect_model_outliers` + :func:`prepare_quantized_model`: outlier channels from the weights
   (MAD z-score / IQR on input-column L2 norms), then QuantLinear surgery by recipe rules.
2. :func:`init_weight_quantizers`: per-output-channel percentile-MSE init of every (sub)matrix (data-free).
3. :func:`collect_inputs`: run the streaming pipeline and record every quantized linear's input on every
   model call (chunks x (denoising steps + context pass)), tagged with its chunk; cross-attention k/v and
   the text embedding run once per video.
4. :func:`calibrate_activations`: histogram percentile-MSE per tensor (per group), samples weighted by
   the chunk weights omega (or 1 for dual-scale layers / no sensitivity), from pass B (W on, A off).
5. :func:`reconstruct_layers`: layer-wise AdaRound + learned activation step on full-precision inputs
   and outputs (pass C), then the hard-rounding merge. One jitted function per layer shape.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from qarvd_jax.quant.adaround import hard_weight, init_v, rounding_loss
from qarvd_jax.quant.fake_quant import QuantParams
from qarvd_jax.quant.objective import reconstruction_loss
from qarvd_jax.quant.outliers import detect_outliers
from qarvd_jax.quant.qlinear import (QuantLinear, iter_quant_layers, qlinear_apply, quantize_model, set_collect,
                                     set_quant_flags)
from qarvd_jax.quant.range_init import histogram_percentile_mse_init, percentile_mse_init
from qarvd_jax.quant.recipe import LayerQuantConfig, QARVDConfig, match_rule

__all__ = ["CalibrationData", "detect_model_outliers", "prepare_quantized_model", "init_weight_quantizers",
           "collect_inputs", "calibrate_activations", "calibrate_rtn", "reconstruct_layers", "run_qarvd_ptq", "pass_seeds"]

log = logging.getLogger(__name__)


def detect_model_outliers(model: nnx.Module, cfg: QARVDConfig) -> dict[str, np.ndarray]:
    """``name -> outlier input channels`` for every dual-scale-eligible linear with outliers (weights only)."""
    from qarvd_jax.models.wan.params import flax_path_to_torch_name

    out = {}
    rules = cfg.rules()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Linear, QuantLinear)):
            continue
        name = flax_path_to_torch_name(path)
        rule = match_rule(name, rules)
        if rule is None or not rule.dual_scale or not cfg.dual_scale:
            continue
        res = detect_outliers(np.asarray(node.kernel[...], np.float32), cfg.outlier_method, align=cfg.align,
                              in_axis=0, mad_threshold=cfg.mad_threshold,
                              min_ratio_vs_median=cfg.min_ratio_vs_median)
        if res.count:
            out[name] = np.asarray(res.channels)
    return out


def prepare_quantized_model(model: nnx.Module, cfg: QARVDConfig, outliers: dict[str, np.ndarray] | None = None
                            ) -> dict[str, LayerQuantConfig]:
    """Outlier detection (unless given) and QuantLinear surgery, in place. Returns the layer configs."""
    if outliers is None:
        outliers = detect_model_outliers(model, cfg)
    return quantize_model(model, cfg.rules(), outliers=outliers, chunk_weighting=cfg.chunk_weighting,
                          chunk_weighting_dual=cfg.chunk_weighting_dual)


def _group_weights(layer: QuantLinear) -> list[jax.Array]:
    """W_g [out, in_g] (float32) per group."""
    w = jnp.asarray(layer.kernel[...], jnp.float32).T
    if not layer.cfg.n_outlier:
        return [w]
    return [jnp.take(w, layer.outlier_idx[...], axis=1), jnp.take(w, layer.normal_idx[...], axis=1)]


def _group_inputs(layer: QuantLinear, x: jax.Array) -> list[jax.Array]:
    if not layer.cfg.n_outlier:
        return [x]
    return [jnp.take(x, layer.outlier_idx[...], axis=-1), jnp.take(x, layer.normal_idx[...], axis=-1)]


def init_weight_quantizers(model: nnx.Module, cfg: QARVDConfig) -> None:
    """Per-row percentile-MSE init (independent choice per output channel) of every group's weight."""
    for _, layer in iter_quant_layers(model):
        if layer.cfg.w_spec is None:
            continue
        for g, wg in enumerate(_group_weights(layer)):
            p = percentile_mse_init(wg, layer.cfg.w_spec, cfg.percentiles).params
            layer.w_scale[...] = layer.w_scale[...].at[g].set(p.scale)
            layer.w_zero[...] = layer.w_zero[...].at[g].set(p.zero_point)


@dataclass
class CalibrationData:
    """Inputs recorded per layer: ``samples[name]`` is a list of [T, C] arrays (one per call and batch
    element) and ``chunks[name]`` the chunk index of each (-1 for once-per-video layers)."""

    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)
    chunks: dict[str, list[int]] = field(default_factory=dict)
    max_tokens: int | None = None  # keep a random subset of this many tokens per sample (memory bound)
    seed: int = 0
    full_tokens: dict[str, int] = field(default_factory=dict)  # tokens per sample before subsampling

    def add(self, name: str, x: np.ndarray, chunk: int) -> None:
        """x [..., T, C] with leading batch/pass axes; each leading index becomes one sample."""
        x = np.asarray(x)
        flat = x.reshape(-1, *x.shape[-2:])
        self.full_tokens[name] = flat.shape[1]
        if self.max_tokens is not None and flat.shape[1] > self.max_tokens:
            rng = np.random.default_rng([self.seed, len(self.samples.get(name, ())), zlib.crc32(name.encode())])
            rows = np.sort(rng.choice(flat.shape[1], self.max_tokens, replace=False))
            flat = flat[:, rows]
        self.samples.setdefault(name, []).extend(list(flat))
        self.chunks.setdefault(name, []).extend([chunk] * flat.shape[0])


def _layer_name(path) -> str:
    from qarvd_jax.models.wan.params import flax_path_to_torch_name

    keys = []
    for p in path:
        k = getattr(p, "key", getattr(p, "idx", None))
        if k == "inputs":
            break
        keys.append(k)
    return flax_path_to_torch_name(tuple(keys))


def _add_intermediates(data: CalibrationData, inter, chunk: int) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]:
        data.add(_layer_name(path), np.asarray(leaf, np.float32), chunk)


def collect_inputs(pipeline, model: nnx.Module, prompt_embeds: np.ndarray, seeds, latent_shape, *, names=None,
                   max_tokens: int | None = None, desc: str = "collect") -> CalibrationData:
    """Run one generation per (prompt embedding [L, text_dim], seed) of latents ``latent_shape``
    (F, C, h, w) and record the inputs of QuantLinears.

    ``names`` limits recording to some layers (bounded memory for the real model: calibrate in
    groups); ``max_tokens`` keeps a random subset of tokens per recorded input. Quantization flags
    are whatever the model has (pass B: W on, A off; pass C: all off).
    """
    data = CalibrationData(max_tokens=max_tokens)
    set_collect(model, True, names)
    pipeline.set_model(model)
    try:
        for emb, seed in tqdm(list(zip(prompt_embeds, seeds)), desc=desc, leave=False):
            emb = jnp.asarray(emb)[None]
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 << 20), (1, *latent_shape),
                                      jnp.dtype(model.config.dtype))
            for rec in pipeline.stream(noise, emb, seed=seed):
                _add_intermediates(data, rec.extras["intermediates"], rec.index)
            _add_intermediates(data, pipeline.last_cross_intermediates, -1)
    finally:
        set_collect(model, False)
        pipeline.set_model(model)
    return data


def _sample_weights(name: str, layer_cfg: LayerQuantConfig, chunks: list[int], omega) -> np.ndarray | None:
    if omega is None or not layer_cfg.chunk_weighting:
        return None
    omega = np.asarray(omega, np.float32)
    ids = np.asarray(chunks)
    if ids.min() < 0:  # once-per-video layers: chunk 0 produced them (cross K/V are built before chunk 0)
        ids = np.where(ids < 0, 0, ids)
    if ids.max() >= len(omega):
        raise ValueError(f"{name}: chunk index {ids.max()} but only {len(omega)} chunk weights")
    return omega[ids]


def calibrate_activations(model: nnx.Module, data: CalibrationData, cfg: QARVDConfig, omega=None,
                          names=None) -> None:
    """Fit the activation quantizers (per group) of all (or ``names``) layers on the recorded inputs,
    chunk-weighted by ``omega``."""
    for name, layer in tqdm(list(iter_quant_layers(model)), desc="activation ranges", leave=False):
        if layer.cfg.a_spec is None or (names is not None and name not in names):
            continue
        if name not in data.samples:
            raise ValueError(f"no calibration inputs were recorded for {name}")
        samples = data.samples[name]
        chunks = data.chunks[name]
        if layer.cfg.act_samples is not None:
            samples, chunks = samples[: layer.cfg.act_samples], chunks[: layer.cfg.act_samples]
        weights = _sample_weights(name, layer.cfg, chunks, omega)
        x = jnp.asarray(np.stack(samples))
        for g, xg in enumerate(_group_inputs(layer, x)):
            p = histogram_percentile_mse_init(xg, layer.cfg.a_spec, sample_weights=weights,
                                              percentiles=cfg.percentiles, bins=cfg.hist_bins).params
            layer.a_scale[...] = layer.a_scale[...].at[g].set(p.scale)
            layer.a_zero[...] = layer.a_zero[...].at[g].set(p.zero_point)


@partial(jax.jit, static_argnames=("layer_cfg", "qcfg", "precision"))
def _reconstruct(kernel, bias, state, x, y, weights, key, token_scale, *, layer_cfg: LayerQuantConfig,
                 qcfg: QARVDConfig, precision=None):
    """AdaRound + activation-step learning of one layer. x [N, T', in], y [N, T', out] (FP outputs).

    ``token_scale = T / T'`` rescales the token-summed reconstruction loss of T' subsampled tokens to the
    scale of all T tokens, so ``calib_tokens`` bounds memory without changing the balance between the
    reconstruction loss and the rounding regulariser (reg_weight)."""
    ada = qcfg.adaround()
    w = jnp.asarray(kernel, jnp.float32).T
    groups = ([w] if not layer_cfg.n_outlier else
              [jnp.take(w, state["outlier_idx"], axis=1), jnp.take(w, state["normal_idx"], axis=1)])
    wparams = [QuantParams(state["w_scale"][g], state["w_zero"][g]) for g in range(len(groups))]
    v0 = tuple(init_v(wg, p, layer_cfg.w_spec, ada) for wg, p in zip(groups, wparams))
    params = {"v": v0, "a_scale": state["a_scale"]}
    labels = {"v": jax.tree.map(lambda _: "v", v0), "a_scale": "a"}
    opt = optax.multi_transform({"v": optax.adam(qcfg.lr_v),
                                 "a": optax.adam(optax.cosine_decay_schedule(qcfg.lr_act_step, qcfg.iters))}, labels)
    n = x.shape[0]
    batch = min(qcfg.batch_size, n)
    st = dict(state, w_on=jnp.float32(1), a_on=jnp.float32(1 if layer_cfg.a_spec is not None else 0))

    def loss_fn(p, xb, yb, wb, t):
        yhat = qlinear_apply(xb, kernel, bias, dict(st, a_scale=p["a_scale"]), layer_cfg, v=p["v"], adaround=ada,
                             precision=precision)
        rec = reconstruction_loss(yhat.astype(jnp.float32), yb, wb) * token_scale
        return rec + rounding_loss(p["v"], t, ada), rec

    def step(carry, t):
        p, o, k = carry
        k, sub = jax.random.split(k)
        idx = jax.random.choice(sub, n, (batch,), replace=False)
        (_, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x[idx], y[idx], weights[idx], t)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o, k), rec

    (p, _, _), losses = jax.lax.scan(step, (params, opt.init(params), key), jnp.arange(1, qcfg.iters + 1))
    merged = [hard_weight(wg, vg, wp, layer_cfg.w_spec) for wg, vg, wp in zip(groups, p["v"], wparams)]
    if layer_cfg.n_outlier:
        full = jnp.zeros_like(w)
        full = full.at[:, state["outlier_idx"]].set(merged[0]).at[:, state["normal_idx"]].set(merged[1])
    else:
        full = merged[0]
    return full.T.astype(kernel.dtype), p["a_scale"], losses


def _shape_key(cfg: LayerQuantConfig) -> LayerQuantConfig:
    """The layer config without its name and data-side fields: the static part of the jit key."""
    return dataclasses.replace(cfg, name="", chunk_weighting=True, act_samples=None, reconstruct=True)


def reconstruct_layers(model: nnx.Module, data: CalibrationData, cfg: QARVDConfig, omega=None, *, names=None,
                       deferred: dict | None = None) -> dict[str, dict]:
    """Reconstruct every (or every ``names``) layer with ``reconstruct=True`` from full-precision
    inputs ``data`` (pass C).

    Writes the hard-rounded weights into the kernels (or into ``deferred[name]`` when a dict is given,
    so that later full-precision collections still see the original weights) and the learned
    activation steps into the state. Returns per-layer reconstruction-loss figures
    ``{"rec_loss_first", "rec_loss_last"}`` (without the rounding regulariser). Layers of equal shapes
    and specs share one compiled function; each layer's minibatch draws depend only on its name.
    """
    stats = {}
    key = jax.random.key(cfg.recon_seed)
    layers = [(n, lyr) for n, lyr in iter_quant_layers(model)
              if lyr.cfg.reconstruct and lyr.cfg.w_spec is not None and (names is None or n in names)]
    for name, layer in tqdm(layers, desc="reconstruction", leave=False):
        if name not in data.samples:
            raise ValueError(f"no full-precision inputs were recorded for {name}")
        x = jnp.asarray(np.stack(data.samples[name]), layer.dtype or jnp.float32)
        kernel = layer.kernel[...]
        bias = layer.bias[...] if layer.bias is not None else None
        y = jnp.einsum("nti,io->nto", x.astype(jnp.float32), jnp.asarray(kernel, jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        w = _sample_weights(name, layer.cfg, data.chunks[name], omega)
        weights = jnp.ones((x.shape[0],), jnp.float32) if w is None else jnp.asarray(w)
        token_scale = jnp.float32(data.full_tokens.get(name, x.shape[1]) / x.shape[1])
        merged, a_scale, losses = _reconstruct(kernel, bias, layer.state_dict(), x, y, weights,
                                               jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
                                               token_scale, layer_cfg=_shape_key(layer.cfg), qcfg=cfg, precision=layer.precision)
        if deferred is None:
            layer.kernel[...] = merged
        else:
            deferred[name] = merged
        layer.a_scale[...] = a_scale
        losses = np.asarray(losses)
        stats[name] = {"rec_loss_first": float(losses[0]), "rec_loss_last": float(losses[-1])}
    return stats


def default_calib_memory_gb() -> float:
    """The default calibration budget: min(16 GiB, half the available host RAM)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024 ** 3
    except (ValueError, OSError, AttributeError):
        avail = 32.0
    return float(min(16.0, 0.5 * avail))


@dataclass(frozen=True)
class CalibrationPlan:
    """Layer groups of the collection passes, the token cap and their host bytes (float32 inputs)."""

    groups: list
    max_tokens: int | None
    budget_bytes: int
    peak_bytes: int  # the largest group's recorded inputs
    total_bytes: int  # every layer at once, uncapped


def plan_calibration(model: nnx.Module, cfg: QARVDConfig, *, videos: int, calls_per_video: int,
                     tokens_per_call: int, frames_per_call: int) -> CalibrationPlan:
    """Groups (module order) whose recorded inputs fit ``cfg.calib_memory_gb``.

    Per layer: ``samples x tokens x in_features x 4`` bytes, with one sample per video and call
    (``cross_attn.k/v`` and ``text_embedding``: once per video, ``text_len`` tokens;
    ``time_embedding``/``time_projection``: one token per frame). ``calib_layer_group`` (a fixed group
    size) takes precedence. Tokens are capped (below ``calib_tokens``) only when one layer alone does
    not fit; grouping alone is exact.
    """
    text_len = model.config.text_len
    sizes = []
    for name, layer in iter_quant_layers(model):
        din = int(layer.kernel.shape[0])
        if name.startswith("text_embedding") or ".cross_attn.k" in name or ".cross_attn.v" in name:
            samples, tokens = videos, text_len
        elif name.startswith(("time_embedding", "time_projection")):
            samples, tokens = videos * calls_per_video, frames_per_call
        else:
            samples, tokens = videos * calls_per_video, tokens_per_call
        sizes.append((name, samples, tokens, din))
    nbytes = lambda s, t, d, cap: s * (t if cap is None else min(t, cap)) * d * 4
    total = sum(nbytes(s, t, d, None) for _, s, t, d in sizes)
    budget = int((cfg.calib_memory_gb if cfg.calib_memory_gb is not None else default_calib_memory_gb()) * 1024 ** 3)
    cap = cfg.calib_tokens
    if cfg.calib_layer_group:
        size = cfg.calib_layer_group
        groups = [sizes[i:i + size] for i in range(0, len(sizes), size)]
    else:
        worst = max(nbytes(s, t, d, cap) for _, s, t, d in sizes)
        if worst > budget:  # one layer alone does not fit: subsample tokens so that the largest one does
            cap = max(1, min(budget // (s * d * 4) for _, s, t, d in sizes if nbytes(s, t, d, cap) > budget))
            log.warning("calibration: a single layer's inputs exceed calib_memory_gb=%.1f; keeping %d tokens per "
                        "sample", budget / 1024 ** 3, cap)
        groups, cur, used = [], [], 0
        for item in sizes:
            b = nbytes(*item[1:], cap)
            if cur and used + b > budget:
                groups.append(cur)
                cur, used = [], 0
            cur.append(item)
            used += b
        if cur:
            groups.append(cur)
    peak = max(sum(nbytes(*it[1:], cap) for it in g) for g in groups)
    return CalibrationPlan(groups=[[it[0] for it in g] for g in groups], max_tokens=cap, budget_bytes=budget,
                           peak_bytes=peak, total_bytes=total)


def _pipeline_plan(model: nnx.Module, pipeline, prompt_embeds, latent_shape, cfg: QARVDConfig) -> CalibrationPlan:
    mc = model.config
    f, _, h, w = latent_shape
    calls = (f // mc.num_frame_per_block) * (len(pipeline.config.denoising_step_list) + 1)
    return plan_calibration(model, cfg, videos=len(prompt_embeds), calls_per_video=calls,
                            tokens_per_call=mc.num_frame_per_block * mc.frame_seq_length(h, w),
                            frames_per_call=mc.num_frame_per_block)


def calibrate_rtn(model: nnx.Module, pipeline, prompt_embeds: np.ndarray, seeds, latent_shape, cfg: QARVDConfig,
                  omega=None) -> list[list[str]]:
    """Passes A and B on a prepared model, in place: percentile-MSE weight init (data-free), then the
    activation ranges from generations with weights quantized and activations in full precision,
    chunk-weighted by ``omega``. Leaves the flags at W on, A off; returns the layer groups used.

    Activation quantizers are off while collecting, so calibrating one group of layers does not change
    the inputs of the next: ``cfg.calib_layer_group`` only bounds memory.
    """
    init_weight_quantizers(model, cfg)
    plan = _pipeline_plan(model, pipeline, prompt_embeds, latent_shape, cfg)
    groups = plan.groups
    set_quant_flags(model, weights=True, acts=False)
    for gi, group in enumerate(groups):
        acts = collect_inputs(pipeline, model, prompt_embeds, seeds, latent_shape, names=group,
                              max_tokens=plan.max_tokens, desc=f"pass B (W on, A off) {gi + 1}/{len(groups)}")
        calibrate_activations(model, acts, cfg, omega, names=group)
        del acts
    return groups


PASS_SEED_STRIDE = 1_000_003  # > any prompt count: the passes' seeds never collide


def pass_seeds(seeds, pass_index: int) -> list[int]:
    """The noise seeds of calibration pass ``pass_index`` over prompts whose base seeds are ``seeds``.

    The original draws a fresh noise (initial latents and re-noising) for each of its passes over the
    calibration prompt: 0 = the sensitivity step's calibration (``seeds`` as given), 1 = PTQ pass B (W on,
    A off), 2 = PTQ pass C (full precision). The layer groups of one pass all reuse that pass's seeds, so
    grouping stays exact.
    """
    return [int(s) + pass_index * PASS_SEED_STRIDE for s in seeds]


def run_qarvd_ptq(model: nnx.Module, pipeline, prompt_embeds: np.ndarray, seeds, latent_shape, cfg: QARVDConfig,
                  sensitivity=None, outliers: dict[str, np.ndarray] | None = None) -> dict:
    """The whole Q-ARVD post-training recipe on a full-precision model, in place.

    ``pipeline`` is a :class:`CausalInferencePipeline` over ``model``; ``prompt_embeds``/``seeds``
    are the calibration videos (Q-ARVD: one prompt) of latents ``latent_shape`` (F, C, h, w). ``sensitivity``
    (one value per chunk) gives the chunk weights omega = s / mean(s). Returns a summary dict.
    """
    from qarvd_jax.quant.objective import chunk_weights, validate_sensitivity

    if sensitivity is not None:
        sensitivity = validate_sensitivity(sensitivity, latent_shape[0] // model.config.num_frame_per_block)
    omega = None if sensitivity is None or not cfg.chunk_weighting else np.asarray(chunk_weights(sensitivity))
    layer_cfgs = prepare_quantized_model(model, cfg, outliers)
    groups = calibrate_rtn(model, pipeline, prompt_embeds, pass_seeds(seeds, 1), latent_shape, cfg, omega)
    recon: dict = {}
    if cfg.reconstruct:
        set_quant_flags(model, weights=False, acts=False)  # pass C: full precision
        merged: dict = {}  # merged weights are written after every group has seen the FP model
        for gi, group in enumerate(groups):
            fp = collect_inputs(pipeline, model, prompt_embeds, pass_seeds(seeds, 2), latent_shape, names=group,
                                max_tokens=_pipeline_plan(model, pipeline, prompt_embeds, latent_shape, cfg).max_tokens,
                                desc=f"pass C (FP) {gi + 1}/{len(groups)}")
            recon.update(reconstruct_layers(model, fp, cfg, omega, names=group, deferred=merged))
            del fp
        layers_by_name = dict(iter_quant_layers(model))
        for name, kernel in merged.items():
            layers_by_name[name].kernel[...] = kernel
    set_quant_flags(model, weights=True, acts=True)
    pipeline.set_model(model)
    return {"layers": {n: c.to_dict() for n, c in layer_cfgs.items()}, "reconstruction": recon,
            "chunk_weights": None if omega is None else omega.tolist()}
