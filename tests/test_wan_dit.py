"""CausalWanModel: fixture parity, KV path vs training path, cache rolling, compile-once, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan import kv_cache as kvc
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.models.wan.parity import verify_fixture
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig


def test_fixture_parity(fixtures_dir):
    reports = verify_fixture(f"{fixtures_dir}/selfforcing_tiny")
    names = {r.name for r in reports}
    assert {"forward/flow_pred", "kv/output_latents", "kv/step_x0_pred", "kv/final_kv_k",
            "roundtrip pt->orbax->safetensors"} <= names
    bad = [(r.name, r.max_abs, r.note) for r in reports if not r.passed]
    assert not bad
    assert max(r.max_abs for r in reports if r.name.startswith(("forward/flow", "kv/output"))) < 1e-5


def _random_model(seed=0, **cfg_kw):
    cfg = WanDiTConfig.tiny(dim=48, num_heads=3, ffn_dim=64, text_dim=24, text_len=8, num_frame_per_block=2,
                            **cfg_kw)
    model = CausalWanModel(cfg, rngs=nnx.Rngs(seed))
    # random (not identity) norms so a wrong scale mapping would show
    key = jax.random.key(seed + 100)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] in ("scale", "bias") and var[...].ndim == 1:
            key, sub = jax.random.split(key)
            var[...] = jax.random.normal(sub, var[...].shape) * 0.3 + (1.0 if path[-1] == "scale" else 0.0)
    return model


def _inputs(b=2, f=6, h=4, w=6, seed=0, text=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, f, 16, h, w)).astype(np.float32)
    t = np.repeat(rng.uniform(0, 1000, (b, f // 2)), 2, axis=1).astype(np.float32)
    ctx = rng.standard_normal((b, text, 24)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)


@nnx.jit
def _train_fwd(model, x, t, ctx, mask=None):
    return model(x, t, ctx, attn_mask=mask)


@nnx.jit
def _chunk_fwd(model, x, t, cross, cache, start):
    return model.forward_chunk(x, t, cross, cache, start)


def _kv_per_chunk(model, x, t, ctx):
    cfg = model.config
    b, f, _, h, w = x.shape
    fsl = cfg.frame_seq_length(h, w)
    fc = cfg.num_frame_per_block
    cross = model.cross_kv(ctx)
    cache = model.init_cache(b, f, fsl)
    outs = []
    for c in range(f // fc):
        sl = slice(c * fc, (c + 1) * fc)
        out, cache = _chunk_fwd(model, x[:, sl], t[:, sl], cross, cache, jnp.int32(c * fc * fsl))
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


def test_kv_path_equals_training_path_global_attention():
    model = _random_model()
    x, t, ctx = _inputs()
    full = _train_fwd(model, x, t, ctx)
    kv, cache = _kv_per_chunk(model, x, t, ctx)
    np.testing.assert_allclose(np.asarray(kv), np.asarray(full), atol=2e-5, rtol=0)
    assert int(cache.global_end) == int(cache.local_end) == 6 * 6


def _inference_visibility_mask(nf, fsl, nfb, window, sink):
    """Keys a query of chunk c sees in KV inference with a rolling cache: the first `sink` frames
    plus the most recent `window - sink` frames up to the end of its chunk."""
    frames = np.repeat(np.arange(nf), fsl)
    end = ((frames // nfb) + 1) * nfb
    fk = frames[None, :]
    e = end[:, None]
    return (fk < e) & ((fk < sink) | (fk >= e - (window - sink)))


@pytest.mark.parametrize("window,sink", [(5, 1), (4, 0), (3, 1)])
def test_kv_rolling_cache_with_sink(window, sink):
    model = _random_model(local_attn_size=window, sink_size=sink)
    x, t, ctx = _inputs(b=1, f=10)
    kv, cache = _kv_per_chunk(model, x, t, ctx)
    fsl = 6
    assert cache.cache_len == window * fsl
    mask = _inference_visibility_mask(10, fsl, 2, window, sink)
    ref = _train_fwd(model, x, t, ctx, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(kv), np.asarray(ref), atol=2e-5, rtol=0)
    # training path with a window (no sink) uses the block-causal window mask instead
    if sink:
        assert not np.allclose(np.asarray(_train_fwd(model, x, t, ctx)), np.asarray(kv), atol=1e-3)


class _DictCache:
    """Direct transcription of the original's mutable cache update (doc section 8), numpy."""

    def __init__(self, cache_len, local_attn_size, sink_tokens):
        self.k = np.zeros((cache_len,), np.float64)
        self.g = 0
        self.l = 0
        self.w = local_attn_size
        self.sink = sink_tokens

    def step(self, new, current_start):
        n = len(new)
        current_end = current_start + n
        size = len(self.k)
        if self.w != -1 and current_end > self.g and n + self.l > size:
            ev = n + self.l - size
            rolled = self.l - ev - self.sink
            self.k[self.sink:self.sink + rolled] = self.k[self.sink + ev:self.sink + ev + rolled].copy()
            local_end = self.l + current_end - self.g - ev
        else:
            local_end = self.l + current_end - self.g
        self.k[local_end - n:local_end] = new
        self.g, self.l = current_end, local_end
        return self.k[:local_end].copy()


@pytest.mark.parametrize("window,sink,fsl,nfb", [(-1, 0, 3, 2), (4, 1, 3, 2), (5, 2, 2, 3), (3, 0, 4, 1)])
def test_advance_layer_cache_matches_original_semantics(window, sink, fsl, nfb):
    num_frames = 12
    cache_len = kvc.cache_len_tokens(window, num_frames, fsl)
    ref = _DictCache(cache_len, window, sink * fsl)
    k = jnp.zeros((1, cache_len, 1, 1))
    v = jnp.zeros((1, cache_len, 1, 1))
    g = jnp.zeros((), jnp.int32)
    l_ = jnp.zeros((), jnp.int32)
    counter = 0
    for c in range(num_frames // nfb):
        start = c * nfb * fsl
        for _ in range(3):  # denoising calls and the context pass overwrite the same slots
            counter += 1
            new = np.arange(nfb * fsl, dtype=np.float64) + 1000 * counter
            want = ref.step(new, start)
            nk = jnp.asarray(new, jnp.float32).reshape(1, -1, 1, 1)
            k, v, new_l = kvc.advance_layer_cache(k, v, nk, nk, global_end=g, local_end=l_, current_start=start,
                                                  local_attn_size=window, sink_tokens=sink * fsl)
            g, l_ = jnp.asarray(start + nfb * fsl, jnp.int32), new_l
            assert int(l_) == len(want)
            np.testing.assert_array_equal(np.asarray(k)[0, : int(l_), 0, 0], want)


def test_chunk_call_compiles_once_for_every_chunk_step_and_context_pass():
    model = _random_model()
    pipe = CausalInferencePipeline(model, InferenceConfig(context_noise=0.0))
    b, f = 1, 8
    noise = jax.random.normal(jax.random.key(0), (b, f, 16, 4, 6))
    ctx = jax.random.normal(jax.random.key(1), (b, 5, 24))
    out1 = pipe.generate(noise, ctx, seed=3)
    out2 = pipe.generate(noise, ctx, seed=3)
    assert pipe.trace_count == 1  # 4 chunks x (4 steps + context pass), twice: one trace
    assert pipe._chunk_fn._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))  # same seed -> same latents
    out3 = pipe.generate(noise, ctx, seed=4)
    assert not np.allclose(np.asarray(out1), np.asarray(out3))


def test_bfloat16_compute_close_to_float32():
    model32 = _random_model()
    cfg16 = model32.config.replace(param_dtype="bfloat16", dtype="bfloat16")
    from qarvd_jax.models.wan.loading import model_from_params, model_params

    model16 = model_from_params(model_params(model32), cfg16)
    x, t, ctx = _inputs()
    a = np.asarray(_train_fwd(model32, x, t, ctx))
    out16 = _train_fwd(model16, x, t, ctx)
    assert out16.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out16, np.float32) - a).max() / np.abs(a).max()
    assert rel < 0.05, rel


def test_bad_shapes_are_rejected():
    model = _random_model()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(x[:, :, :, :3], t, ctx)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:, :3], ctx)
    with pytest.raises(ValueError, match="text_len"):
        model(x, t, jnp.zeros((2, 9, 24)))
    with pytest.raises(ValueError, match="RoPE"):
        model.init_cache(1, 2000, 6)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        next(CausalInferencePipeline(model).stream(jnp.zeros((1, 5, 16, 4, 6)), ctx[:1], seed=0))
