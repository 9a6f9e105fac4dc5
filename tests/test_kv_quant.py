"""Quantized KV cache (int8 / fp8 / int4) and SageAttention-style int8 attention.

Bounds are derived from the formats: int codes are within half a step (scale / 2) of the value;
fp8 e4m3 within 2^-4 relative in the normal range plus 2^-10 * scale absolute below it. A logit
moves by at most eps = max_t sum_c |q_c| dk_tc / sqrt(D), so softmax weights move by a factor in
[e^-2eps, e^2eps] and the output by at most (e^2eps - 1) max|v| + max dv.
"""

import ml_dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas.int4_pack import pack_int4, unpack_int4
from qarvd_jax.models.wan import kv_cache as kvc
from qarvd_jax.models.wan import kv_quant as kvq
from qarvd_jax.models.wan.attention import blockwise_attention, get_attention, reference_attention
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig

QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
FORMATS = ("int8", "fp8", "int4")


def _np_quant(x, fmt, group):
    """numpy reference in float32: (scale broadcast to x's shape, dequantized values)."""
    b, n, h, d = x.shape
    qmax = np.float32(QMAX[fmt])
    if group is None:
        amax = np.abs(x).max(-1, keepdims=True)
        scale = np.broadcast_to(np.where(amax > 0, amax / qmax, np.float32(1)), x.shape)
    else:
        amax = np.abs(x.reshape(b, n // group, group, h, d)).max(2)
        scale = np.repeat(np.where(amax > 0, amax / qmax, np.float32(1)), group, axis=1)
    y = x / scale
    if fmt == "fp8":
        deq = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    else:
        deq = np.clip(np.round(y), -QMAX[fmt], QMAX[fmt]) * scale
    return scale.astype(np.float32), deq.astype(np.float32)


def _step_bound(x, scale, fmt):
    """Largest dequantization error per element the format allows."""
    if fmt == "fp8":
        return 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * scale
    return 0.5 * scale


def _data(seed=0, b=1, n=32, h=2, d=16, offset=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, h, d)).astype(np.float32)
    x[..., 3] *= 12.0  # an outlier channel (keys have a few)
    return x + offset


def _quantized(x, fmt, group, sink=0):
    b, n, h, d = x.shape
    empty = kvq.init_quantized(b, n, h, d, fmt, group, sink, jnp.float32)
    return kvq.write_quantized(empty, jnp.asarray(x), None, 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [8, None], ids=["k-per-channel", "v-per-token"])
def test_roundtrip_matches_numpy_reference(fmt, group):
    x = _data(1)
    q = _quantized(x, fmt, group)
    scale_np, deq_np = _np_quant(x, fmt, group)
    scale = np.asarray(q.scale)
    scale = np.repeat(scale, q.group, axis=1) if group else np.broadcast_to(scale, x.shape)
    np.testing.assert_allclose(scale, scale_np, rtol=1e-6)
    deq = np.asarray(kvq.dense(q, jnp.float32))
    bound = _step_bound(x, scale_np, fmt) * (1 + 1e-5) + 1e-7
    assert np.all(np.abs(deq - x) <= bound)
    # same codes as numpy except where x / scale sits on a rounding tie (division order)
    step = scale_np * (2.0 ** -3 * np.maximum(np.abs(x) / scale_np, 2.0 ** -6) if fmt == "fp8" else 1.0)
    assert np.all(np.abs(deq - deq_np) <= step * (1 + 1e-5))
    assert np.mean(np.isclose(deq, deq_np, rtol=1e-6, atol=0)) > 0.99
    assert np.abs(deq - x).max() > 0  # it really quantized
    if fmt == "int4":  # packed two per byte along D; unpacking is exact integer arithmetic
        assert q.codes.dtype == jnp.uint8 and q.codes.shape[-1] == x.shape[-1] // 2
        codes = unpack_int4(q.codes, signed=True, axis=-1)
        assert int(jnp.abs(codes).max()) == 7
        np.testing.assert_array_equal(np.asarray(pack_int4(codes, signed=True, axis=-1)), np.asarray(q.codes))
        np.testing.assert_array_equal(np.asarray(codes, np.float32) * scale, deq)


def _softmax_bound(q, k, v, e, dv, kv_len):
    """Bound on |attention(q, k', v') - attention(q, k, v)| [B, Lq, H, D] when every logit moves by at
    most ``e`` [B, H, Lq, Lk] and every value by at most ``dv`` [B, Lk, H, D]: with eps_bar the row max of
    e, p'_t / p_t lies in [e^-(e_t + eps_bar), e^(e_t + eps_bar)] and sum (p' - p) = 0, so
    |d o| <= sum_t p_t (e^(e_t + eps_bar) - 1) |v_t - o| + e^(2 eps_bar) sum_t p_t dv_t."""
    d = q.shape[-1]
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k[:, :kv_len].astype(np.float64)) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    vv = v[:, :kv_len].astype(np.float64)
    o = np.einsum("bhqk,bkhd->bhqd", p, vv)
    e = e[..., :kv_len]
    ebar = e.max(-1, keepdims=True)
    w = p * (np.exp(e + ebar) - 1)
    spread = np.einsum("bhqk,bkhd->bhqkd", w, np.ones_like(vv)) * np.abs(vv.transpose(0, 2, 1, 3)[:, :, None] - o[:, :, :, None])
    bound = spread.sum(3) + np.exp(2 * ebar) * np.einsum("bhqk,bkhd->bhqd", p, dv[:, :kv_len])
    return bound.transpose(0, 2, 1, 3) + 1e-5  # float32 arithmetic of the implementations


@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_with_quantized_cache_within_format_bound(fmt):
    k, v = _data(2, offset=1.0), _data(3)
    q = _data(4, n=8)
    group, kv_len = 8, 24
    kq, vq = _quantized(k, fmt, group), _quantized(v, fmt, None)
    ks = np.repeat(np.asarray(kq.scale), group, axis=1)
    vs = np.broadcast_to(np.asarray(vq.scale), v.shape)
    ref = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_len=kv_len))
    e = np.einsum("bqhd,bkhd->bhqk", np.abs(q), _step_bound(k, ks, fmt)) / np.sqrt(q.shape[-1])
    bound = _softmax_bound(q, k, v, e, _step_bound(v, vs, fmt), kv_len)
    for name, fn in (("reference", reference_attention), ("blockwise", blockwise_attention)):
        out = np.asarray(fn(jnp.asarray(q), kq, vq, kv_len=kv_len, **({"block_k": 8} if name == "blockwise" else {})))
        err = np.abs(out - ref)
        assert np.all(err <= bound), (name, float((err - bound).max()))
        assert err.max() > 1e-5  # the quantized cache was really read


def test_blockwise_dequantizes_per_block_like_whole():
    k, v, q = _data(5, n=64), _data(6, n=64), _data(7, n=8)
    kq, vq = _quantized(k, "int8", 16), _quantized(v, "int8", None)
    whole = reference_attention(jnp.asarray(q), kq, vq, kv_len=40)
    blocks = blockwise_attention(jnp.asarray(q), kq, vq, kv_len=40, block_k=16)  # 4 key blocks of 16
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), atol=1e-5, rtol=1e-6)  # f32 sum order


@pytest.mark.parametrize("name,pv", [("sage_int8", "bf16"), ("sage_int8_fp8", "fp8")])
def test_sage_attention_within_bound(name, pv):
    # K with per-channel means far larger than its spread (what the smoothing removes: without it the
    # int8 steps of K are ~60x coarser and the error leaves the bound)
    rng = np.random.default_rng(8)
    k = rng.standard_normal((1, 48, 2, 16)).astype(np.float32) + 60.0 * rng.standard_normal(16).astype(np.float32)
    v, q = rng.standard_normal((1, 48, 2, 16)).astype(np.float32), rng.standard_normal((1, 8, 2, 16)).astype(np.float32)
    kv_len = 40
    out = np.asarray(get_attention(name)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_len=kv_len, block_k=16))
    ref = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_len=kv_len))
    d = q.shape[-1]
    ksm = k - k[:, :kv_len].mean(1, keepdims=True)
    sq = np.abs(q).max(-1, keepdims=True) / 127  # [B, Lq, H, 1]
    sk = np.abs(ksm).max(-1, keepdims=True) / 127  # [B, Lk, H, 1]
    e = (np.einsum("bqhx,bkhd->bhqk", sq, np.abs(ksm)) + np.einsum("bqhd,bkhx->bhqk", np.abs(q), sk)
         + d * np.einsum("bqhx,bkhx->bhqk", sq, sk) / 2) / 2 / np.sqrt(d)  # half an int8 step on q and k
    if pv == "bf16":  # P and V rounded to bf16: 2^-8 relative each
        dv, extra = 2.0 ** -7 * np.abs(v), 0.0
    else:  # fp8 e4m3: 2^-4 relative each, plus the subnormal floors of V (2^-10 s_v) and of 448 P
        sv = np.abs(v[:, :kv_len]).max(1, keepdims=True) / 448
        dv = (2.0 ** -3 + 2.0 ** -8) * np.abs(v) + 2.0 ** -10 * sv
        extra = kv_len * 2.0 ** -10 / 448 * 1.07 * np.abs(v[:, :kv_len]).max(1)[:, None]
    bound = _softmax_bound(q, k, v, e, dv, kv_len) + extra
    err = np.abs(out - ref)
    assert np.all(err <= bound), float((err / bound).max())
    assert err.max() > 1e-3


def _tiny(**kw):
    return CausalWanModel(WanDiTConfig.tiny(**kw), rngs=nnx.Rngs(0))


@nnx.jit
def _chunk(model, x, t, cross, cache, start):
    return model.forward_chunk(x, t, cross, cache, start)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rolling_and_sink_semantics_match_the_float_cache(fmt):
    """Window of 4 frames with 1 sink frame, chunks of 1 frame: after 6 chunks the cache rolled twice.
    Layer 0's keys/values depend only on the inputs, so its quantized cache must dequantize to the
    float cache slot by slot (within the format's step); float sink copies are the float values."""
    model = _tiny(local_attn_size=4, sink_size=1, num_frame_per_block=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 16, 4, 4)), jnp.float32)
    t = jnp.full((1, 1), 500.0)
    cross = model.cross_kv(jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32))
    fsl = 4
    caches = {"bf16": model.init_cache(1, 6, fsl), fmt: model.init_cache(1, 6, fsl, kv_cache=fmt),
              "sink": model.init_cache(1, 6, fsl, kv_cache=fmt, sink_float=True)}
    for c in range(6):
        for key in caches:
            _, caches[key] = _chunk(model, x[:, c:c + 1], t, cross, caches[key], jnp.int32(c * fsl))
    f, q, s = caches["bf16"], caches[fmt], caches["sink"]
    assert int(f.local_end) == int(q.local_end) == int(s.local_end) == 16
    assert int(f.global_end) == int(q.global_end) == 24
    for fl, ql, sl, group in ((f.k[0], q.k[0], s.k[0], fsl), (f.v[0], q.v[0], s.v[0], None)):
        ref = np.asarray(fl)
        scale = np.asarray(ql.scale)
        scale = np.repeat(scale, group, axis=1) if group else np.broadcast_to(scale, ref.shape)
        deq = np.asarray(kvq.dense(ql, jnp.float32))
        assert np.all(np.abs(deq - ref) <= _step_bound(ref, scale, fmt) * (1 + 1e-5) + 1e-6)
        sink = np.asarray(kvq.dense(sl, jnp.float32))
        np.testing.assert_array_equal(sink[:, :fsl], ref[:, :fsl])  # float copy, no quantization
        np.testing.assert_array_equal(sink[:, fsl:], deq[:, fsl:])
    assert s.k[0].sink.shape == (1, fsl, 4, 16) and q.k[0].sink is None


def test_cache_bytes_are_exact():
    cfg = WanDiTConfig.tiny()
    b, frames, fsl = 2, 6, 16
    n = frames * fsl
    h, d, layers = cfg.num_heads, cfg.head_dim, cfg.num_layers
    per_elem = {"bf16": 4, "int8": 1, "fp8": 1, "int4": 0.5}  # the tiny model's float cache is float32
    for fmt, c in per_elem.items():
        cache = kvc.new_cache(cfg, b, frames, fsl, kv_cache=fmt)
        codes = 2 * layers * int(b * n * h * d * c)
        scales = 0 if fmt == "bf16" else layers * 4 * (b * frames * h * d + b * n * h)
        assert kvq.kv_bytes(cache) == codes + scales + 8, fmt
    # the 1.3B geometry (21 frames x 1560 tokens, bf16): the acceptance ratios
    big = WanDiTConfig.selfforcing_1_3b()
    sizes = {fmt: kvq.kv_bytes(jax.eval_shape(lambda f=fmt: kvc.new_cache(big, 1, 21, 1560, kv_cache=f)))
             for fmt in kvq.KV_FORMATS}
    assert sizes["bf16"] == 30 * 2 * 32760 * 12 * 128 * 2 + 8
    assert sizes["int8"] / sizes["bf16"] <= 0.53 and sizes["fp8"] == sizes["int8"]
    assert sizes["int4"] / sizes["bf16"] <= 0.28


@pytest.mark.parametrize("fmt", kvq.KV_FORMATS)
def test_compile_once_every_format(fmt):
    model = _tiny()
    pipe = CausalInferencePipeline(model, InferenceConfig(denoising_step_list=(1000, 500), kv_cache=fmt))
    noise = jax.random.normal(jax.random.key(0), (1, 6, 16, 4, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
    a = pipe.generate(noise, ctx, seed=1)
    b = pipe.generate(noise, ctx, seed=1)
    assert pipe.trace_count == 1 and pipe._chunk_fn._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if fmt == "bf16":  # the default config is the same program: identical latents
        ref = CausalInferencePipeline(model, InferenceConfig(denoising_step_list=(1000, 500)))
        np.testing.assert_array_equal(np.asarray(ref.generate(noise, ctx, seed=1)), np.asarray(a))


def test_sage_attention_in_the_pipeline_with_int8_cache():
    model = _tiny(attention="sage_int8")
    pipe = CausalInferencePipeline(model, InferenceConfig(denoising_step_list=(1000, 500), kv_cache="int8"))
    noise = jax.random.normal(jax.random.key(0), (1, 6, 16, 4, 4))
    out = pipe.generate(noise, jax.random.normal(jax.random.key(1), (1, 5, 32)), seed=1)
    assert np.isfinite(np.asarray(out)).all() and pipe.trace_count == 1


def test_bad_formats_and_the_training_path_fail_clearly():
    with pytest.raises(ValueError, match="kv_cache='int3'.*int8"):
        InferenceConfig(kv_cache="int3")
    with pytest.raises(ValueError, match="kv_cache='nf4'"):
        kvc.new_cache(WanDiTConfig.tiny(), 1, 6, 16, kv_cache="nf4")
    model = _tiny()
    from qarvd_jax.models.wan.model import BlockStack, block_stack_plan

    blocks = BlockStack(block_stack_plan(model), (nnx.state(model.blocks),))
    cache = model.init_cache(1, 6, 16, kv_cache="int8")
    with pytest.raises(ValueError, match="inference only"):
        model.forward_chunk(jnp.zeros((1, 3, 16, 8, 8)), jnp.zeros((1, 3)), None, cache, 0, blocks=blocks)


GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]


def test_generate_cli_kv_cache_int8(tmp_path):
    import json

    from qarvd_jax.cli import main as cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "gen"
    assert cli(["generate", "--prompts", str(prompts), "--out", str(out), *GEOM, "--kv-cache", "int8"]) == 0
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["settings"]["sampler"]["kv_cache"] == "int8"
    assert (out / "videos" / "a fox-0.mp4").stat().st_size > 0
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli(["generate", "--prompts", str(prompts), "--out", str(out), "--kv-cache", "int3"])


def test_compare_kv_column(tmp_path):
    import json

    from qarvd_jax.cli import main as cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "cmp"
    assert cli(["compare", "--methods", "rtn", "--bits", "w8a8", "--kv", "bf16,int8", "--out", str(out),
                "--prompts", str(prompts), *GEOM]) == 0
    rows = json.loads((out / "compare.json").read_text())["results"]
    assert [(r["method"], r["w_bits"], r["kv_cache"]) for r in rows] == [("fp", 16, "int8"), ("rtn", 8, "bf16"),
                                                                         ("rtn", 8, "int8")]
    assert all(r["error"] is None and len(r["latent_psnr_per_chunk"]) == 2 for r in rows)
    assert rows[0]["latent_psnr"] > 30  # an int8 cache alone stays close to the bf16 cache
    assert "| KV cache |" in (out / "compare.md").read_text()
    assert cli(["compare", "--methods", "rtn", "--kv", "int3", "--out", str(tmp_path / "x"), *GEOM]) == 2
