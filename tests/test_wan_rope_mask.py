"""RoPE, timestep sinusoid and the block-causal mask against small numpy references."""

import numpy as np
import pytest

from qarvd_jax.models.wan.attention import block_causal_mask
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.rope import apply_rope, rope_cos_sin, sinusoidal_embedding


def _numpy_rope(x, grid, start_frame, head_dim, theta=10000.0):
    """Complex128 reference, written like the original (view_as_complex, per-axis ladders)."""
    d = head_dim
    c = d // 2
    def ladder(dim):
        return 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2] / dim)
    freqs = [ladder(d - 4 * (d // 6)), ladder(2 * (d // 6)), ladder(2 * (d // 6))]
    f, h, w = grid
    ff, hh, ww = np.meshgrid(np.arange(f) + start_frame, np.arange(h), np.arange(w), indexing="ij")
    ang = np.concatenate([ff.reshape(-1, 1) * freqs[0], hh.reshape(-1, 1) * freqs[1], ww.reshape(-1, 1) * freqs[2]], 1)
    assert ang.shape[1] == c
    b, l, nh, _ = x.shape
    xc = x.astype(np.float64).reshape(b, l, nh, c, 2)
    z = (xc[..., 0] + 1j * xc[..., 1]) * np.exp(1j * ang)[None, :, None, :]
    return np.stack([z.real, z.imag], -1).reshape(x.shape)


@pytest.mark.parametrize("head_dim,split", [(16, (4, 2, 2)), (32, (6, 5, 5)), (128, (22, 21, 21)), (12, (2, 2, 2))])
def test_rope_split_and_values(head_dim, split):
    cfg = WanDiTConfig.tiny(dim=head_dim * 2, num_heads=2)
    assert cfg.rope_split() == split
    rng = np.random.default_rng(0)
    grid = (3, 2, 5)
    x = rng.standard_normal((2, 30, 2, head_dim)).astype(np.float32)
    for start in (0, 7):
        cos, sin = rope_cos_sin(grid, start, head_dim)
        got = np.asarray(apply_rope(x, cos, sin))
        np.testing.assert_allclose(got, _numpy_rope(x, grid, start, head_dim), atol=2e-6, rtol=0)


def test_rope_rejects_mismatched_tables():
    cos, sin = rope_cos_sin((1, 2, 2), 0, 16)
    with pytest.raises(ValueError, match="RoPE tables"):
        apply_rope(np.zeros((1, 5, 2, 16), np.float32), cos, sin)


def test_sinusoid_matches_float64():
    rng = np.random.default_rng(1)
    t = np.concatenate([[0.0, 1.0, 4.975, 625.0, 833.3333129882812, 937.5, 999.9, 1000.0],
                        rng.uniform(0, 1000, 64), rng.uniform(0, 60000, 16)]).astype(np.float32)
    half = 128
    omega = np.power(10000.0, -np.arange(half) / half)
    ang = t.astype(np.float64)[:, None] * omega
    want = np.concatenate([np.cos(ang), np.sin(ang)], 1)
    got = np.asarray(sinusoidal_embedding(t, 256))
    assert np.abs(got - want).max() < 1e-6  # float64 accuracy, cos first


def _mask_loops(nf, fsl, nfb, window):
    L = nf * fsl
    m = np.zeros((L, L), bool)
    for q in range(L):
        c = (q // fsl) // nfb
        for k in range(L):
            fk = k // fsl
            ok = fk < (c + 1) * nfb
            if window != -1:
                ok = ok and fk >= (c + 1) * nfb - window
            m[q, k] = ok or q == k
    return m


@pytest.mark.parametrize("nf,fsl,nfb,window", [(6, 4, 3, -1), (7, 3, 2, -1), (6, 2, 3, 4), (8, 2, 2, 3), (5, 1, 1, 2)])
def test_block_causal_mask(nf, fsl, nfb, window):
    np.testing.assert_array_equal(block_causal_mask(nf, fsl, nfb, window), _mask_loops(nf, fsl, nfb, window))


def test_mask_matches_fixture(fixtures_dir):
    f = np.load(f"{fixtures_dir}/selfforcing_tiny/forward.npz")
    np.testing.assert_array_equal(block_causal_mask(6, 16, 3, -1), f["attn_mask"])


@pytest.mark.parametrize("name", ["blockwise", "xla"])
def test_attention_implementations_match_reference(name):
    import jax.numpy as jnp

    from qarvd_jax.models.wan.attention import get_attention, reference_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 40, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 300, 3, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 300, 3, 16)), jnp.float32)
    fn = get_attention(name)
    kw = {"block_k": 64} if name == "blockwise" else {}
    mask = jnp.asarray(rng.random((40, 300)) < 0.7).at[:, 0].set(True)
    for args in ({}, {"kv_len": jnp.int32(131)}, {"mask": mask}, {"mask": mask, "kv_len": jnp.int32(200)}):
        want = np.asarray(reference_attention(q, k, v, **args))
        np.testing.assert_allclose(np.asarray(fn(q, k, v, **args, **kw)), want, atol=2e-6, rtol=0)
