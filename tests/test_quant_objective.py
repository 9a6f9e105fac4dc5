"""Chunk weights and the reconstruction-loss reduction (summed over tokens, mean over samples × channels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarvd_jax.quant import chunk_sample_weights, chunk_weights, reconstruction_loss, sensitivity_from_errors

README_S = [0.5462, 0.1668, 0.1189, 0.0789, 0.0534, 0.0263, 0.0096]


def test_chunk_weights_match_the_spec_example():
    omega = chunk_weights(README_S)
    np.testing.assert_allclose(omega, [3.823, 1.168, 0.832, 0.552, 0.374, 0.184, 0.067], atol=6e-4)
    assert float(jnp.mean(omega)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(omega, 7 * np.asarray(README_S) / np.sum(README_S), rtol=1e-6)


def test_sensitivity_normalisation_is_scale_free():
    e = np.array([4.0, 2.0, 1.0, 1.0])
    s = sensitivity_from_errors(e)
    np.testing.assert_allclose(s, e / 8.0, rtol=1e-7)
    np.testing.assert_allclose(chunk_weights(s), chunk_weights(1e-3 * e), rtol=1e-6)
    np.testing.assert_allclose(chunk_weights(s), [2.0, 1.0, 0.5, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="1-D"):
        chunk_weights(np.ones((2, 3)))


def test_sample_weights_follow_chunk_ids():
    omega = chunk_weights(README_S)
    ids = np.repeat(np.arange(7), 5)  # 7 chunks × (4 steps + cache refresh)
    w = chunk_sample_weights(omega, ids)
    assert w.shape == (35,)
    np.testing.assert_array_equal(w[:5], np.full(5, omega[0]))
    np.testing.assert_array_equal(w[-5:], np.full(5, omega[6]))
    bad = chunk_sample_weights(omega, np.array([0, 7, -1]))  # no wrap-around or clamping
    assert np.isfinite(bad[0]) and np.isnan(bad[1]) and np.isnan(bad[2])
    with pytest.raises(ValueError, match="integer"):
        chunk_sample_weights(omega, np.array([0.0, 1.0]))


def test_reconstruction_loss_against_hand_computation():
    # B=2 samples, T=3 tokens, C=2 channels; errors chosen by hand
    y = np.zeros((2, 3, 2), np.float32)
    y_hat = np.array([[[1, 0], [2, 1], [0, 0]],
                      [[0, 3], [1, 0], [0, 1]]], np.float32)
    # Σ_t d²: sample 0 -> channel sums [1+4+0, 0+1+0] = [5, 1]; sample 1 -> [0+1+0, 9+0+1] = [1, 10]
    assert float(reconstruction_loss(y_hat, y)) == pytest.approx((5 + 1 + 1 + 10) / 4)
    omega = np.array([3.0, 0.5], np.float32)
    want = (3.0 * (5 + 1) + 0.5 * (1 + 10)) / 4  # mean over (sample, channel) of ω_i Σ_t d²
    assert float(reconstruction_loss(y_hat, y, omega)) == pytest.approx(want)
    # it is T times the mean over all elements (not a plain MSE) ...
    assert float(reconstruction_loss(y_hat, y)) == pytest.approx(3 * np.mean((y_hat - y) ** 2))
    # ... and a singleton axis between samples and tokens changes nothing (PyTorch [B, T, C] vs [B, 1, T, C])
    assert float(reconstruction_loss(y_hat[:, None], y[:, None], omega)) == pytest.approx(want)


def test_reconstruction_loss_dtype_grad_and_errors():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(4, 16, 8)).astype(np.float32)
    y_hat = y + 0.1 * rng.normal(size=y.shape).astype(np.float32)
    lb = reconstruction_loss(jnp.asarray(y_hat, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert lb.dtype == jnp.float32
    g = jax.grad(lambda a: reconstruction_loss(a, jnp.asarray(y), jnp.full((4,), 2.0)))(jnp.asarray(y_hat))
    np.testing.assert_allclose(g, 2.0 * 2.0 * (y_hat - y) / (4 * 8), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"sample_weights must have shape \(2,\)"):
        reconstruction_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="at least 2 axes"):
        reconstruction_loss(jnp.zeros(3), jnp.zeros(3))
