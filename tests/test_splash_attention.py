"""attention="splash" (jax's Pallas TPU splash kernel): forward and q/k/v gradients equal the reference in
the Pallas interpreter (no mask, the block-causal mask, kv_len < Lk; lengths that need padding; D=64 / 128),
the tiny model with splash equals it with the reference, clear errors, and the Mosaic TPU lowering of the
forward + backward at the 1.3B geometry (``jax.export``; it neither runs the kernel nor libtpu's compiler)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from qarvd_jax.models.wan import attention as attn_mod
from qarvd_jax.models.wan.attention import block_causal_mask, get_attention, reference_attention
from qarvd_jax.models.wan.splash_attention import splash_attention, splash_block_size
from test_wan_dit import _inputs, _kv_per_chunk, _random_model, _train_fwd

interp_splash = functools.partial(splash_attention, interpret=True)

CASES = [  # (Lq, Lk, D, block-causal (num_frames, frame_seq_length, frames_per_block) or None, kv_len)
    (256, 256, 64, None, None),  # no padding, one 256 block
    (200, 200, 128, None, None),  # padded keys excluded by segment ids, padded query rows dropped
    (300, 300, 64, (3, 100, 1), None),  # padded to 384 = 3 blocks of 128: skipped, partial and full blocks
    (200, 200, 128, (4, 50, 2), None),
    (200, 384, 64, None, 150),  # KV-cache shape: queries vs a larger, partly filled cache
    (256, 256, 128, (4, 64, 1), 190),  # mask and kv_len together
]


def _qkv(seed, lq, lk, d, b=1, h=2, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, lq, h, d))
    k, v = rng.normal(size=(2, b, lk, h, d))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _out_and_grads(fn, q, k, v, kw):
    """Output and the q/k/v gradients of ``sum(out * w)`` (a non-uniform cotangent), in one jitted vjp."""
    def f(q, k, v, kv_len):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, mask=kw["mask"], kv_len=kv_len), q, k, v)
        return out, pull(jnp.broadcast_to(jnp.cos(jnp.arange(q.shape[-1], dtype=out.dtype)), out.shape))
    return jax.jit(f)(q, k, v, kw["kv_len"])


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("lq,lk,d,mask,kv_len", CASES)
def test_forward_and_gradients_equal_reference(lq, lk, d, mask, kv_len):
    q, k, v = _qkv(lq + lk + d, lq, lk, d)
    kw = dict(mask=None if mask is None else block_causal_mask(*mask),
              kv_len=None if kv_len is None else jnp.int32(kv_len))
    out, grads = _out_and_grads(interp_splash, q, k, v, kw)
    ref, refs = _out_and_grads(reference_attention, q, k, v, kw)
    assert out.shape == (1, lq, 2, d) and out.dtype == jnp.float32
    assert _rel(out, ref) < 1e-5
    for name, g, r in zip("qkv", grads, refs):
        assert _rel(g, r) < 1e-4, name
    if kv_len is not None:  # invalid keys get exactly no gradient
        assert not np.any(np.asarray(grads[1])[:, kv_len:]) and not np.any(np.asarray(grads[2])[:, kv_len:])


def test_mask_and_kv_len_actually_matter():
    """The mask and kv_len of the cases change the output, so a kernel ignoring them fails the cases."""
    q, k, v = _qkv(0, 256, 256, 64)
    m = block_causal_mask(4, 64, 1)
    assert _rel(reference_attention(q, k, v, mask=m), reference_attention(q, k, v)) > 0.1
    assert _rel(reference_attention(q, k, v, kv_len=jnp.int32(190)), reference_attention(q, k, v)) > 0.1


def test_interpret_params_and_jit():
    q, k, v = _qkv(1, 128, 128, 64)
    kv_len = jnp.int32(100)
    f = jax.jit(lambda q, k, v, n: splash_attention(q, k, v, kv_len=n, interpret=pltpu.InterpretParams()))
    assert _rel(f(q, k, v, kv_len), reference_attention(q, k, v, kv_len=kv_len)) < 1e-5


def test_block_sizes():
    assert [splash_block_size(n) for n in (128, 256, 384, 512, 4736, 32768)] == [128, 256, 128, 512, 128, 512]


def test_registered_and_clear_errors():
    assert get_attention("splash") is splash_attention
    q, k, v = _qkv(2, 128, 128, 64)
    if jax.default_backend() != "tpu":
        with pytest.raises(RuntimeError, match=r"runs on TPU only.*'flash'.*'xla'"):
            splash_attention(q, k, v)
    m = jnp.ones((128, 128), bool)
    with pytest.raises(ValueError, match="needs a static mask"):
        jax.jit(lambda q, k, v, m: interp_splash(q, k, v, mask=m))(q, k, v, m)
    with pytest.raises(ValueError, match="mask shape"):
        interp_splash(q, k, v, mask=np.ones((128, 64), bool))


def test_tiny_model_splash_equals_reference(monkeypatch):
    """Training path (the numpy block-causal mask stays concrete under nnx.jit) and the KV-cache path
    (kv_len; cross-attention with 8 text tokens padded to 128). Gradients are checked per call above."""
    monkeypatch.setitem(attn_mod._REGISTRY, "splash_interpret", interp_splash)
    ref_model, spl_model = _random_model(), _random_model(attention="splash_interpret")
    x, t, ctx = _inputs(b=1, f=4)
    ref, spl = _train_fwd(ref_model, x, t, ctx), _train_fwd(spl_model, x, t, ctx)
    np.testing.assert_allclose(np.asarray(spl), np.asarray(ref), atol=2e-5, rtol=0)
    kv_ref, _ = _kv_per_chunk(ref_model, x, t, ctx)
    kv_spl, _ = _kv_per_chunk(spl_model, x, t, ctx)
    np.testing.assert_allclose(np.asarray(kv_spl), np.asarray(kv_ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("lk,kv_len", [(4680, False), (32760, True)], ids=["train-mask", "kv-cache"])
def test_lowers_for_tpu_forward_and_backward(lk, kv_len):
    """1.3B geometry, bf16: a 4680-token chunk (3 frames of 1560, block-causal one frame per chunk) and the
    KV-cache shape (4680 queries against a 32760-key cache, traced kv_len)."""
    lq, h, d = 4680, 12, 128
    mask = None if kv_len else block_causal_mask(3, 1560, 1)

    def f(q, k, v, n):
        def loss(q, k, v):
            o = splash_attention(q, k, v, mask=mask, kv_len=n if kv_len else None, interpret=False)
            return o.astype(jnp.float32).sum(), o
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    q, kv = (jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16) for n in (lq, lk))
    exp = export.export(jax.jit(f), platforms=["tpu"])(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32))
    assert [a.shape for a in exp.out_avals] == [(1, lq, h, d), (1, lq, h, d), (1, lk, h, d), (1, lk, h, d)]
    assert all(a.dtype == jnp.bfloat16 for a in exp.out_avals)
    assert exp.mlir_module().count("tpu_custom_call") == 3  # forward, dq and dk/dv kernels
