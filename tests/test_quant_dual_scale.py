"""Dual-scale quantized linear: numpy reference, bias once, lower error than single-scale on outliers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarvd_jax.quant import (DualScaleQuantParams, LinearQuantParams, QuantSpec, detect_outliers, dual_scale_linear,
                             init_dual_scale, init_linear_quant, make_split, quantized_linear, split_input,
                             split_weight)
from test_quant_reference import np_fake_quant

W_SPEC = QuantSpec.qarvd_weight(4)
A_SPEC = QuantSpec.qarvd_activation(8)
OUTLIERS = (5, 40, 41, 99, 150, 151, 200, 255)


def _layer(seed=0, out=64, inp=256, n_samples=5, tokens=96):
    """A linear layer with planted outlier input channels in both W (columns ×8) and X (channels ×10)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.02, size=(out, inp)).astype(np.float32)
    w[:, list(OUTLIERS)] *= 8.0
    b = rng.normal(scale=0.1, size=(out,)).astype(np.float32)
    x = rng.normal(size=(n_samples, tokens, inp)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 10.0
    return w, b, x


def _np_linear(x, w, b, wp, ap, w_bits=4, a_bits=8):
    """float64 Q(x) Q(W)^T + b with per-row weight and per-tensor activation parameters."""
    wq = np_fake_quant(w, np.asarray(wp.scale), np.asarray(wp.zero_point), w_bits, granularity="per_channel", axis=0)
    xq = np_fake_quant(x, np.asarray(ap.scale), np.asarray(ap.zero_point), a_bits)
    y = xq @ wq.T
    return y if b is None else y + b


def test_make_split_and_split_shapes():
    split = make_split([7, 2, 4], 10)
    np.testing.assert_array_equal(split.outlier, [7, 2, 4])
    np.testing.assert_array_equal(split.normal, [0, 1, 3, 5, 6, 8, 9])
    w = jnp.arange(30.0).reshape(3, 10)
    w_o, w_n = split_weight(w, split)
    np.testing.assert_array_equal(w_o, np.asarray(w)[:, [7, 2, 4]])
    np.testing.assert_array_equal(w_n, np.asarray(w)[:, [0, 1, 3, 5, 6, 8, 9]])
    x_o, x_n = split_input(jnp.ones((2, 5, 10)), split)
    assert x_o.shape == (2, 5, 3) and x_n.shape == (2, 5, 7)


@pytest.mark.parametrize("channels,match", [
    ([1, 1], "unique"), ([0, 10], r"\[0, 10\)"), ([-1], r"\[0, 10\)"), ([], "0 < len"),
    (list(range(10)), "0 < len"), ([[1, 2]], "1-D integer"), ([1.0], "1-D integer"),
])
def test_make_split_errors(channels, match):
    with pytest.raises(ValueError, match=match):
        make_split(channels, 10)


def test_shape_errors():
    split = make_split([1], 4)
    with pytest.raises(ValueError, match=r"W of shape \(3, 5\) does not have 4 input channels"):
        split_weight(jnp.zeros((3, 5)), split)
    with pytest.raises(ValueError, match=r"x of shape \(2, 3\) does not have 4"):
        split_input(jnp.zeros((2, 3)), split)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        quantized_linear(jnp.zeros((2, 4)), jnp.zeros((3, 4)), jnp.zeros(4))
    with pytest.raises(ValueError, match="x\\[..., in\\] and W\\[out, in\\]"):
        quantized_linear(jnp.zeros((2, 5)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="without w_spec"):
        quantized_linear(jnp.zeros((2, 4)), jnp.zeros((3, 4)), None,
                         LinearQuantParams(weight=init_linear_quant(jnp.ones((3, 4)), w_spec=W_SPEC,
                                                                    a_spec=A_SPEC).weight))


@pytest.fixture(scope="module")
def layer():
    """The planted-outlier layer, its split and both inits (computed once: compiles are the cost)."""
    w, b, x = _layer()
    det = detect_outliers(w, align=1)
    split = make_split(det.channels, w.shape[1])
    w_o, w_n, qp = init_dual_scale(jnp.asarray(w), split, jnp.asarray(x), w_spec=W_SPEC, a_spec=A_SPEC)
    single = init_linear_quant(jnp.asarray(w), jnp.asarray(x), w_spec=W_SPEC, a_spec=A_SPEC)
    return dict(w=w, b=b, x=x, det=det, split=split, w_o=w_o, w_n=w_n, qp=qp, single=single)


def _dual(layer, x, qp=None, dtype=jnp.float32):
    L = layer
    return dual_scale_linear(jnp.asarray(x, dtype), L["w_o"].astype(dtype), L["w_n"].astype(dtype),
                             jnp.asarray(L["b"], dtype), L["qp"] if qp is None else qp, L["split"],
                             w_spec=W_SPEC, a_spec=A_SPEC)


def test_unquantized_dual_scale_is_the_plain_linear_with_bias_once(layer):
    w, b, x = layer["w"], layer["b"], layer["x"]
    off = DualScaleQuantParams(LinearQuantParams(), LinearQuantParams())
    y = _dual(layer, x, off)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + b, rtol=1e-4, atol=1e-4)


def test_dual_scale_forward_matches_numpy(layer):
    w, b, x, qp, split = layer["w"], layer["b"], layer["x"], layer["qp"], layer["split"]
    assert set(layer["det"].channels.tolist()) == set(OUTLIERS)
    assert qp.outlier.weight.scale.shape == (64,) and qp.normal.weight.scale.shape == (64,)
    assert qp.outlier.act.scale.shape == () and qp.normal.act.scale.shape == ()
    y = _dual(layer, x)
    o, n = list(OUTLIERS), [c for c in range(w.shape[1]) if c not in OUTLIERS]
    want = _np_linear(x[..., o], w[:, o], b, qp.outlier.weight, qp.outlier.act) + \
        _np_linear(x[..., n], w[:, n], None, qp.normal.weight, qp.normal.act)
    np.testing.assert_allclose(y, want, atol=2e-3 * np.abs(want).max())
    # each group's params are the single-scale init applied to that group alone (ω ≡ 1)
    alone = init_linear_quant(jnp.asarray(w[:, n]), jnp.asarray(x[..., n]), w_spec=W_SPEC, a_spec=A_SPEC)
    np.testing.assert_array_equal(alone.weight.scale, qp.normal.weight.scale)
    np.testing.assert_array_equal(alone.act.scale, qp.normal.act.scale)
    # jit with the split as a traced pytree argument
    jitted = jax.jit(dual_scale_linear, static_argnames=("w_spec", "a_spec"))
    y_jit = jitted(jnp.asarray(x), layer["w_o"], layer["w_n"], jnp.asarray(b), qp, split, w_spec=W_SPEC,
                   a_spec=A_SPEC)
    np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)


def test_dual_scale_beats_single_scale_on_planted_outliers(layer):
    w, b = layer["w"], layer["b"]
    x_test = _layer(seed=1)[2]  # held-out inputs with the same outlier channels
    y_fp = x_test.astype(np.float64) @ w.T.astype(np.float64) + b
    y_single = quantized_linear(jnp.asarray(x_test), jnp.asarray(w), jnp.asarray(b), layer["single"],
                                w_spec=W_SPEC, a_spec=A_SPEC)
    y_dual = _dual(layer, x_test)
    err_single = np.mean((np.asarray(y_single) - y_fp) ** 2)
    err_dual = np.mean((np.asarray(y_dual) - y_fp) ** 2)
    assert err_dual < 0.5 * err_single, (err_dual, err_single)
    # the normal group gets a finer step than the single-scale quantizers
    assert np.all(np.asarray(layer["qp"].normal.weight.scale) < np.asarray(layer["single"].weight.scale))
    assert float(layer["qp"].normal.act.scale) < float(layer["single"].act.scale)


def test_bf16_operands_give_bf16_output(layer):
    y = _dual(layer, layer["x"], dtype=jnp.bfloat16)
    y32 = _dual(layer, layer["x"])
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max()))
