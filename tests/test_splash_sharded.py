"""attention="splash" under a multi-device ``jit`` (8 virtual CPU devices, conftest): inside an
``attention_sharding`` context the kernel runs under ``jax.shard_map`` with q/k/v split over the project's
``batch`` and ``heads`` rules and the sequence whole. Forward and q/k/v gradients equal the reference in the
Pallas interpreter on data=2,tensor=4 and fsdp=2,tensor=4 meshes (inputs sharded as the training path's
q/k/v constraint), non-divisible dims replicate, and the Mosaic TPU lowering of the sharded forward +
backward at the 1.3B geometry exports for 8 devices (``jax.export``; without the shard_map it cannot), as does
the whole tiny-model QAT train step with attention="splash". With QARVD_EXTENDED_TESTS=1: one calibrated
sharded QAT step with the interpreted kernel equals the step with the reference attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extended import extended
from flax import nnx
from jax import export
from jax.sharding import PartitionSpec as P

from qarvd_jax.models.wan import attention as attn_mod
from qarvd_jax.models.wan.attention import (attention_sharding, block_causal_mask, current_attention_sharding,
                                            reference_attention)
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.models.wan.splash_attention import _shard_plan, splash_attention
from qarvd_jax.models.wan_vae import WanVAEConfig
from qarvd_jax.pipeline.text_to_video import GenerateConfig, TextToVideo
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import QATConfig, load_qat_config
from qarvd_jax.train.data import PromptDataset
from qarvd_jax.train.rollout import Distiller
from qarvd_jax.train.sharding import activation_sharding, make_mesh, rules_table
from qarvd_jax.workflow import DEMO_PROMPTS, Stack

RULES = rules_table(QATConfig().logical_axis_rules)
HEADS = Distiller._LOGICAL["heads"]  # the training path's q/k/v constraint (batch, context, heads, None)
interp_splash = functools.partial(splash_attention, interpret=True)
OMEGA = np.array([0.4, 1.6], np.float32)  # chunk weights of the QAT step tests


def _sharding(mesh_spec):
    return activation_sharding(make_mesh(mesh_spec), RULES)


def _qkv(seed, b, lq, lk, h, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, lq, h, d))
    k, v = rng.normal(size=(2, b, lk, h, d))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _out_and_grads(fn, q, k, v, mask, kv_len, sharding=None):
    """Output and q/k/v gradients of ``sum(out * w)`` in one jit; with ``sharding``: inputs placed as the
    training path constrains q/k/v and the attention traced inside ``attention_sharding(sharding)``."""
    def f(q, k, v, kv_len):
        with attention_sharding(sharding):
            out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask, kv_len=kv_len), q, k, v)
        return out, pull(jnp.broadcast_to(jnp.cos(jnp.arange(q.shape[-1], dtype=out.dtype)), out.shape))
    if sharding is not None:
        q, k, v = (jax.device_put(x, sharding(HEADS, x.shape)) for x in (q, k, v))
    return jax.jit(f)(q, k, v, kv_len)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _shard_map_specs(sharding, q, k, v, mask, kv_len):
    """(in_specs, out_specs) of every shard_map in the forward's jaxpr (operands: the kernel's hoisted mask
    tables, then q, k, v and kv_len)."""
    def fwd(q, k, v, kv_len):
        with attention_sharding(sharding):
            return interp_splash(q, k, v, mask=mask, kv_len=kv_len)
    return [(e.params["in_specs"], e.params["out_specs"]) for e in jax.make_jaxpr(fwd)(q, k, v, kv_len).jaxpr.eqns
            if e.primitive.name == "shard_map"]


CASES = [  # (mesh, B, Lq, Lk, H, D, block-causal mask or None, kv_len, expected q/k/v spec)
    ("data=2,tensor=4", 2, 256, 256, 4, 64, (4, 64, 1), None, P(("data", "fsdp"), None, "tensor")),
    ("fsdp=2,tensor=4", 2, 200, 384, 4, 128, None, 150, P(("data", "fsdp"), None, "tensor")),
    ("data=2,tensor=4", 4, 128, 128, 6, 64, None, 100, P(("data", "fsdp"))),  # 6 heads on tensor=4: replicated
]


@pytest.mark.parametrize("mesh_spec,b,lq,lk,h,d,mask,kv_len,spec", CASES,
                         ids=["data2-tensor4-mask", "fsdp2-tensor4-kvcache", "heads-not-divisible"])
def test_sharded_forward_and_gradients_equal_reference(mesh_spec, b, lq, lk, h, d, mask, kv_len, spec):
    sharding = _sharding(mesh_spec)
    q, k, v = _qkv(lq + lk + h, b, lq, lk, h, d)
    mask = None if mask is None else block_causal_mask(*mask)
    kv_len = None if kv_len is None else jnp.int32(kv_len)
    out, grads = _out_and_grads(interp_splash, q, k, v, mask, kv_len, sharding)
    ref, refs = _out_and_grads(reference_attention, q, k, v, mask, kv_len)
    assert _rel(out, ref) < 1e-5
    for name, g, r in zip("qkv", grads, refs):
        assert _rel(g, r) < 1e-5, name
    # the kernel ran under shard_map with the rules' spec (the interpreter would also run unsharded)
    (in_specs, out_specs), = _shard_map_specs(sharding, q, k, v, mask, kv_len)
    assert out_specs == (spec,) and (in_specs[-4:-1] if kv_len is not None else in_specs[-3:]) == (spec,) * 3
    assert kv_len is None or in_specs[-1] == P()  # kv_len replicated
    assert out.sharding.spec == sharding(HEADS, out.shape).spec
    if kv_len is not None:  # invalid keys get exactly no gradient
        assert not np.any(np.asarray(grads[1])[:, int(kv_len):]) and not np.any(np.asarray(grads[2])[:, int(kv_len):])


def test_shard_plan_context():
    """No context or a one-device mesh: the kernel is called directly; contexts nest and reset."""
    q_shape = (8, 128, 12, 128)
    assert current_attention_sharding() is None and _shard_plan(q_shape, q_shape) is None
    with attention_sharding(activation_sharding(make_mesh("", jax.devices()[:1]), RULES)):
        assert _shard_plan(q_shape, q_shape) is None
        with attention_sharding(_sharding("data=2,fsdp=2,tensor=2")):
            mesh, qs, ks = _shard_plan(q_shape, (8, 512, 12, 128))
            assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
            assert qs == ks == P(("data", "fsdp"), None, "tensor")
            assert _shard_plan((2, 128, 12, 128), q_shape)[1] == P(None, None, "tensor")  # B=2 on 4 batch shards
        assert _shard_plan(q_shape, q_shape) is None
    assert current_attention_sharding() is None


def test_sharded_lowers_for_tpu_forward_and_backward():
    """1.3B geometry, bf16, a 4680-token block-causal chunk (3 frames of 1560), B=2 on data=2,tensor=4 (3 of
    the 12 heads per device): the sharded forward + backward exports for 8 TPU devices with the three
    kernels inside the manual (shard_map) region; the same call without the context does not lower."""
    mesh_spec, b, l, h, d = "data=2,tensor=4", 2, 4680, 12, 128
    sharding, mask = _sharding(mesh_spec), block_causal_mask(3, 1560, 1)

    def f(q, k, v):
        def loss(q, k, v):
            o = splash_attention(q, k, v, mask=mask, interpret=False)
            return o.astype(jnp.float32).sum(), o
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    def traced(q, k, v):
        with attention_sharding(sharding):
            return f(q, k, v)

    sh = sharding(HEADS, (b, l, h, d))
    assert sh.spec == P(("data", "fsdp"), None, "tensor")
    x = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16, sharding=sh)
    exp = export.export(jax.jit(traced, out_shardings=sh), platforms=["tpu"])(x, x, x)
    assert exp.nr_devices == 8
    assert [(a.shape, a.dtype) for a in exp.out_avals] == [((b, l, h, d), jnp.bfloat16)] * 4
    assert all(s.spec == sh.spec for s in exp.out_shardings_jax(sh.mesh))
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == 3  # forward, dq and dk/dv kernels
    assert "sdy.manual_computation" in text  # the shard_map region, on per-device [1, 4680, 3, 128] blocks
    assert f"tensor<1x{l}x{h // 4}x{d}xbf16>" in text and f"tensor<1x{l // 4}x{h}x{d}xbf16>" not in text
    with pytest.raises(NotImplementedError, match="shard_map"):
        export.export(jax.jit(f, out_shardings=sh), platforms=["tpu"])(x, x, x)


# ------------------------------------------------------------------ the sharded QAT step (tiny model)


def test_sharded_qat_step_with_splash_lowers_for_tpu(monkeypatch):
    """The whole QAT train step (teacher rollout, per-call student gradients, optimiser) with the compiled
    kernel on data=2,tensor=4 exports for 8 TPU devices: ``train_step`` traces inside the activation
    sharding's ``attention_sharding``, so every splash call is a shard_map (a bare one would not lower)."""
    from test_qat_gathers import abstract_trainer

    monkeypatch.setitem(attn_mod._REGISTRY, "splash_mosaic", functools.partial(splash_attention, interpret=False))
    trainer, _ = abstract_trainer("data=2,tensor=4", "attention=splash_mosaic", batch=2)
    exp = export.export(trainer.step_fn, platforms=["tpu"])(*trainer.abstract_step_args())
    text = exp.mlir_module()
    assert exp.nr_devices == 8 and text.count("tpu_custom_call") >= 3 and "manual_computation" in text


@pytest.fixture(scope="module")
def calibrated_tiny():
    from test_qat import OVERRIDES, _embed  # the sharded QAT tests' stand-in text encoder and settings

    dit = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    t2v = TextToVideo(dit, None, _embed, vae_config=WanVAEConfig.tiny())
    stack = Stack(t2v, GenerateConfig(num_frames=6, height=32, width=32), t2v.latent_shape(6, 32, 32))
    cfg = load_qat_config(None, [*OVERRIDES, "batch_size=2", "mesh=data=2,tensor=4"])
    model, _ = qat_mod.prepare_student(stack.dit, cfg)
    qat_mod.calibrate_student(model, cfg, stack.t2v.pipeline.config, stack.embeds(DEMO_PROMPTS[:1]),
                              stack.latent_shape, OMEGA)
    return stack, cfg, model


def _step(stack, cfg, model, attention):
    model = nnx.clone(model)
    model.config = model.config.replace(attention=attention)  # the model reads the name at trace time
    trainer = qat_mod.QATTrainer(model, cfg, make_mesh(cfg.mesh), stack.latent_shape, stack.t2v.pipeline.config,
                                 OMEGA)
    data = PromptDataset(np.arange(2), stack.embeds(DEMO_PROMPTS[:2]), global_batch=2, seed=0)
    return trainer.step(trainer.init_state(), data.global_batch_arrays(0, trainer.batch_sh))


@extended("~3 min on 2 shared cores (calibration and two sharded step compiles, one with the interpreted kernel)")
def test_sharded_qat_step_splash_equals_reference(calibrated_tiny, monkeypatch):
    """One calibrated QAT step (teacher rollout + per-call student gradients, 2 chunks) on data=2,tensor=4 with
    the interpreted splash kernel equals the step with the reference attention."""
    monkeypatch.setitem(attn_mod._REGISTRY, "splash_interpret", interp_splash)
    (s_spl, m_spl), (s_ref, m_ref) = (_step(*calibrated_tiny, a) for a in ("splash_interpret", "reference"))
    for key in ("loss", "chunk_loss", "grad_norm"):
        np.testing.assert_allclose(np.asarray(m_spl[key]), np.asarray(m_ref[key]), rtol=1e-4, err_msg=key)
    assert float(m_ref["loss"]) > 0 and float(m_ref["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(s_spl.trainable), jax.tree.leaves(s_ref.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
