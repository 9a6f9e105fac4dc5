"""Flow-matching scheduler functions against the fixture tables and float64 formulas."""

import numpy as np
import pytest

from qarvd_jax.pipeline import scheduler as sch


@pytest.fixture(scope="module")
def kv(fixtures_dir):
    return dict(np.load(f"{fixtures_dir}/selfforcing_tiny/kv_inference.npz"))


def test_tables_bit_exact_with_torch(kv):
    t = sch.flow_match_tables(5.0, 1000)
    np.testing.assert_array_equal(t.timesteps, kv["scheduler_timesteps"])
    np.testing.assert_array_equal(t.sigmas, kv["scheduler_sigmas"])


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_tables_follow_the_shift_formula(shift):
    t = sch.flow_match_tables(shift, 1000)
    base = 1.0 - np.arange(1000) / 1000.0
    want = shift * base / (1 + (shift - 1) * base)
    np.testing.assert_allclose(t.sigmas, want, rtol=1e-6)
    np.testing.assert_allclose(t.timesteps, 1000 * want, rtol=1e-6)


def test_warped_steps(kv):
    t = sch.flow_match_tables(5.0)
    np.testing.assert_array_equal(sch.denoising_timesteps([1000, 750, 500, 250], t), kv["denoising_timesteps"])
    np.testing.assert_array_equal(sch.denoising_timesteps([1000, 500], t, warp=False), [1000.0, 500.0])
    assert sch.denoising_timesteps([0], t)[0] == 0.0  # the appended zero
    with pytest.raises(ValueError, match="must lie in"):
        sch.denoising_timesteps([1001], t)


def test_sigma_lookup_is_nearest_entry():
    t = sch.flow_match_tables(5.0)
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 1000, 50).astype(np.float32)
    idx = np.abs(t.timesteps[None, :] - q[:, None]).argmin(1)
    np.testing.assert_array_equal(np.asarray(sch.sigma_at(q, t)), t.sigmas[idx])


def test_add_noise_and_x0_roundtrip():
    t = sch.flow_match_tables(5.0)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((2, 3, 4, 2, 2)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    ts = np.array([[937.5] * 3, [625.0] * 3], np.float32)
    xt = np.asarray(sch.add_noise(x0, eps, ts, t))
    sig = np.asarray(sch.sigma_at(ts, t), np.float64)[..., None, None, None]
    np.testing.assert_allclose(xt, (1 - sig) * x0 + sig * eps, atol=1e-6)
    flow = eps - x0  # the exact velocity recovers x0
    np.testing.assert_allclose(np.asarray(sch.flow_to_x0(flow, xt, ts, t)), x0, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        sch.add_noise(x0, eps, ts[:1], t)
