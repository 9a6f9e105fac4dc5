"""The pipeline's samplers: ``self_forcing`` (fresh re-noising draws) and ``euler`` (the flow ODE)."""

import jax
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
