"""Quantized CausalWanModel: recipe scope, QuantLinear math, collection, reconstruction, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
from qarvd_jax.quant import QuantSpec
from qarvd_jax.quant.calibration import (calibrate_activations, collect_inputs, init_weight_quantizers,
                                         prepare_quantized_model, reconstruct_layers, _reconstruct)
from qarvd_jax.quant.checkpoint import load_quantized_model, save_quantized
from qarvd_jax.quant.qlinear import QuantLinear, QuantState, iter_quant_layers, quantize_model, set_quant_flags
from qarvd_jax.quant.recipe import LayerQuantConfig, QARVDConfig, QuantRule
from extended import extended

LATENT = (6, 16, 4, 4)


def _model(seed=0):
    return CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(seed))


def _emb(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16, 32)).astype(np.float32)


def test_default_scope_matches_qarvd():
    m = _model()
    layers = quantize_model(m, QARVDConfig().rules())
    blocks = {f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    blocks |= {f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)}
    assert set(layers) == blocks | {"text_embedding.0", "text_embedding.2"}
    assert not layers["blocks.1.cross_attn.k"].reconstruct and not layers["text_embedding.0"].reconstruct
    assert layers["blocks.0.ffn.2"].reconstruct and layers["blocks.0.ffn.2"].a_spec.bits == 8
    assert layers["blocks.0.ffn.2"].w_spec == QuantSpec.qarvd_weight(4, axis=0)
    for lin in (m.patch_embedding, m.time_embedding.layers[0], m.time_projection.layers[1], m.head.head):
        assert isinstance(lin, nnx.Linear) and not isinstance(lin, QuantLinear)
    assert len(nnx.to_pure_dict(nnx.state(m, QuantState))) > 0


def _layer(k_out=None, seed=0, din=64, dout=48):
    rng = np.random.default_rng(seed)
    lin = nnx.Linear(din, dout, rngs=nnx.Rngs(seed))
    w = rng.standard_normal((din, dout)).astype(np.float32) * 0.1
    if k_out is not None:
        w[k_out] *= 12.0  # planted outlier input channels
    lin.kernel[...] = jnp.asarray(w)
    lin.bias[...] = jnp.asarray(rng.standard_normal(dout).astype(np.float32))
    return lin


def test_quantlinear_math_against_numpy():
    lin = _layer()
    cfg = LayerQuantConfig("x", QuantSpec.qarvd_weight(4, axis=0), QuantSpec.qarvd_activation(8))
    q = QuantLinear(lin, cfg)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(lin(x)), atol=1e-5)  # flags off: plain linear
    q.w_scale[...] = jnp.full((1, 48), 0.02, jnp.float32)
    q.w_zero[...] = jnp.full((1, 48), 8.0, jnp.float32)
    q.a_scale[...] = jnp.array([0.03], jnp.float32)
    q.a_zero[...] = jnp.array([128.0], jnp.float32)
    q.w_on[...] = jnp.float32(1)
    q.a_on[...] = jnp.float32(1)
    w = np.asarray(lin.kernel[...], np.float64).T
    wq = (np.clip(np.round(w / 0.02) + 8, 0, 15) - 8) * 0.02
    xq = (np.clip(np.round(np.asarray(x, np.float64) / 0.03) + 128, 0, 255) - 128) * 0.03
    want = xq @ wq.T + np.asarray(lin.bias[...])
    np.testing.assert_allclose(np.asarray(q(x)), want, atol=1e-4)


def test_dual_scale_layer_beats_single_scale_on_planted_outliers():
    outl = np.arange(0, 64, 8)[:8]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32, 64)).astype(np.float32)
    errs = {}
    for dual in (False, True):
        m = nnx.Dict(lin=_layer(outl))  # a tiny container with one linear named "lin"
        ref = np.asarray(m["lin"](jnp.asarray(x)))
        cfg = QARVDConfig(align=8, dual_scale=dual)
        rules = (QuantRule("*", 4, 8, dual_scale=dual),)
        chans = {"lin": outl} if dual else {}
        quantize_model(m, rules, outliers=chans)
        init_weight_quantizers(m, cfg)
        from qarvd_jax.quant.calibration import CalibrationData

        data = CalibrationData()
        data.add("lin", x, 0)
        calibrate_activations(m, data, cfg)
        set_quant_flags(m, weights=True, acts=True)
        errs[dual] = float(np.mean((np.asarray(m["lin"](jnp.asarray(x))) - ref) ** 2))
    assert errs[True] < 0.5 * errs[False], errs


@pytest.fixture(scope="module")
def calibrated():
    """A tiny model with planted outliers, prepared, weight-initialised, calibrated (pass B) and the FP
    inputs of pass C."""
    m = _model()
    k = m.blocks[0].ffn.layers[0].kernel
    k[...] = k[...].at[jnp.array([3, 17, 40])].multiply(10.0)
    cfg = QARVDConfig(iters=60, align=32)
    layers = prepare_quantized_model(m, cfg)
    init_weight_quantizers(m, cfg)
    pipe = CausalInferencePipeline(m)
    set_quant_flags(m, weights=True, acts=False)
    acts = collect_inputs(pipe, m, _emb(), [0], LATENT)
    calibrate_activations(m, acts, cfg, omega=np.array([1.5, 0.5]))
    set_quant_flags(m, weights=False, acts=False)
    fp = collect_inputs(pipe, m, _emb(), [0], LATENT)
    return m, cfg, layers, acts, fp


def test_outlier_split_and_collection_counts(calibrated):
    m, cfg, layers, acts, fp = calibrated
    assert layers["blocks.0.ffn.0"].n_outlier == 32 and not layers["blocks.0.ffn.0"].chunk_weighting
    assert set(np.asarray(m.blocks[0].ffn.layers[0].outlier_idx[...])) >= {3, 17, 40}
    passes = 2 * (4 + 1)  # chunks x (denoising steps + context pass)
    assert len(acts.samples["blocks.1.self_attn.q"]) == passes
    assert acts.chunks["blocks.1.ffn.2"] == [0] * 5 + [1] * 5
    assert acts.samples["blocks.1.ffn.2"][0].shape == (3 * 4, 128)  # 3 frames x 4 tokens, ffn_dim
    assert len(acts.samples["blocks.0.cross_attn.k"]) == 1 and acts.chunks["text_embedding.0"] == [-1]
    # pass B (weights quantized) and pass C (FP) inputs differ downstream of the first quantized layer
    assert not np.allclose(acts.samples["blocks.1.ffn.0"][0], fp.samples["blocks.1.ffn.0"][0])


def test_chunk_weights_change_activation_ranges(calibrated):
    m, cfg, _, acts, _ = calibrated
    name = "blocks.1.self_attn.o"
    layer = dict(iter_quant_layers(m))[name]
    rng = np.random.default_rng(0)
    from qarvd_jax.quant.calibration import CalibrationData

    data = CalibrationData()
    for c in range(2):
        for _ in range(5):
            x = rng.standard_normal((48, 64)).astype(np.float32)
            if c == 1:
                x[:3, 0] = 8.0  # chunk 1 carries rare outliers
            data.add(name, x[None], c)
    chosen = {}
    for omega in ((1.0, 1.0), (1.99, 0.01), (0.01, 1.99)):
        calibrate_activations(m, data, cfg, omega=np.array(omega), names=[name])
        chosen[omega] = float(layer.a_scale[...][0])
    assert chosen[(1.99, 0.01)] != chosen[(0.01, 1.99)], chosen  # the weighting flips the clipping choice


def test_reconstruction_lowers_error_merges_to_grid_and_reuses_compilation(calibrated):
    m, cfg, layers, _, fp = calibrated
    before = _reconstruct._cache_size()
    stats = reconstruct_layers(m, fp, cfg, omega=np.array([1.5, 0.5]))
    assert set(stats) == {n for n, c in layers.items() if c.reconstruct}
    improved = [s["rec_loss_last"] < s["rec_loss_first"] for s in stats.values()]
    assert np.mean(improved) >= 0.75, stats
    shapes = {(tuple(lyr.kernel[...].shape), lyr.cfg.n_outlier) for n, lyr in iter_quant_layers(m) if n in stats}
    assert _reconstruct._cache_size() - before <= len(shapes) < len(stats)
    for name, lyr in iter_quant_layers(m):
        if name not in stats:
            continue
        w = np.asarray(lyr.kernel[...], np.float64).T
        if lyr.cfg.n_outlier:
            w = w[:, np.asarray(lyr.normal_idx[...])]
            s, z = np.asarray(lyr.w_scale[...][1]), np.asarray(lyr.w_zero[...][1])
        else:
            s, z = np.asarray(lyr.w_scale[...][0]), np.asarray(lyr.w_zero[...][0])
        codes = w / s[:, None] + z[:, None]
        assert np.abs(codes - np.round(codes)).max() < 1e-3  # merged weights sit on the integer grid


def test_quantized_checkpoint_roundtrip(calibrated, tmp_path):
    m, *_ = calibrated
    set_quant_flags(m, weights=True, acts=True)
    save_quantized(tmp_path / "q", m, metadata={"note": "test"})
    m2, meta = load_quantized_model(tmp_path / "q")
    assert meta["note"] == "test"
    a = nnx.to_pure_dict(nnx.state(m, QuantState))
    b = nnx.to_pure_dict(nnx.state(m2, QuantState))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 nnx.to_pure_dict(nnx.state(m, nnx.Param)), nnx.to_pure_dict(nnx.state(m2, nnx.Param)))
    noise = jax.random.normal(jax.random.key(0), (1, *LATENT))
    out1 = CausalInferencePipeline(m).generate(noise, _emb(), seed=1)
    out2 = CausalInferencePipeline(m2).generate(noise, _emb(), seed=1)
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized_model(tmp_path)


@extended("layer-group calibration vs whole-model calibration (~2 min on one core)")
def test_layer_groups_give_the_same_model_and_token_subsampling_bounds_memory():
    from qarvd_jax.quant.calibration import CalibrationData, run_qarvd_ptq

    emb = _emb()
    outs = []
    for group in (None, 5):
        m = _model()
        pipe = CausalInferencePipeline(m)
        run_qarvd_ptq(m, pipe, emb, [0], LATENT, QARVDConfig(iters=10, calib_layer_group=group), sensitivity=[0.6, 0.4])
        outs.append(np.asarray(pipe.generate(jax.random.normal(jax.random.key(0), (1, *LATENT)), emb, seed=0)))
    np.testing.assert_array_equal(outs[0], outs[1])  # grouping only bounds memory
    data = CalibrationData(max_tokens=5)
    x = np.arange(2 * 12 * 3, dtype=np.float32).reshape(2, 12, 3)
    data.add("a", x, 0)
    assert [s.shape for s in data.samples["a"]] == [(5, 3), (5, 3)]
    assert all(set(s[:, 0] // 3 % 12) <= set(range(12)) for s in data.samples["a"])
