"""The rotated W4A4 / W4A8 Pallas TPU kernel (DVD-Quant): kernel == its jnp reference (exact int32
accumulators, float32 epilogue within rounding), reference == the integer form from before the codes were
packed, at A4 and A8, odd M, several M / N / K tiles; the shape fallback of DVDIntLinear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import pack_int4, unpack_int4
from kernels_pallas.rotated_w4a4_matmul import rotated_kernel_ok, rotated_w4a4_matmul, rotated_w4a4_matmul_reference
from qarvd_jax.quant.methods import dvd_quant as dq

EPS32 = float(np.finfo(np.float32).eps)


def _problem(seed, m, k, n, blk=128, bias=True):
    rng = np.random.default_rng(seed)
    xr = (rng.normal(size=(m, k)) * np.exp(rng.normal(size=k))).astype(np.float32)
    xr[:, 3] *= 30.0  # an outlier channel
    lam = np.repeat(np.abs(rng.normal(size=k // blk)) + 0.5, blk).astype(np.float32)
    q_w = rng.integers(0, 16, size=(n, k))
    z_w = rng.integers(0, 16, size=n)
    colsum = (q_w - z_w[:, None]).reshape(n, k // blk, blk).sum(2).T.astype(np.int32)
    return dict(xr=jnp.asarray(xr), lam=jnp.asarray(lam), w_packed=pack_int4(jnp.asarray(q_w), signed=False),
                w_zero=jnp.asarray(z_w, jnp.int8), w_scale=jnp.asarray(rng.uniform(0.01, 0.1, n), jnp.float32),
                colsum=jnp.asarray(colsum),
                bias=jnp.asarray(rng.normal(size=n), jnp.float32) if bias else None), dict(lam_block=blk)


CASES = [  # (m, k, n, blk, block_m, block_n, interpret)
    (13, 512, 256, 128, None, 128, True),  # odd M, one M tile; 2 N tiles, 2 K steps
    (77, 256, 128, 128, 32, None, pltpu.InterpretParams()),  # odd M over 3 M tiles (last partial)
    (40, 1024, 128, 256, None, None, True),  # Λ-block 256, 2 K steps
]


@pytest.mark.parametrize("high", [False, True], ids=["A4", "A8"])
@pytest.mark.parametrize("m,k,n,blk,bm,bn,interp", CASES)
def test_kernel_equals_reference(high, m, k, n, blk, bm, bn, interp):
    args, kw = _problem(m + k, m, k, n, blk)
    ref = lambda **o: np.asarray(rotated_w4a4_matmul_reference(**args, **kw, high=high, **o))
    pal = lambda **o: np.asarray(rotated_w4a4_matmul(**args, **kw, high=high, backend="pallas_tpu", interpret=interp,
                                                     block_m=bm, block_n=bn, **o))
    acc_ref, acc_pal = ref(accumulator_only=True), pal(accumulator_only=True)
    assert acc_pal.dtype == np.int32 and acc_pal.shape == (k // blk, m, n)
    np.testing.assert_array_equal(acc_pal, acc_ref)  # exact int32 accumulators
    y_ref, y_pal = ref(), pal()
    mag = np.abs(y_ref).max()
    assert np.max(np.abs(y_pal - y_ref)) <= 8 * (k // blk) * EPS32 * mag  # float epilogue: order only


def _old_integer_apply(layer, x, high):
    """The integer path as it was with unpacked int8 codes (q_w - z_w, one per byte): the oracle."""
    st = layer.static
    w = jnp.asarray(layer.kernel, jnp.float32).T
    z = layer.state["w_zero"]
    codes = (jnp.clip(jnp.round(w / layer.state["w_scale"][:, None]) + z[:, None], 0, 15) - z[:, None])
    codes = codes.astype(jnp.int8)
    xr = dq.rotate(x, layer.state["signs"], st.rot_block).reshape(-1, x.shape[-1])
    k, blk = xr.shape[-1], st.lam_block
    lam = dq.channel_scale(xr, blk)
    b = jnp.where(high, st.a_bits_high, st.a_bits).astype(jnp.float32)
    levels = 2.0 ** b - 1
    u = xr / lam
    lo, hi = jnp.min(u, -1, keepdims=True), jnp.max(u, -1, keepdims=True)
    s_t = jnp.maximum((hi - lo) / levels, 1e-8)
    z_t = jnp.round(-lo / s_t)
    q = jnp.clip(jnp.round(u / s_t) + z_t, 0, levels)
    c = 2.0 ** (b - 1)
    qs = (q - c).astype(jnp.int8).reshape(-1, k // blk, blk)
    wc = codes.reshape(-1, k // blk, blk)
    colsum = jnp.sum(wc.astype(jnp.int32), axis=2).T
    p = jax.lax.dot_general(qs, wc, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)
    p = p + (c - z_t).astype(jnp.int32)[None] * colsum[:, None, :]
    y = jnp.einsum("b,bto->to", lam.reshape(-1, blk)[:, 0], p.astype(jnp.float32)) * s_t * layer.state["w_scale"]
    return y + layer.bias


@pytest.mark.parametrize("lam_block", [1, 128])
def test_packed_reference_equals_the_unpacked_integer_form(lam_block):
    rng = np.random.default_rng(3)
    k, n = 256, 128
    kernel = rng.normal(size=(k, n)).astype(np.float32)
    layer = dq.quantize_layer(kernel, rng.normal(size=n).astype(np.float32), None,
                              dq.Config(lambda_block=lam_block, bgr_init_steps=4, bgr_max_iters=5))
    arrays = dq.integer_form(layer)
    x = jnp.asarray((rng.normal(size=(21, k)) * np.exp(rng.normal(size=k))).astype(np.float32))
    apply = jax.jit(dq.integer_apply, static_argnums=1, static_argnames=("backend", "interpret"))
    for high in (False, True):
        old = np.asarray(_old_integer_apply(layer, x, jnp.asarray(high)))
        new = np.asarray(apply(arrays, layer.static, x, jnp.asarray(high)))
        np.testing.assert_allclose(new, old, rtol=0, atol=4 * EPS32 * np.abs(old).max())
        if lam_block == 128:  # the kernel takes these shapes
            pal = np.asarray(apply(arrays, layer.static, x, jnp.asarray(high), backend="pallas_tpu", interpret=True))
            np.testing.assert_allclose(pal, old, rtol=0, atol=16 * EPS32 * np.abs(old).max())


def test_pack_round_trip_of_the_export_codes():
    rng = np.random.default_rng(4)
    layer = dq.quantize_layer(rng.normal(size=(256, 128)).astype(np.float32), None, None,
                              dq.Config(bgr_init_steps=2, bgr_max_iters=2))
    arrays = dq.integer_form(layer)
    w = jnp.asarray(layer.kernel, jnp.float32).T
    z = layer.state["w_zero"]
    q = np.asarray(jnp.clip(jnp.round(w / layer.state["w_scale"][:, None]) + z[:, None], 0, 15)).astype(np.int64)
    assert arrays["w_packed"].dtype == jnp.uint8 and arrays["w_packed"].shape == (128, 128)
    np.testing.assert_array_equal(np.asarray(unpack_int4(arrays["w_packed"], signed=False)), q)  # exact
    np.testing.assert_array_equal(np.asarray(arrays["w_zero"]), np.asarray(z).astype(np.int64))


def test_shape_fallback_and_labels():
    assert rotated_kernel_ok(512, 256, 128) and not rotated_kernel_ok(384, 256, 128)
    assert not rotated_kernel_ok(512, 96, 128) and not rotated_kernel_ok(512, 256, 1)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(7, 384)).astype(np.float32))
    for k, n, blk, label in ((384, 128, 128, "xla (shape fallback)"), (256, 128, 1, "xla (shape fallback)"),
                             (256, 128, 128, "pallas_tpu")):
        layer = dq.quantize_layer(rng.normal(size=(k, n)).astype(np.float32), None, None,
                                  dq.Config(lambda_block=blk, bgr_init_steps=2, bgr_max_iters=2))
        arrays = {a: np.asarray(v) for a, v in dq.integer_form(layer).items() if v is not None}
        info = {"static": dq.base.static_to_dict(layer.static), "in_features": k, "out_features": n, "path": ["t"]}
        pal = dq.DVDIntLinear(arrays, info, backend="pallas", interpret=True)
        xla = dq.DVDIntLinear(arrays, info, backend="xla")
        assert pal.backend_label == label and xla.backend_label == "xla (dvd-quant)"
        a, b = np.asarray(pal(x[:, :k])), np.asarray(xla(x[:, :k]))
        np.testing.assert_allclose(a, b, rtol=0, atol=16 * EPS32 * np.abs(b).max())
    with pytest.raises(ValueError, match="needs a TPU"):
        dq.DVDIntLinear(arrays, info, backend="pallas")  # CPU without interpret


def test_unpacked_export_is_a_clear_error():
    arrays = {"w_codes": np.zeros((128, 256), np.int8), "w_scale": np.ones(128, np.float32),
              "colsum": np.zeros((2, 128), np.int32), "signs": np.ones(256, np.float32)}
    info = {"static": {}, "in_features": 256, "out_features": 128, "path": ["blocks", 0, "ffn", "layers", 0]}
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.layers\.0: an unpacked dvd-quant export.*qarvd export"):
        dq.DVDIntLinear(arrays, info)
