"""fake_quant: values vs a float64 numpy reference, STE/LSQ gradients vs closed forms, shapes/errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarvd_jax.quant import (QuantParams, QuantSpec, dequantize, fake_quant, group_reduce, lsq_grad_scale,
                             minmax_params, minmax_range, param_shape, params_from_range, quantize, scale_gradient)
from test_quant_reference import np_expand, np_fake_quant, np_grid, unambiguous

RNG = np.random.default_rng(0)

# (granularity, axis, group_size, input shape)
LAYOUTS = [
    ("per_tensor", -1, None, (6, 10)),
    ("per_channel", 0, None, (6, 10)),
    ("per_channel", -1, None, (3, 4, 5)),
    ("per_channel", 1, None, (3, 4, 5)),
    ("per_token", -1, None, (2, 3, 8)),
    ("per_token", 0, None, (4, 5)),
    ("per_group", -1, 4, (3, 12)),
    ("per_group", 0, 2, (6, 5)),
    ("per_group", 1, 3, (2, 6, 3)),
]


def _random_params(x_shape, spec):
    shp = param_shape(x_shape, spec)
    scale = RNG.uniform(0.05, 0.3, size=shp).astype(np.float32)
    zp = None if spec.symmetric else RNG.integers(0, 2**spec.bits, size=shp).astype(np.float32)
    if not spec.symmetric and spec.zero_point_mode == "real":
        zp = zp + RNG.uniform(-0.5, 0.5, size=shp).astype(np.float32)
    return QuantParams(jnp.asarray(scale), None if zp is None else jnp.asarray(zp))


def _reference(x, params, spec):
    zp = None if params.zero_point is None else np.asarray(params.zero_point)
    return np_fake_quant(x, np.asarray(params.scale), zp, spec.bits, spec.symmetric, spec.granularity,
                         spec.axis, spec.group_size, spec.zero_point_mode)


def _mask(x, params, spec):
    zp = None if params.zero_point is None else np.asarray(params.zero_point)
    return unambiguous(x, np.asarray(params.scale), zp, spec.granularity, spec.axis, spec.group_size,
                       spec.zero_point_mode)


@pytest.mark.parametrize("gran,axis,gs,shape", LAYOUTS)
@pytest.mark.parametrize("bits,symmetric,zmode", [(2, False, "integer"), (4, True, "integer"),
                                                  (8, False, "integer"), (3, False, "real")])
def test_fake_quant_matches_numpy(gran, axis, gs, shape, bits, symmetric, zmode):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, axis=axis, group_size=gs,
                     zero_point_mode=zmode)
    x = RNG.normal(scale=2.0, size=shape).astype(np.float32)
    params = _random_params(shape, spec)
    got = np.asarray(fake_quant(jnp.asarray(x), params, spec), np.float64)
    want = _reference(x, params, spec)
    m = _mask(x, params, spec)
    assert m.mean() > 0.95  # only genuine float32/float64 near-ties are excluded
    np.testing.assert_allclose(got[m], want[m], rtol=1e-6, atol=1e-6)
    # every output lies on the group's grid
    s = np_expand(np.asarray(params.scale), shape, gran, axis, gs)
    z = 0.0 if symmetric else np_expand(np.asarray(params.zero_point), shape, gran, axis, gs)
    codes = got / s + (np.round(z) if zmode == "integer" else z)
    lo, hi = np_grid(bits, symmetric)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= lo - 1e-3 and codes.max() <= hi + 1e-3


def test_quantize_dequantize_roundtrip_and_codes():
    spec = QuantSpec(bits=4, granularity="per_group", axis=-1, group_size=4)
    x = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)
    params = _random_params(x.shape, spec)
    q = quantize(x, params, spec)
    assert q.dtype == jnp.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    np.testing.assert_allclose(dequantize(q, params, spec), fake_quant(x, params, spec), rtol=1e-6, atol=1e-7)


def test_bf16_input_computed_in_float32_returned_in_bf16():
    spec = QuantSpec(bits=8, granularity="per_channel", axis=0)
    x32 = RNG.normal(size=(4, 16)).astype(np.float32)
    xb = jnp.asarray(x32, jnp.bfloat16)
    params = minmax_params(xb, spec)
    out = fake_quant(xb, params, spec)
    assert out.dtype == jnp.bfloat16
    ref = fake_quant(xb.astype(jnp.float32), params, spec).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_jit_with_static_spec_matches_eager():
    spec = QuantSpec(bits=4, granularity="per_token")
    x = jnp.asarray(RNG.normal(size=(2, 3, 8)), jnp.float32)
    params = minmax_params(x, spec)
    jitted = jax.jit(fake_quant, static_argnames="spec")
    np.testing.assert_array_equal(jitted(x, params, spec=spec), fake_quant(x, params, spec))


# --- ranges -----------------------------------------------------------------------------------

def test_minmax_and_params_from_range_match_numpy():
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    x = RNG.normal(size=(5, 9)).astype(np.float32)
    lo, hi = minmax_range(x, spec)
    np.testing.assert_array_equal(lo, x.min(1))
    np.testing.assert_array_equal(hi, x.max(1))
    p = minmax_params(x, spec)
    s = (x.max(1).astype(np.float64) - x.min(1)) / 15
    np.testing.assert_allclose(p.scale, s, rtol=1e-6)
    np.testing.assert_array_equal(p.zero_point, np.round(-x.min(1).astype(np.float64) / s))
    sym = params_from_range(jnp.asarray([-1.0, -3.0]), jnp.asarray([2.0, 1.0]), QuantSpec(bits=4, symmetric=True))
    np.testing.assert_allclose(sym.scale, [2.0 / 7, 3.0 / 7], rtol=1e-6)
    assert sym.zero_point is None
    real = params_from_range(-0.33, 1.0, QuantSpec(bits=2, zero_point_mode="real"))
    np.testing.assert_allclose(real.zero_point, 0.33 / (1.33 / 3), rtol=1e-6)  # not rounded
    degenerate = params_from_range(2.0, 2.0, QuantSpec(bits=8))
    assert float(degenerate.scale) == pytest.approx(1e-8)


def test_minmax_range_reconstructs_extremes():
    spec = QuantSpec(bits=8, granularity="per_channel", axis=0)
    x = jnp.asarray(RNG.normal(size=(3, 50)), jnp.float32)
    xq = fake_quant(x, minmax_params(x, spec), spec)
    s = np.asarray(minmax_params(x, spec).scale)
    assert np.all(np.abs(np.asarray(xq).max(1) - np.asarray(x).max(1)) <= s / 2 + 1e-6)
    assert np.all(np.abs(np.asarray(xq).min(1) - np.asarray(x).min(1)) <= s / 2 + 1e-6)


# --- gradients --------------------------------------------------------------------------------

def _grad_setup(spec, shape=(6, 10)):
    x = RNG.normal(scale=1.5, size=shape).astype(np.float32)
    # small steps and off-centre zero points so that many elements clamp on both sides
    shp = param_shape(shape, spec)
    scale = (RNG.uniform(2.0, 4.0, size=shp) / 2**spec.bits).astype(np.float32)
    zp = None
    if not spec.symmetric:
        zp = RNG.integers(1, 2**spec.bits - 1, size=shp).astype(np.float32)
        if spec.zero_point_mode == "real":
            zp = zp + np.float32(0.3)
    g = RNG.normal(size=shape).astype(np.float32)  # upstream cotangent
    return x, scale, zp, g


def _closed_form(x, scale, zp, g, spec):
    """d/dx, d/dΔ, d/dz of Σ g·x̂ (float64, LSQ / PyTorch clamp semantics), full-size before reduction."""
    s = np_expand(scale, x.shape, spec.granularity, spec.axis, spec.group_size)
    z = 0.0 if zp is None else np_expand(zp, x.shape, spec.granularity, spec.axis, spec.group_size)
    lo, hi = np_grid(spec.bits, spec.symmetric)
    xs = x.astype(np.float64) / s
    if spec.zero_point_mode == "integer":
        v = np.round(xs) + z
    else:
        v = np.round(xs + z)
    inside = (v >= lo) & (v <= hi)
    bound = np.where(v < lo, lo, hi)
    d_x = g * inside
    d_s = g * np.where(inside, v - z - xs, bound - z)
    d_z = g * np.where(inside, 0.0, -s)
    return d_x, d_s, d_z, inside


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, granularity="per_channel", axis=0),
    QuantSpec(bits=3, granularity="per_tensor", learnable_zero_point=True),
    QuantSpec(bits=4, granularity="per_group", axis=-1, group_size=5, learnable_zero_point=True),
    QuantSpec(bits=3, granularity="per_channel", axis=0, zero_point_mode="real", learnable_zero_point=True),
    QuantSpec(bits=3, symmetric=True, granularity="per_token"),
])
def test_ste_lsq_gradients_match_closed_form(spec):
    x, scale, zp, g = _grad_setup(spec)

    def loss(x_, s_, z_):
        return jnp.sum(jnp.asarray(g) * fake_quant(x_, QuantParams(s_, z_), spec))

    args = (jnp.asarray(x), jnp.asarray(scale), None if zp is None else jnp.asarray(zp))
    if zp is None:
        d_x, d_s = jax.grad(lambda a, b: loss(a, b, None), argnums=(0, 1))(*args[:2])
        d_z = None
    else:
        d_x, d_s, d_z = jax.grad(loss, argnums=(0, 1, 2))(*args)
    want_x, want_s_full, want_z_full, inside = _closed_form(x, scale, zp, g, spec)
    assert 0.1 < inside.mean() < 0.95  # both regimes are exercised
    np.testing.assert_allclose(np.asarray(d_x), want_x, atol=1e-6)
    # reduce the full-size closed forms to the compact parameter shape
    want_s = np.asarray(group_reduce(jnp.asarray(want_s_full, jnp.float32), spec, jnp.sum))
    np.testing.assert_allclose(d_s, want_s, rtol=1e-4, atol=1e-4)
    if zp is not None:
        want_z = np.asarray(group_reduce(jnp.asarray(want_z_full, jnp.float32), spec, jnp.sum))
        if not spec.learnable_zero_point:  # Q-ARVD: z is frozen
            want_z = np.zeros_like(want_z)
        np.testing.assert_allclose(d_z, want_z, rtol=1e-5, atol=1e-5)
        assert np.abs(want_z).max() > 0 or not spec.learnable_zero_point


def test_zero_point_has_no_gradient_by_default():
    spec = QuantSpec(bits=3, granularity="per_channel", axis=0)  # Q-ARVD: z frozen
    x, scale, zp, g = _grad_setup(spec)
    d_z = jax.grad(lambda z: jnp.sum(g * fake_quant(x, QuantParams(jnp.asarray(scale), z), spec)))(jnp.asarray(zp))
    np.testing.assert_array_equal(d_z, np.zeros_like(zp))


def test_clamp_gradient_zero_outside_range_and_one_inside():
    spec = QuantSpec(bits=2)  # grid {-0.5, 0, 0.5, 1.0} with Δ=0.5, z=1
    params = QuantParams(jnp.float32(0.5), jnp.float32(1.0))
    x = jnp.asarray([-3.0, -0.74, -0.5, 0.1, 1.0, 1.2, 4.0])
    d_x = jax.grad(lambda v: jnp.sum(fake_quant(v, params, spec)))(x)
    # q = round(x/Δ)+z: [-5, 0(-0.48->-1+1), 0, 1, 3, 3(2.4->2+1), 9] -> inside iff 0 <= q <= 3
    np.testing.assert_array_equal(d_x, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def test_scale_gradient_and_lsq_scale():
    spec = QuantSpec(bits=4)
    assert lsq_grad_scale(64, spec) == pytest.approx(1 / np.sqrt(64 * 15))
    f = lambda s: scale_gradient(s, 0.25) ** 2  # noqa: E731
    assert float(f(3.0)) == pytest.approx(9.0)
    assert float(jax.grad(f)(3.0)) == pytest.approx(0.25 * 6.0)
    with pytest.raises(ValueError):
        lsq_grad_scale(0, spec)


# --- shapes and errors ------------------------------------------------------------------------

def test_param_shapes():
    assert param_shape((6, 10), QuantSpec()) == ()
    assert param_shape((6, 10), QuantSpec(granularity="per_channel", axis=0)) == (6,)
    assert param_shape((2, 3, 8), QuantSpec(granularity="per_token")) == (2, 3)
    assert param_shape((2, 3, 8), QuantSpec(granularity="per_token", axis=1)) == (2, 8)
    assert param_shape((3, 12), QuantSpec(granularity="per_group", group_size=4)) == (3, 3)
    assert param_shape((8, 5), QuantSpec(granularity="per_group", axis=0, group_size=2)) == (4, 5)


@pytest.mark.parametrize("spec,shape,scale_shape,match", [
    (QuantSpec(granularity="per_channel", axis=0), (6, 10), (10,), r"shape \(10,\), expected \(6,\)"),
    (QuantSpec(granularity="per_channel", axis=0), (6, 10), (6, 1), r"expected \(6,\)"),
    (QuantSpec(granularity="per_token"), (2, 3, 8), (6,), r"expected \(2, 3\)"),
    (QuantSpec(granularity="per_group", group_size=4), (3, 12), (3, 4), r"expected \(3, 3\)"),
    (QuantSpec(granularity="per_group", group_size=5), (3, 12), (3, 2), "does not divide axis -1 \\(length 12\\)"),
    (QuantSpec(granularity="per_channel", axis=2), (6, 10), (6,), "axis=2 is out of range"),
    (QuantSpec(), (6, 10), (1,), r"expected \(\)"),
])
def test_bad_parameter_shapes_raise(spec, shape, scale_shape, match):
    x = jnp.zeros(shape)
    params = QuantParams(jnp.ones(scale_shape), jnp.zeros(scale_shape))
    with pytest.raises(ValueError, match=match):
        fake_quant(x, params, spec)


def test_zero_point_presence_is_checked():
    with pytest.raises(ValueError, match="symmetric QuantSpec takes QuantParams.zero_point=None"):
        fake_quant(jnp.ones(3), QuantParams(jnp.float32(1), jnp.float32(0)), QuantSpec(symmetric=True))
    with pytest.raises(ValueError, match="asymmetric QuantSpec needs"):
        fake_quant(jnp.ones(3), QuantParams(jnp.float32(1)), QuantSpec())


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits"), (dict(bits=17), "bits"), (dict(bits=4.0), "bits"),
    (dict(granularity="per_row"), "granularity"),
    (dict(granularity="per_group"), "group_size"),
    (dict(granularity="per_group", group_size=0), "group_size"),
    (dict(granularity="per_channel", group_size=4), "only valid with granularity='per_group'"),
    (dict(zero_point_mode="float"), "zero_point_mode"),
    (dict(symmetric=True, learnable_zero_point=True), "asymmetric"),
])
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_qarvd_presets_and_grid():
    w = QuantSpec.qarvd_weight(4)
    assert (w.granularity, w.axis, w.symmetric, w.qmin, w.qmax) == ("per_channel", 0, False, 0, 15)
    a = QuantSpec.qarvd_activation(8)
    assert (a.granularity, a.symmetric, a.qmin, a.qmax) == ("per_tensor", False, 0, 255)
    s = QuantSpec(bits=4, symmetric=True)
    assert (s.qmin, s.qmax) == (-8, 7)
    assert hash(w) != hash(a)  # usable as a static jit argument
