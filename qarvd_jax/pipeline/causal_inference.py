"""Chunked causal inference of Self-Forcing (CausalInferencePipeline) in JAX.

Per chunk of ``num_frame_per_block`` latent frames, one jit-compiled function runs every model call
of the chunk as a ``lax.scan`` over ``S + 1`` passes with a single traced model call:

* pass 0 denoises the chunk's initial noise at ``tau_0``;
* pass s (1..S-1) re-noises the previous x0 prediction to ``tau_s`` with a fresh draw (``sampler
  "self_forcing"``, the few-step sampler of the distilled model) or with the noise the previous pass
  implies, ``x0 + flow`` (``sampler "euler"``: then the pass is exactly an Euler step of the flow ODE,
  ``x + (sigma_s - sigma_{s-1}) flow``, the deterministic sampler of a model trained by flow matching);
* pass S is the context pass: the final x0 at ``context_noise`` (no noise added) only to
  overwrite the chunk's KV-cache slots with clean keys/values.

With ``guidance_scale`` g != 1 (classifier-free guidance) every pass runs the model on a batch of 2B:
the prompts and the unconditional embeddings (all padding, i.e. zeros, unless ``negative_embeds`` is
given), each with its own KV cache, and uses ``flow_u + g (flow_c - flow_u)``; the context pass writes
the same clean chunk into both caches.

The same compiled chunk function serves every chunk (``current_start`` is traced, the KV cache is
a fixed-size pytree, donated). Re-noising draws come from ``jax.random`` keys derived from the seed,
or are replayed from recorded arrays (parity with the PyTorch pipeline).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan import kv_cache as kvc
from qarvd_jax.models.wan.kv_cache import CrossKV, KVCache
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline import scheduler as sch

__all__ = ["SAMPLERS", "InferenceConfig", "ChunkRecord", "CausalInferencePipeline", "with_step_context"]


def with_step_context(params, step, chunk, act_high=None):
    """``params`` with every ``step_index`` / ``chunk_index`` leaf (the StepContext of per-timestep
    quantized layers, :mod:`qarvd_jax.quant.methods`) set to the traced pass and chunk index: the step
    context is passed explicitly into every model call, never counted. Same structure, no recompile.
    ``act_high`` (traced bool, δ-GBS of ``dvd-quant``) likewise fills every ``q_act_high`` leaf."""

    def one(path, x):
        names = [getattr(k, "key", None) for k in path]
        if "step_index" in names:
            return jnp.full_like(x, step)
        if "chunk_index" in names:
            return jnp.full_like(x, chunk)
        if act_high is not None and "q_act_high" in names:
            return jnp.full_like(x, act_high)
        return x

    return jax.tree_util.tree_map_with_path(one, params)

SAMPLERS = ("self_forcing", "euler")


@dataclass(frozen=True)
class InferenceConfig:
    """Sampler settings (defaults: Self-Forcing DMD, ``self_forcing_dmd.yaml``).

    ``sampler``: ``"self_forcing"`` (re-noise each x0 prediction with a fresh draw, the Self-Forcing
    few-step sampler) or ``"euler"`` (re-noise with the predicted noise: the deterministic Euler/DDIM
    sampler of the flow ODE, for models trained by plain flow matching such as the testbed).
    ``kv_cache``: self-attention cache format, ``"bf16"`` (float, the compute dtype), ``"int8"``,
    ``"fp8"`` or ``"int4"`` (:mod:`qarvd_jax.models.wan.kv_quant`); independent of the weights, so it
    composes with every quantization method. ``kv_sink_float``: keep a rolling cache's sink frames in
    the compute dtype as well (quantized formats). ``guidance_scale``: classifier-free guidance
    (1: off, one model call per pass; else two, conditional and unconditional, for models trained with
    caption dropout such as the testbed).
    """

    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0
    kv_cache: str = "bf16"
    kv_sink_float: bool = False
    sampler: str = "self_forcing"
    guidance_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "denoising_step_list", tuple(int(s) for s in self.denoising_step_list))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {self.guidance_scale}")
        if not self.denoising_step_list:
            raise ValueError("denoising_step_list is empty")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        kvc.kvq.check_kv_format(self.kv_cache, "kv_cache")

    def tables(self) -> sch.FlowMatchTables:
        return sch.flow_match_tables(self.timestep_shift, self.num_train_timesteps)

    def timesteps(self) -> np.ndarray:
        return sch.denoising_timesteps(self.denoising_step_list, self.tables(), self.warp_denoising_step)


@dataclass
class ChunkRecord:
    """Everything one chunk produced (device arrays; pass index first).

    ``inputs``/``flows``/``x0s`` are ``[S+1, B, Fc, C, H, W]``: S denoising passes then the context
    pass. ``output`` is the chunk's latent (``x0s[S-1]``).
    """

    index: int
    output: jax.Array
    inputs: jax.Array
    flows: jax.Array
    x0s: jax.Array
    extras: dict[str, Any] = field(default_factory=dict)


class CausalInferencePipeline:
    """Streaming text-to-latent sampler around a :class:`CausalWanModel`.

    Args:
      model: the DiT (its graph is split once; weights can be swapped per chunk with ``params_for_chunk``).
      config: sampler settings.
    """

    def __init__(self, model: CausalWanModel, config: InferenceConfig | None = None):
        self.model_config = model.config
        self.config = config or InferenceConfig()
        self.graphdef, self.params = nnx.split(model)
        self._tables = self.config.tables()
        self._timesteps = jnp.asarray(self.config.timesteps())
        self.trace_count = 0  # number of times the chunk function was traced (compile-once check)
        self.bit_switch = _bit_switch_of(model)  # δ-GBS controller of dvd-quant layers, else None
        self._chunk_fn = jax.jit(self._chunk_impl, static_argnums=0, static_argnames=("bit_switch",),
                                 donate_argnames=("cache",))
        self._cross_fn = jax.jit(self._cross_impl, static_argnums=0)
        self.last_cross_intermediates: dict = {}

    # ------------------------------------------------------------------------------ jitted pieces
    def _cross_impl(self, graphdef, params, context):
        model = nnx.merge(graphdef, params)
        cross, inter = nnx.capture(lambda m: m.cross_kv(context), nnx.Intermediate)(model)
        return cross, nnx.to_pure_dict(inter)

    def _chunk_impl(self, graphdef, params, noise, renoise, cross: CrossKV, cache: KVCache, current_start,
                    chunk_index=0, bit_switch=None):
        """noise [B, Fc, C, H, W]; renoise [S-1, B, Fc, C, H, W] -> (record arrays, cache, act_high).

        Pass s of chunk ``chunk_index`` (traced) runs with the step context (s, chunk_index). With a
        ``bit_switch`` (:mod:`qarvd_jax.quant.bit_switch`, static) the δ-GBS accumulator is carried
        through the passes of the chunk (restarted per chunk) and each pass's high/low choice is passed
        into the layers (``act_high``, [S+1] bool); else ``act_high`` is None.

        Intermediates sown by the model (``nnx.Intermediate``, e.g. calibration inputs) are popped
        after every pass and returned stacked over passes."""
        self.trace_count += 1
        tables = self._tables
        num_steps = self._timesteps.shape[0]
        b, fc = noise.shape[:2]
        taus = jnp.concatenate([self._timesteps, jnp.full((1,), self.config.context_noise, jnp.float32)])
        eps = jnp.concatenate([jnp.zeros_like(noise)[None], renoise, jnp.zeros_like(noise)[None]])

        euler = self.config.sampler == "euler"
        guided, guidance = self.guided, self.config.guidance_scale

        def one_pass(carry, inp):
            x0_prev, eps_prev, cache, gbs = carry
            s, tau, eps_s = inp
            if euler:
                eps_s = eps_prev
            renoised = sch.add_noise(x0_prev, eps_s, tau, tables)
            x_in = jnp.where(s == 0, noise, jnp.where(s == num_steps, x0_prev, renoised)).astype(noise.dtype)
            t = jnp.full((b, fc), tau, jnp.float32)
            high = None if bit_switch is None else gbs_rule.decide(gbs[0], bit_switch.delta)
            model = nnx.merge(graphdef, with_step_context(params, s, chunk_index, high))  # sown values stay here
            x_model, t_model = (jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t])) if guided else (x_in, t)
            (flow, cache), inter = nnx.capture(
                lambda m: m.forward_chunk(x_model, t_model, cross, cache, current_start), nnx.Intermediate)(model)
            if guided:  # [conditional; unconditional] -> guided flow
                flow = sch.guided_flow(flow[:b], flow[b:], guidance)
            x0 = sch.flow_to_x0(flow, x_in, t, tables).astype(noise.dtype)
            x0_next = jnp.where(s == num_steps, x0_prev, x0)
            eps_next = ((x0.astype(jnp.float32) + flow.astype(jnp.float32)).astype(noise.dtype)  # implied noise
                        if euler else eps_prev)  # self_forcing: unused, not computed
            if bit_switch is not None:  # the accumulator of the chunk's own outputs (data-free)
                gbs = (gbs_rule.update(gbs[0], high, flow, gbs[1], s == 0), flow.astype(jnp.float32))
            return (x0_next, eps_next, cache, gbs), (x_in, flow, x0, nnx.to_pure_dict(inter), high)

        gbs_rule = None
        gbs0 = ()
        if bit_switch is not None:
            from qarvd_jax.quant import bit_switch as gbs_rule

            gbs0 = (jnp.float32(bit_switch.init), jnp.zeros(noise.shape, jnp.float32))  # (A, previous output)
        init = (jnp.zeros_like(noise), jnp.zeros_like(noise), cache, gbs0)
        (_, _, cache, _), (inputs, flows, x0s, inter, act_high) = jax.lax.scan(
            one_pass, init, (jnp.arange(num_steps + 1), taus, eps))
        return inputs, flows, x0s, inter, cache, act_high

    # ------------------------------------------------------------------------------ public API
    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (two model calls per pass)."""
        return self.config.guidance_scale != 1.0

    @property
    def num_denoising_steps(self) -> int:
        return int(self._timesteps.shape[0])

    def cross_kv(self, prompt_embeds: jax.Array, params=None, graphdef=None) -> CrossKV:
        """Cross-attention K/V of ``prompt_embeds`` [B, Lc, text_dim], computed once per video.

        Intermediates sown on the way are kept in ``self.last_cross_intermediates``."""
        cross, self.last_cross_intermediates = self._cross_fn(graphdef or self.graphdef,
                                                              self.params if params is None else params, prompt_embeds)
        return cross

    def set_model(self, model: CausalWanModel) -> None:
        """Use another model (same config) from now on, e.g. after quantizing it in place."""
        self.graphdef, self.params = nnx.split(model)
        self.bit_switch = _bit_switch_of(model)

    def stream(self, noise: jax.Array, prompt_embeds: jax.Array, *, seed: int | None = None,
               renoise: jax.Array | np.ndarray | None = None, params_for_chunk=None,
               cross_params=None, negative_embeds: jax.Array | np.ndarray | None = None) -> Iterator[ChunkRecord]:
        """Generate chunk by chunk, yielding a :class:`ChunkRecord` as soon as each chunk is done.

        Args:
          noise: initial noise of the whole video [B, F, C, H, W] (F a multiple of the chunk size).
          prompt_embeds: text-encoder output [B, Lc, text_dim].
          seed: seed of the re-noising draws (``jax.random``; chunk c uses ``fold_in(key, c)``).
          renoise: recorded draws ``[num_chunks, S-1, B, Fc, C, H, W]`` to replay instead (parity).
          params_for_chunk: optional ``chunk_index -> params`` (or ``(graphdef, params)``) to run some
            chunks with other state, e.g. quantization flags on; same graph, so nothing recompiles.
          cross_params: params used for the cross-attention K/V (default: the model's).
          negative_embeds: the unconditional branch's embeddings [B, Lc, text_dim] when
            ``guidance_scale`` != 1 (default: zeros, all padding, what caption dropout trains); the
            cache, cross K/V and ``intermediates`` then have batch 2B (prompts first).

        Each record's ``extras`` holds ``cache`` (valid until the next chunk is generated: it is
        donated), ``renoise`` and ``intermediates`` (values sown by the model, stacked over passes).
        """
        cfg = self.model_config
        noise = jnp.asarray(noise)
        if noise.ndim != 5:
            raise ValueError(f"noise must be [B, F, C, H, W], got {noise.shape}")
        b, f, c, h, w = noise.shape
        fc = cfg.num_frame_per_block
        if f % fc:
            raise ValueError(f"{f} latent frames is not a multiple of num_frame_per_block={fc}")
        num_chunks = f // fc
        if f > cfg.rope_max_positions:
            raise ValueError(f"{f} latent frames exceed the RoPE table ({cfg.rope_max_positions} positions)")
        fsl = cfg.frame_seq_length(h, w)
        steps = self.num_denoising_steps
        if renoise is not None:
            renoise = jnp.asarray(renoise, noise.dtype)
            want = (num_chunks, steps - 1, b, fc, c, h, w)
            if renoise.shape != want:
                raise ValueError(f"renoise has shape {renoise.shape}, expected {want}")
        elif seed is None:
            raise ValueError("pass either seed (fresh re-noising draws) or renoise (recorded draws)")
        key = jax.random.key(seed) if renoise is None else None

        prompt_embeds = jnp.asarray(prompt_embeds)
        if self.guided:
            if prompt_embeds.shape[0] != b:
                raise ValueError(f"guidance needs one prompt embedding per video: noise has batch {b}, "
                                 f"prompt_embeds {prompt_embeds.shape[0]}")
            if negative_embeds is None:
                negative_embeds = jnp.zeros_like(prompt_embeds)
            negative_embeds = jnp.asarray(negative_embeds, prompt_embeds.dtype)
            if negative_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_embeds has shape {negative_embeds.shape}, expected the prompt "
                                 f"embeddings' {prompt_embeds.shape}")
            prompt_embeds = jnp.concatenate([prompt_embeds, negative_embeds])
        elif negative_embeds is not None:
            raise ValueError("negative_embeds given but guidance_scale is 1 (no guidance): set "
                             "InferenceConfig.guidance_scale")
        cross = self.cross_kv(prompt_embeds, cross_params)
        cache = kvc.new_cache(cfg, 2 * b if self.guided else b, f, fsl, noise.dtype, kv_cache=self.config.kv_cache,
                              sink_float=self.config.kv_sink_float)
        for ci in range(num_chunks):
            chunk_noise = noise[:, ci * fc:(ci + 1) * fc]
            if renoise is not None:
                draws = renoise[ci]
            else:
                draws = jax.random.normal(jax.random.fold_in(key, ci), (steps - 1, b, fc, c, h, w), noise.dtype)
            graphdef, params = self.graphdef, self.params
            if params_for_chunk is not None:
                chosen = params_for_chunk(ci)
                graphdef, params = chosen if isinstance(chosen, tuple) else (graphdef, chosen)
            start = jnp.asarray(ci * fc * fsl, jnp.int32)
            inputs, flows, x0s, inter, cache, act_high = self._chunk_fn(
                graphdef, params, chunk_noise, draws, cross, cache, start, jnp.asarray(ci, jnp.int32),
                bit_switch=self.bit_switch)
            extras = {"cache": cache, "renoise": draws, "intermediates": inter}
            if act_high is not None:  # δ-GBS: activation bits of every denoising step, then the context pass
                hi = [bool(v) for v in np.asarray(act_high)]
                extras["bit_schedule"] = [self.bit_switch.bits(v) for v in hi[:steps]]
                extras["context_bits"] = self.bit_switch.bits(hi[steps])
            yield ChunkRecord(index=ci, output=x0s[steps - 1], inputs=inputs, flows=flows, x0s=x0s, extras=extras)

    def generate(self, noise, prompt_embeds, **kwargs) -> jax.Array:
        """Whole latent video [B, F, C, H, W]: the chunks of :meth:`stream` concatenated."""
        return jnp.concatenate([rec.output for rec in self.stream(noise, prompt_embeds, **kwargs)], axis=1)


def _bit_switch_of(model):
    """The δ-GBS controller of ``model``'s dvd-quant layers (None without them)."""
    from qarvd_jax.quant.methods.dvd_quant import bit_switch_of

    return bit_switch_of(model)
