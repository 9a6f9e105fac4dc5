"""quantize_layer of every method against independent float64 numpy references, and planted cases where
a method must beat RTN clearly. Comparisons tolerate a rare rounding flip between float32 and float64."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarvd_jax.quant import methods


# --------------------------------------------------------------------------------- numpy references
def np_minmax(x, axis, bits, symmetric=False):
    """(scale, zero) of a min-max quantizer reducing over ``axis`` (None: per tensor)."""
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    if symmetric:
        return np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / (2 ** (bits - 1) - 1), 1e-8), None
    s = np.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
    return s, np.round(-lo / s)


def np_fq(x, s, z, bits, symmetric=False):
    if symmetric:
        return np.clip(np.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def np_rtn_weight(w, bits):
    s, z = np_minmax(w, 1, bits)
    return np_fq(w, s, z, bits)


def np_rtn_act(x, bits, x_calib):
    s, z = np_minmax(x_calib, None, bits)
    return np_fq(x, s, z, bits)


def np_groups(x, g, bits):
    """Symmetric per-group (along the last axis) min-max fake quant."""
    v = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    s, _ = np_minmax(v, -1, bits, symmetric=True)
    return np_fq(v, s, None, bits, symmetric=True).reshape(x.shape)


def np_gptq(w, x, bits, damp=0.01, act_order=False):
    """GPTQ column by column (no lazy batching), float64."""
    w = w.astype(np.float64).copy()
    h = 2 * x.T.astype(np.float64) @ x.astype(np.float64) / x.shape[0]
    s, z = np_minmax(w, 1, bits)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = np_fq(w[:, i:i + 1], s, z, bits)[:, 0]
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    return q[:, np.argsort(perm)]


def mostly_close(a, b, rtol, frac=0.01):
    """All but ``frac`` of the elements within rtol * max|b| (a rounding flip moves a few)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    bad = np.abs(a - b) > rtol * np.abs(b).max()
    return bad.mean() <= frac


def out_mse(layer, x, kernel, bias=None):
    y0 = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + (0 if bias is None else bias)
    return float(np.mean((np.asarray(layer(jnp.asarray(x)), np.float64) - y0) ** 2))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(128, 48)).astype(np.float32) * 0.1
    b = rng.normal(size=(48,)).astype(np.float32)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    return k, b, x


# ------------------------------------------------------------------------------------------ interface
def test_registry_and_configs(tmp_path):
    ours = ("gptq", "qarvd", "rtn", "smoothquant", "svdquant", "vidit-q")
    assert set(ours) <= set(methods.available()) and list(methods.available()) == sorted(methods.available())
    with pytest.raises(ValueError, match="unknown quantization method 'awq'; available: ") as err:
        methods.get("awq")
    assert all(n in str(err.value) for n in methods.available())
    for name in methods.available():  # discovered from the files: each module names itself the same
        m = methods.get(name)
        assert m.NAME == name and callable(m.quantize_layer) and callable(m.quantize_model) and hasattr(m, "Config")
    for name in ours:
        m = methods.get(name)
        cfg = m.Config()
        assert isinstance(cfg.w_bits, int) and (cfg.a_bits is None or isinstance(cfg.a_bits, int))
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.w_bits = 3
        loaded = methods.load_method_config(name, f"configs/methods/{m.NAME}.yaml", ["w_bits=6", "a_bits=null"])
        assert loaded == dataclasses.replace(cfg, w_bits=6, a_bits=None)
    assert methods.get("svdquant").Config().rank == 32 and methods.get("smoothquant").Config().alpha == 0.5
    g = methods.get("gptq").Config()
    assert (g.damp, g.block_size, g.act_order) == (0.01, 128, False)


@pytest.mark.parametrize("name", ["rtn", "smoothquant", "gptq", "vidit-q", "svdquant", "qarvd"])
def test_layer_is_pure_and_jittable(name, data):
    k, b, x = data
    m = methods.get(name)
    cfg = m.Config(w_bits=4, a_bits=8)
    if name == "qarvd":
        cfg = cfg.replace(iters=20, align=8)
    layer = m.quantize_layer(k, b, x[:256], cfg)
    y1 = layer(jnp.asarray(x[:16]))
    y2 = jax.jit(lambda lyr, v: lyr(v))(layer, jnp.asarray(x[:16]))
    assert y1.shape == (16, 48) and mostly_close(y1, y2, 1e-5)
    # quantized, yet close to the full-precision layer
    y0 = x[:16] @ k + b
    assert 0 < np.mean((np.asarray(y1) - y0) ** 2) < 0.05 * np.var(y0)


# ------------------------------------------------------------------------------------- references
def test_rtn_matches_numpy(data):
    k, b, x = data
    m = methods.get("rtn")
    layer = m.quantize_layer(k, b, x, m.Config(w_bits=4, a_bits=8))
    want = np_rtn_act(x[:64], 8, x) @ np_rtn_weight(k.T.astype(np.float64), 4).T + b
    assert mostly_close(layer(jnp.asarray(x[:64])), want, 1e-4)
    s, z = np_minmax(k.T.astype(np.float64), 1, 4)
    np.testing.assert_allclose(layer.state["w_scale"], s[:, 0], rtol=1e-5)
    assert np.mean(np.asarray(layer.state["w_zero"]) != z[:, 0]) < 0.05
    # per-token dynamic option: each token its own min-max, no calibration data needed
    dyn = m.quantize_layer(k, None, None, m.Config(w_bits=8, a_bits=4, act_dynamic=True))
    xs, zs = np_minmax(x[:8].astype(np.float64), 1, 4)
    want = np_fq(x[:8], xs, zs, 4) @ np_rtn_weight(k.T.astype(np.float64), 8).T
    assert mostly_close(dyn(jnp.asarray(x[:8])), want, 1e-4)


def test_smoothquant_matches_numpy(data):
    k, b, x = data
    m = methods.get("smoothquant")
    layer = m.quantize_layer(k, b, x, m.Config(w_bits=8, a_bits=8))
    xa, wa = np.abs(x).max(0).astype(np.float64), np.abs(k).max(1).astype(np.float64)
    s = np.sqrt(xa) / np.sqrt(wa)
    np.testing.assert_allclose(layer.state["smooth"], s, rtol=1e-5)
    # alpha = 0.5 balances the channel maxima exactly
    np.testing.assert_allclose(xa / s, wa * s, rtol=1e-5)
    ws = (k.T * s[None, :]).astype(np.float64)
    want = np_rtn_act(x[:64] / s, 8, x / s) @ np_rtn_weight(ws, 8).T + b
    assert mostly_close(layer(jnp.asarray(x[:64])), want, 1e-4)
    # without quantization the smoothing is an identity: x/s (W s)^T = x W^T
    np.testing.assert_allclose((x[:8] / s) @ ws.T, x[:8] @ k, rtol=1e-4, atol=1e-5)
    other = m.quantize_layer(k, b, x, m.Config(alpha=0.8))
    np.testing.assert_allclose(other.state["smooth"], xa ** 0.8 / wa ** 0.2, rtol=1e-5)


@pytest.mark.parametrize("act_order,block", [(False, 128), (False, 16), (True, 32)])
def test_gptq_matches_numpy(act_order, block):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1024, 8))
    x = (base @ rng.normal(size=(8, 64)) + 0.3 * rng.normal(size=(1024, 64))) * rng.uniform(0.2, 3, 64)
    x = x.astype(np.float32)
    k = (rng.normal(size=(64, 24)) * 0.1).astype(np.float32)
    m = methods.get("gptq")
    layer = m.quantize_layer(k, None, x, m.Config(w_bits=4, a_bits=None, block_size=block, act_order=act_order))
    want = np_gptq(k.T, x, 4, act_order=act_order)
    s, z = np_minmax(k.T.astype(np.float64), 1, 4)
    codes = np.round(np.asarray(layer.kernel.T, np.float64) / s) + z
    want_codes = np.round(want / s) + z
    # error feedback makes a flip propagate along a row, so compare codes row-wise loosely
    assert np.mean(codes != want_codes) < 0.02
    assert np.all((codes >= 0) & (codes <= 15))


def test_gptq_equals_rtn_for_white_inputs():
    rng = np.random.default_rng(2)
    x = (np.linalg.qr(rng.normal(size=(256, 32)))[0] * 16).astype(np.float32)  # X^T X = 256 I
    k = (rng.normal(size=(32, 16)) * 0.1).astype(np.float32)
    g = methods.get("gptq").quantize_layer(k, None, x, methods.get("gptq").Config(w_bits=4, damp=0.0))
    r = methods.get("rtn").quantize_layer(k, None, None, methods.get("rtn").Config(w_bits=4, a_bits=None))
    rtn_w = np.asarray(jax.jit(lambda lyr: lyr(jnp.eye(32)))(r))
    assert np.mean(np.abs(np.asarray(g.kernel) - rtn_w) > 1e-5) < 0.01


def np_vidit(k, x, steps, alpha, wbits, abits, t, xin):
    rows = np.abs(x[steps == t]).max(0).astype(np.float64)
    lam = rows ** alpha / np.abs(k).max(1).astype(np.float64) ** (1 - alpha)
    wq = np_rtn_weight(k.T * lam[None, :], wbits)
    xs = xin / lam
    s, z = np_minmax(xs, 1, abits)
    return np_fq(xs, s, z, abits) @ wq.T


def test_vidit_q_matches_numpy_per_step(data):
    k, _, x = data
    steps = np.repeat(np.arange(4), 128).astype(np.int32)
    x = x * np.where(steps[:, None] == 2, 5.0, 1.0).astype(np.float32)  # pass 2 has other channel maxima
    m = methods.get("vidit-q")
    layer = m.quantize_layer(k, None, x, m.Config(w_bits=8, a_bits=8, alpha=0.5), steps=steps)
    assert layer.state["smooth"].shape == (4, 128)
    for t in (0, 2):
        want = np_vidit(k, x, steps, 0.5, 8, 8, t, x[:16].astype(np.float64))
        assert mostly_close(layer(jnp.asarray(x[:16]), t), want, 1e-4)
    assert not np.allclose(layer(jnp.asarray(x[:16]), 0), layer(jnp.asarray(x[:16]), 2))
    flat = m.quantize_layer(k, None, x, m.Config(timestep_aware=False), steps=steps)
    assert flat.state["smooth"].shape == (1, 128)


def test_vidit_q_mixed_precision_budget():
    assign = methods.get("vidit-q").assign_mixed_precision
    errors = {"a": {4: 9.0, 6: 3.0, 8: 1.0}, "b": {4: 1.0, 6: 0.5, 8: 0.1}, "c": {4: 5.0, 6: 2.0, 8: 0.2}}
    sizes = {"a": 100, "b": 100, "c": 200}
    bits = assign(errors, sizes, (4, 6, 8), 6.0)
    avg = sum(bits[n] * sizes[n] for n in bits) / 400
    assert avg <= 6.0 and bits["a"] >= bits["b"]
    assert assign(errors, sizes, (4, 6, 8), 4.0) == {"a": 4, "b": 4, "c": 4}


def test_svdquant_matches_numpy(data):
    k, b, x = data
    m = methods.get("svdquant")
    layer = m.quantize_layer(k, b, x, m.Config(w_bits=4, a_bits=4, rank=8, lowrank_iters=3))
    st = {n: np.asarray(v, np.float64) for n, v in layer.state.items()}
    xs = x[:32].astype(np.float64) / st["smooth"]
    r = np.asarray(layer.kernel, np.float64).T
    want = np_groups(xs, 64, 4) @ np_groups(r, 64, 4).T + xs @ st["lr_down"] @ st["lr_up"] + b
    assert mostly_close(layer(jnp.asarray(x[:32])), want, 1e-4)
    # no-quant identity: x' (L1 L2)^T + x' R^T = x W^T
    np.testing.assert_allclose(xs @ (st["lr_down"] @ st["lr_up"] + r.T), x[:32] @ k, rtol=1e-3, atol=1e-4)
    # the branch is the Eckart-Young optimum of the smoothed weight
    ws = (k.T * np.asarray(layer.state["smooth"])[None, :]).astype(np.float64)
    down, up = m.lowrank(ws, 8)
    sv = np.linalg.svd(ws, compute_uv=False)
    np.testing.assert_allclose(np.sum((ws.T - np.asarray(down) @ np.asarray(up)) ** 2), np.sum(sv[8:] ** 2),
                               rtol=1e-3)
    assert len(m.smooth_candidates()) == 39 and (0.0, 0.0) in m.smooth_candidates()


# ------------------------------------------------------------------------------- planted: beat RTN
def test_smoothquant_beats_rtn_on_activation_outlier_channels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    x[:, [3, 40, 77, 100]] *= 60.0  # activation outlier channels
    k = (rng.normal(size=(128, 64)) * 0.1).astype(np.float32)
    rtn = methods.get("rtn").quantize_layer(k, None, x, methods.get("rtn").Config(w_bits=8, a_bits=8))
    sq = methods.get("smoothquant").quantize_layer(k, None, x, methods.get("smoothquant").Config(w_bits=8, a_bits=8))
    assert out_mse(sq, x, k) < 0.3 * out_mse(rtn, x, k)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1024, 6)) @ rng.normal(size=(6, 96)) + 0.05 * rng.normal(size=(1024, 96))).astype(np.float32)
    k = (rng.normal(size=(96, 32)) * 0.1).astype(np.float32)
    g = methods.get("gptq").quantize_layer(k, None, x, methods.get("gptq").Config(w_bits=4, a_bits=None))
    r = methods.get("rtn").quantize_layer(k, None, None, methods.get("rtn").Config(w_bits=4, a_bits=None))
    assert out_mse(g, x, k) < 0.3 * out_mse(r, x, k)


def test_svdquant_beats_rtn_at_w4a4_with_outliers():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    x[:, [5, 70]] *= 40.0
    k = (rng.normal(size=(128, 64)) * 0.1).astype(np.float32)
    k[[9, 90], :] *= 20.0  # weight outlier input rows too
    r = methods.get("rtn").quantize_layer(k, None, x, methods.get("rtn").Config(w_bits=4, a_bits=4, act_dynamic=True))
    s = methods.get("svdquant").quantize_layer(k, None, x, methods.get("svdquant").Config(lowrank_iters=5))
    assert out_mse(s, x, k) < 0.3 * out_mse(r, x, k)


def test_qarvd_beats_rtn_on_weight_outlier_channels():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    k = (rng.normal(size=(128, 64)) * 0.05).astype(np.float32)
    planted = np.arange(0, 128, 16)[:8]
    k[planted, :] *= 30.0  # 8 input channels with huge weight columns
    m = methods.get("qarvd")
    q = m.quantize_layer(k, None, x, m.Config(w_bits=4, a_bits=8, align=8, reconstruct=False))
    assert q.static.n_outlier == 8 and set(np.asarray(q.state["outlier_idx"]).tolist()) == set(planted.tolist())
    r = methods.get("rtn").quantize_layer(k, None, x, methods.get("rtn").Config(w_bits=4, a_bits=8))
    assert out_mse(q, x, k) < 0.3 * out_mse(r, x, k)
