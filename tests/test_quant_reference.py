"""float64 numpy references for the qarvd_jax.quant tests (imported by the other test_quant_* files),
written independently of the JAX code (full-size parameter expansion with np.repeat / expand_dims,
loops over candidates). The tests at the bottom check the references themselves on hand examples."""

from __future__ import annotations

import numpy as np

PERCENTILES = (0.999, 0.9999, 0.99999)


def np_expand(p, x_shape, granularity, axis=-1, group_size=None):
    """Broadcast compact parameters to the full input shape."""
    p = np.asarray(p, np.float64)
    nd = len(x_shape)
    if granularity == "per_tensor":
        return np.broadcast_to(p, x_shape)
    a = axis % nd
    if granularity == "per_channel":
        shape = [1] * nd
        shape[a] = x_shape[a]
        return np.broadcast_to(p.reshape(shape), x_shape)
    if granularity == "per_token":
        return np.broadcast_to(np.expand_dims(p, a), x_shape)
    if granularity == "per_group":
        return np.repeat(p, group_size, axis=a)
    raise ValueError(granularity)


def np_grid(bits, symmetric):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def np_fake_quant(x, scale, zp, bits, symmetric=False, granularity="per_tensor", axis=-1, group_size=None,
                  zmode="integer"):
    """x̂ in float64 with full-size expanded scale / zero point."""
    x = np.asarray(x, np.float64)
    s = np_expand(scale, x.shape, granularity, axis, group_size)
    z = 0.0 if symmetric else np_expand(zp, x.shape, granularity, axis, group_size)
    lo, hi = np_grid(bits, symmetric)
    if zmode == "integer":
        q = np.clip(np.round(x / s) + np.round(z), lo, hi)
        return (q - np.round(z)) * s
    q = np.clip(np.round(x / s + z), lo, hi)
    return (q - z) * s


def unambiguous(x, scale, zp, granularity="per_tensor", axis=-1, group_size=None, zmode="integer", tol=1e-5):
    """True where rounding x/Δ (or x/Δ + z) is not within ``tol`` of a .5 tie (float32 vs float64)."""
    x = np.asarray(x, np.float64)
    v = x / np_expand(scale, x.shape, granularity, axis, group_size)
    if zmode == "real" and zp is not None:
        v = v + np_expand(zp, x.shape, granularity, axis, group_size)
    return np.abs(np.abs(v - np.floor(v)) - 0.5) > tol


def np_params_from_range(lo, hi, bits, symmetric=False):
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if symmetric:
        return np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / (2 ** (bits - 1) - 1), 1e-8), None
    s = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
    return s, np.round(-lo / s)


def np_percentile_rows(rows, bits, percentiles=PERCENTILES, symmetric=False):
    """Exact-quantile MSE search, one independent choice per row of ``rows`` [G, M].

    Returns (index [G], scale [G], zp [G] or None, scores [P, G])."""
    rows = np.asarray(rows, np.float64)
    scores, params = [], []
    for p in percentiles:
        hi = np.quantile(rows, p, axis=1)
        lo = np.quantile(rows, 1 - p, axis=1)
        s, z = np_params_from_range(lo, hi, bits, symmetric)
        xq = np_fake_quant(rows, s[:, None], None if z is None else z[:, None], bits, symmetric, "per_tensor")
        scores.append(np.mean((rows - xq) ** 2, axis=1))
        params.append((s, z))
    scores = np.stack(scores)
    idx = np.argmin(scores, axis=0)
    g = np.arange(rows.shape[0])
    scale = np.stack([s for s, _ in params])[idx, g]
    zp = None if symmetric else np.stack([z for _, z in params])[idx, g]
    return idx, scale, zp, scores


def np_histogram_quantiles(values, levels, bins):
    """torch.histc-style histogram, CDF, searchsorted (left), bin centres; float64."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = v.min(), v.max()
    idx = np.clip(np.floor((v - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    cdf = np.cumsum(counts) / counts.sum()
    out = []
    for q in levels:
        k = int(np.searchsorted(cdf, q, side="left"))
        out.append(lo + (k + 0.5) * (hi - lo) / bins)
    return np.asarray(out)


def np_activation_init(samples, weights, bits, percentiles=PERCENTILES, bins=32768):
    """Per-tensor histogram percentile init with score (1/N) Σ_i ω_i mean((x_i - x̂_i)²).

    Returns (index, scale, zp, scores [P])."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    levels = [1 - p for p in percentiles] + list(percentiles)
    qs = np_histogram_quantiles(samples, levels, bins)
    P = len(percentiles)
    scores, params = [], []
    for k in range(P):
        s, z = np_params_from_range(qs[k], qs[P + k], bits)
        per = [np.mean((samples[i] - np_fake_quant(samples[i], s, z, bits)) ** 2) for i in range(n)]
        scores.append(np.sum(w * np.asarray(per)) / n)
        params.append((s, z))
    idx = int(np.argmin(scores))
    return idx, params[idx][0], params[idx][1], np.asarray(scores)


# --- checks of the references themselves -------------------------------------------------------

def test_reference_fake_quant_hand_example():
    # 2 bits asymmetric, Δ = 0.5, z = 1: grid {-0.5, 0, 0.5, 1.0}
    x = np.array([-2.0, -0.5, -0.2, 0.3, 0.9, 5.0])
    got = np_fake_quant(x, 0.5, 1.0, 2)
    np.testing.assert_array_equal(got, [-0.5, -0.5, 0.0, 0.5, 1.0, 1.0])


def test_reference_histogram_hand_example():
    # values 0..9, 10 bins over [0, 9]: value v lands in bin v (9 in the last bin); bin width 0.9
    q = np_histogram_quantiles(np.arange(10.0), [0.15, 0.85], bins=10)
    np.testing.assert_allclose(q, [1.5 * 0.9, 8.5 * 0.9])


def test_reference_expand_per_group():
    p = np.array([[1.0, 2.0], [3.0, 4.0]])
    full = np_expand(p, (2, 6), "per_group", axis=1, group_size=3)
    np.testing.assert_array_equal(full, [[1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4]])
