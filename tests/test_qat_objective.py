"""The per-call QAT objective (stop-gradient KV cache, gradients accumulated call by call inside the
scans, blocks scanned over stacked states) against a reference written with explicit Python loops
over chunks and passes on the model's ordinary per-layer path, differentiated once by ``jax.grad``.
Tiny model, float32, one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan.attention import flash_attention, reference_attention
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel, block_stack_plan
from qarvd_jax.pipeline.causal_inference import InferenceConfig
from qarvd_jax.quant.qlinear import set_quant_flags
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.rollout import Distiller
from qarvd_jax.train.state import trainable_filter

LATENT = (6, 16, 4, 4)  # 2 chunks of 3 frames


def _student(train_weights: bool, **model_kw):
    dit = CausalWanModel(WanDiTConfig.tiny().replace(**model_kw), rngs=nnx.Rngs(0))
    cfg = QATConfig(compute_dtype="float32", dual_scale=False, hist_bins=256, align=8, attention="flash",
                    train_weights=train_weights)
    model, _ = qat_mod.prepare_student(dit, cfg)
    from qarvd_jax.quant.calibration import init_weight_quantizers

    init_weight_quantizers(model, cfg.recipe())
    for _, layer in qat_mod.iter_quant_layers(model):  # plausible activation steps without calibration
        layer.a_scale[...] = jnp.full_like(layer.a_scale[...], 0.05)
        layer.a_zero[...] = jnp.full_like(layer.a_zero[...], 128.0)
    set_quant_flags(model, weights=True, acts=True)
    return model


def _reference(d: Distiller, graphdef, trainable, frozen, embeds, traj):
    """Explicit loops; each call reads stop_gradient(cache); the context pass only updates the cache."""
    model = lambda tr: nnx.merge(graphdef, tr, frozen)

    def loss_fn(tr):
        m = model(tr)
        cross = m.cross_kv(embeds)
        cache = m.init_cache(embeds.shape[0], LATENT[0], d.frame_seq_length, dtype=d.dtype)
        taus = np.concatenate([d.timesteps, [d.context_noise]])
        total, chunk_losses = 0.0, []
        for k in range(d.num_chunks):
            start = k * d.chunk_frames * d.frame_seq_length
            errs = []
            for s in range(d.num_steps + 1):
                t = jnp.full((embeds.shape[0], d.chunk_frames), taus[s], jnp.float32)
                flow, cache = m.forward_chunk(traj.inputs[k, s], t, cross, jax.lax.stop_gradient(cache), start)
                cache = jax.lax.stop_gradient(cache)
                if s < d.num_steps:
                    errs.append(jnp.mean(jnp.square(flow - traj.flows[k, s])))
            chunk_losses.append(sum(errs) / d.num_steps)
            total = total + d.omega[k] * chunk_losses[-1]
        return total / d.num_chunks, jnp.stack(chunk_losses)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)


@pytest.mark.parametrize("train_weights,scan,window", [
    (False, True, False),
    pytest.param(True, True, True, marks=pytest.mark.slow),   # weights trained, local window + roll
    pytest.param(True, False, False, marks=pytest.mark.slow),  # blocks in a Python loop
])
def test_per_call_objective_equals_explicit_loops(train_weights, scan, window):
    model = _student(train_weights, **(dict(local_attn_size=3, sink_size=0) if window else {}))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(train_weights), ...)
    plan = block_stack_plan(model)
    assert len(plan) == 1  # single-scale blocks stack
    sampler = InferenceConfig(denoising_step_list=(1000, 500), context_noise=20.0)
    d = Distiller(graphdef, model.config, LATENT, sampler, omega=np.asarray([0.7, 1.3], np.float32),
                  rollout_gradient="per_call", block_plan=plan, scan_layers=scan)
    teacher = (trainable, qat_mod.with_quant_flags(frozen, False))
    embeds = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 32)), jnp.float32)
    noise, renoise = d.sample_noise(jax.random.split(jax.random.key(3), 2))
    traj = jax.jit(d.teacher_rollout)(teacher, embeds, noise, renoise)
    (loss, aux), grads = jax.jit(d.student_loss_and_grad)(trainable, frozen, embeds, traj)
    (ref_loss, ref_chunks), ref_grads = _reference(d, graphdef, trainable, frozen, embeds, traj)
    assert float(loss) > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["chunk_loss"], ref_chunks, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in ref_flat)
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-5 * scale)
    # every block and the text projections get a gradient (cross-K/V gradient pulled back)
    assert float(jnp.abs(grads["blocks"][1]["ffn"]["layers"][2]["w_scale"][...]).sum()) > 0
    assert float(jnp.abs(grads["blocks"][0]["cross_attn"]["k"]["w_scale"][...]).sum()) > 0
    assert float(jnp.abs(grads["text_embedding"]["layers"][0]["w_scale"][...]).sum()) > 0
    if train_weights:
        return
    # and the full-rollout objective has the same loss (its gradient also crosses chunks)
    d_full = Distiller(graphdef, model.config, LATENT, sampler, omega=d.omega, rollout_gradient="full")
    np.testing.assert_allclose(jax.jit(d_full.student_loss)(trainable, frozen, embeds, traj)[0], loss, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"kv_len": 45}, {"mask": True}, {"mask": True, "kv_len": 33}])
def test_flash_attention_forward_and_backward(kw):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((2, 24, 3, 8), (2, 70, 3, 8), (2, 70, 3, 8)))
    g = jnp.asarray(r.standard_normal((2, 24, 3, 8)), jnp.float32)
    kw = dict(kw)
    if kw.get("mask"):
        kw["mask"] = jnp.asarray(r.random((24, 70)) < 0.6).at[:, 0].set(True)
    if "kv_len" in kw:
        kw["kv_len"] = jnp.int32(kw["kv_len"])

    def f(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * g), (0, 1, 2))(q, k, v)

    (a, ga), (b, gb) = jax.jit(lambda: f(lambda *x, **y: flash_attention(*x, block_k=16, **y)))(), f(reference_attention)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=2e-5)
    # the backward is the custom recomputing one: no [Lq, Lk] probability residual is saved
    from jax._src.ad_checkpoint import saved_residuals

    res = saved_residuals(lambda q, k, v: flash_attention(q, k, v, block_k=16, **kw), q, k, v)
    assert all(np.prod(r[0].shape) <= q.size * 3 or r[0].shape[-1] != 16 for r in res)
    assert not any(len(r[0].shape) == 5 for r in res)


@pytest.mark.parametrize("rollout_gradient", ["full", "per_call"])
def test_teacher_follows_the_guided_euler_sampler(rollout_gradient):
    """With ``sampler: euler`` and classifier-free guidance the teacher's inputs are the pipeline's
    (guided Euler steps, cond + zero-text caches), and its recorded flows are the conditional ones: the
    full-precision model itself, replaying them, has zero loss."""
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline

    model = _student(False)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(False), ...)
    sampler = InferenceConfig(denoising_step_list=(1000, 600, 300), sampler="euler", guidance_scale=2.5)
    plan = block_stack_plan(model) if rollout_gradient == "per_call" else None
    d = Distiller(graphdef, model.config, LATENT, sampler, rollout_gradient=rollout_gradient, block_plan=plan)
    teacher_frozen = qat_mod.with_quant_flags(frozen, False)
    embeds = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 32)), jnp.float32)
    noise, renoise = d.sample_noise(jax.random.split(jax.random.key(3), 2))
    traj = jax.jit(d.teacher_rollout)((trainable, teacher_frozen), embeds, noise, renoise)
    fp = nnx.merge(graphdef, trainable, teacher_frozen)
    recs = list(CausalInferencePipeline(fp, sampler).stream(noise, embeds, renoise=renoise))
    for k, rec in enumerate(recs):
        np.testing.assert_allclose(traj.inputs[k], rec.inputs, rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(traj.flows[k]) - np.asarray(rec.flows)).max() > 1e-3  # guided != conditional
    loss = d.student_loss(trainable, teacher_frozen, embeds, traj)[0] if rollout_gradient == "full" else \
        jax.jit(d.student_loss_and_grad)(trainable, teacher_frozen, embeds, traj)[0][0]
    assert float(loss) < 1e-9, float(loss)
