"""AdaRound: rectified sigmoid, V init, soft/hard weights, β schedule and regulariser, a small optimisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qarvd_jax.quant import (AdaRoundConfig, QuantSpec, beta_schedule, fake_quant, hard_weight, init_v,
                             percentile_mse_init, reconstruction_loss, rectified_sigmoid, rounding_loss,
                             rounding_regularizer, soft_weight)
from test_quant_reference import unambiguous

SPEC = QuantSpec.qarvd_weight(4)
CFG = AdaRoundConfig()


@pytest.fixture(scope="module")
def weight():
    """W[16, 64] with a few large entries so that the percentile clip leaves some weights clamped."""
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.05, size=(16, 64)).astype(np.float32)
    w[np.arange(16), rng.integers(0, 64, 16)] = 0.6
    params = percentile_mse_init(jnp.asarray(w), SPEC).params
    return w, params


def _np_grid(w, params):
    s = np.asarray(params.scale, np.float64)[:, None]
    z = np.asarray(params.zero_point, np.float64)[:, None]
    return w.astype(np.float64) / s, s, z


def test_rectified_sigmoid_values_and_gradient():
    v = jnp.asarray([-20.0, -3.0, 0.0, 3.0, 20.0])
    h = rectified_sigmoid(v)
    sig = 1 / (1 + np.exp(-np.asarray(v, np.float64)))
    want = np.clip(sig * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(h, want, atol=1e-6)
    assert float(h[2]) == pytest.approx(0.5) and float(h[0]) == 0.0 and float(h[4]) == 1.0
    g = jax.grad(lambda a: jnp.sum(rectified_sigmoid(a)))(v)
    np.testing.assert_allclose(g, np.where((want > 0) & (want < 1), 1.2 * sig * (1 - sig), 0.0), atol=1e-6)


def test_init_v_reproduces_fraction_and_soft_weight_starts_at_clamped_weight(weight):
    w, params = weight
    v = init_v(jnp.asarray(w), params, SPEC)
    u, s, z = _np_grid(w, params)
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(rectified_sigmoid(v), u - np.floor(u), atol=2e-5)
    soft = soft_weight(jnp.asarray(w), v, params, SPEC)
    want = (np.clip(u + z, 0, 15) - z) * s  # the clamped, unrounded weight
    clamped = (u + z < 0) | (u + z > 15)
    assert clamped.any() and (~clamped).mean() > 0.9
    np.testing.assert_allclose(soft, want, atol=1e-5 * np.abs(w).max())
    np.testing.assert_allclose(np.asarray(soft)[~clamped], w[~clamped], atol=1e-5 * np.abs(w).max())


def test_hard_weight_lies_on_the_grid_and_init_equals_nearest_rounding(weight):
    w, params = weight
    v = init_v(jnp.asarray(w), params, SPEC)
    hard = np.asarray(hard_weight(jnp.asarray(w), v, params, SPEC), np.float64)
    s, z = np.asarray(params.scale, np.float64)[:, None], np.asarray(params.zero_point, np.float64)[:, None]
    codes = hard / s + z
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() > -1e-4 and codes.max() < 15 + 1e-4
    # h(V_init) = frac, and V >= 0 <=> frac >= 1/2: the merge of the initial V is round-to-nearest
    rtn = np.asarray(fake_quant(jnp.asarray(w), params, SPEC))
    m = unambiguous(w, np.asarray(params.scale), None, "per_channel", axis=0)
    np.testing.assert_allclose(hard[m], rtn[m], atol=1e-6)
    # V -> +inf rounds every weight up, V -> -inf down (before clamping)
    u, s_, z_ = _np_grid(w, params)
    up = np.asarray(hard_weight(jnp.asarray(w), jnp.full(w.shape, 10.0), params, SPEC))
    down = np.asarray(hard_weight(jnp.asarray(w), jnp.full(w.shape, -10.0), params, SPEC))
    np.testing.assert_allclose(up, (np.clip(np.floor(u) + 1 + z_, 0, 15) - z_) * s_, atol=1e-6)
    np.testing.assert_allclose(down, (np.clip(np.floor(u) + z_, 0, 15) - z_) * s_, atol=1e-6)
    with pytest.raises(ValueError, match="V must have the weight's shape"):
        hard_weight(jnp.asarray(w), jnp.zeros((16, 63)), params, SPEC)


def test_soft_weight_gradient_in_v(weight):
    w, params = weight
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.normal(scale=2.0, size=w.shape), jnp.float32)
    g = jax.grad(lambda a: jnp.sum(soft_weight(jnp.asarray(w), a, params, SPEC)))(v)
    u, s, z = _np_grid(w, params)
    sig = 1 / (1 + np.exp(-np.asarray(v, np.float64)))
    h_raw = sig * 1.2 - 0.1
    h = np.clip(h_raw, 0, 1)
    q = np.floor(u) + h + z
    want = np.where((h_raw > 0) & (h_raw < 1) & (q >= 0) & (q <= 15), s * 1.2 * sig * (1 - sig), 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-8)
    assert np.sum(want == 0) > 0 and np.sum(want > 0) > 0


def test_beta_schedule_values():
    ts = [0, 399, 400, 1200, 2000]
    want = [20.0, 20.0, 20.0, 11.0, 2.0]
    np.testing.assert_allclose([float(beta_schedule(t)) for t in ts], want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(beta_schedule))(jnp.asarray(ts)), want, rtol=1e-6)
    assert CFG.warmup_iters == 400


def test_rounding_loss_warmup_and_value():
    rng = np.random.default_rng(2)
    v1 = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    v2 = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

    def np_reg(v, beta):
        h = np.clip(1.2 / (1 + np.exp(-np.asarray(v, np.float64))) - 0.1, 0, 1)
        return 0.01 * np.sum(1 - np.abs(2 * h - 1) ** beta)

    assert float(rounding_loss(v1, 1)) == 0.0
    assert float(rounding_loss(v1, 399)) == 0.0
    assert float(rounding_loss(v1, 400)) == pytest.approx(np_reg(v1, 20.0), rel=1e-5)
    assert float(rounding_loss(v1, 1200)) == pytest.approx(np_reg(v1, 11.0), rel=1e-5)
    assert float(rounding_loss(v1, 2000)) == pytest.approx(np_reg(v1, 2.0), rel=1e-5)
    # summed (not averaged) over every element of both submatrices of a dual-scale layer
    both = float(rounding_regularizer((v1, v2), 2.0))
    assert both == pytest.approx(np_reg(v1, 2.0) + np_reg(v2, 2.0), rel=1e-5)
    # fully hardened V gives zero regulariser
    assert float(rounding_regularizer(jnp.full((3, 3), 50.0), 2.0)) == 0.0


def test_adaround_beats_nearest_rounding_on_a_small_layer():
    """AdaRound's property: after hard rounding, the layer output error is at most RTN's."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(scale=0.1, size=(8, 32)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(16, 24, 32)) @ rng.normal(size=(32, 32)) / 4, jnp.float32)  # correlated inputs
    y = jnp.einsum("bti,oi->bto", x, w)
    spec = QuantSpec.qarvd_weight(3)
    params = percentile_mse_init(w, spec).params
    cfg = AdaRoundConfig(iters=400)
    opt = optax.adam(2e-2)

    def loss_fn(v, t):
        y_hat = jnp.einsum("bti,oi->bto", x, soft_weight(w, v, params, spec, cfg))
        return reconstruction_loss(y_hat, y) + rounding_loss(v, t, cfg)

    @jax.jit
    def train(v0):
        def step(carry, t):
            v, st = carry
            g = jax.grad(loss_fn)(v, t)
            upd, st = opt.update(g, st, v)
            return (optax.apply_updates(v, upd), st), None
        (v, _), _ = jax.lax.scan(step, (v0, opt.init(v0)), jnp.arange(1, cfg.iters + 1))
        return v

    v = train(init_v(w, params, spec, cfg))
    h = np.asarray(rectified_sigmoid(v, cfg))
    assert np.mean((h < 0.01) | (h > 0.99)) > 0.85, np.mean((h < 0.01) | (h > 0.99))  # mostly hardened
    err_ada = float(reconstruction_loss(jnp.einsum("bti,oi->bto", x, hard_weight(w, v, params, spec)), y))
    err_rtn = float(reconstruction_loss(jnp.einsum("bti,oi->bto", x, fake_quant(w, params, spec)), y))
    assert err_ada < 0.7 * err_rtn, (err_ada, err_rtn)
