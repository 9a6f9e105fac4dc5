"""The pipeline's samplers: ``self_forcing`` (fresh re-noising draws) and ``euler`` (the flow ODE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline import scheduler as sch
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig

STEPS = (1000, 750, 500, 250)


def _inputs():
    model = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    noise = jax.random.normal(jax.random.key(0), (1, 6, 16, 4, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
    return model, noise, ctx


def test_euler_passes_are_euler_steps_of_the_flow():
    """Every pass of ``euler`` starts where an Euler step of the previous pass's flow lands (float64 reference),
    independently of the re-noising draws."""
    model, noise, ctx = _inputs()
    cfg = InferenceConfig(denoising_step_list=STEPS, sampler="euler")
    pipe = CausalInferencePipeline(model, cfg)
    tables = cfg.tables()
    sigmas = [float(sch.sigma_at(np.float32(t), tables)) for t in cfg.timesteps()]
    recs = list(pipe.stream(noise, ctx, seed=3))
    other = list(pipe.stream(noise, ctx, seed=4))  # other draws: same video
    for rec, rec2 in zip(recs, other):
        x, flow = np.asarray(rec.inputs, np.float64), np.asarray(rec.flows, np.float64)
        for s in range(len(STEPS) - 1):
            want = x[s] + (sigmas[s + 1] - sigmas[s]) * flow[s]
            np.testing.assert_allclose(x[s + 1], want, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(rec.output), np.asarray(rec2.output), atol=1e-5)
    assert pipe.trace_count == 1


def test_self_forcing_sampler_uses_the_draws_and_is_the_default():
    model, noise, ctx = _inputs()
    pipe = CausalInferencePipeline(model, InferenceConfig(denoising_step_list=STEPS))
    assert pipe.config.sampler == "self_forcing"
    recs = list(pipe.stream(noise, ctx, seed=3))
    tables = pipe.config.tables()
    rec = recs[0]
    t1 = pipe.config.timesteps()[1]
    want = sch.add_noise(rec.x0s[0], rec.extras["renoise"][0], np.float32(t1), tables)
    np.testing.assert_allclose(np.asarray(rec.inputs[1]), np.asarray(want), atol=1e-6)
    a = np.asarray(pipe.generate(noise, ctx, seed=3))
    b = np.asarray(pipe.generate(noise, ctx, seed=4))
    assert np.abs(a - b).max() > 1e-3  # the draws matter


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'"):
        InferenceConfig(sampler="ddpm")


def _guided_reference(model, noise, ctx, cfg: InferenceConfig, negative):
    """Classifier-free-guided Euler sampling with the full block-causal forward (no KV cache), float64
    bookkeeping: each chunk denoises against the clean (t = 0) guided outputs of the chunks before it."""
    fc = model.config.num_frame_per_block
    tables = cfg.tables()
    taus = [float(t) for t in cfg.timesteps()]
    sigmas = [float(sch.sigma_at(np.float32(t), tables)) for t in taus] + [0.0]
    done = []
    for ci in range(noise.shape[1] // fc):
        x = np.asarray(noise[:, ci * fc:(ci + 1) * fc], np.float64)
        for s, tau in enumerate(taus):
            seq = jnp.asarray(np.concatenate(done + [x], axis=1), jnp.float32)
            t = jnp.asarray([[0.0] * (ci * fc) + [tau] * fc], jnp.float32)
            f_c = np.asarray(model(seq, t, ctx), np.float64)[:, -fc:]
            f_u = np.asarray(model(seq, t, negative), np.float64)[:, -fc:]
            x = x + (sigmas[s + 1] - sigmas[s]) * (f_u + cfg.guidance_scale * (f_c - f_u))
        done.append(x)
    return np.concatenate(done, axis=1)


def test_guided_euler_matches_the_uncached_reference():
    """guidance_scale 3: two branches with their own KV caches == the full-sequence reference; the default
    unconditional branch is all padding (zeros), an explicit negative_embeds is used as given."""
    model, noise, ctx = _inputs()
    cfg = InferenceConfig(denoising_step_list=STEPS, sampler="euler", guidance_scale=3.0)
    pipe = CausalInferencePipeline(model, cfg)
    got = np.asarray(pipe.generate(noise, ctx, seed=0))
    want = _guided_reference(model, noise, ctx, cfg, jnp.zeros_like(ctx))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert pipe.trace_count == 1
    neg = jax.random.normal(jax.random.key(7), ctx.shape)
    got_neg = np.asarray(pipe.generate(noise, ctx, seed=0, negative_embeds=neg))
    np.testing.assert_allclose(got_neg, _guided_reference(model, noise, ctx, cfg, neg), atol=2e-4, rtol=1e-4)
    unguided = np.asarray(CausalInferencePipeline(model, InferenceConfig(denoising_step_list=STEPS,
                                                                         sampler="euler")).generate(noise, ctx, seed=0))
    assert np.abs(unguided - got).max() > 1e-2  # guidance changes the video
    assert np.abs(got_neg - got).max() > 1e-2  # and the negative embedding matters


def test_guidance_errors():
    model, noise, ctx = _inputs()
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        InferenceConfig(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="negative_embeds given but guidance_scale is 1"):
        next(CausalInferencePipeline(model, InferenceConfig()).stream(noise, ctx, seed=0,
                                                                      negative_embeds=jnp.zeros_like(ctx)))
    guided = CausalInferencePipeline(model, InferenceConfig(guidance_scale=2.0))
    with pytest.raises(ValueError, match="negative_embeds has shape"):
        next(guided.stream(noise, ctx, seed=0, negative_embeds=jnp.zeros((1, 3, 32))))
