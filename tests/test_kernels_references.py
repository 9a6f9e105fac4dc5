"""The jnp references against an independent float64 / int64 NumPy model,
so that a bug shared by a kernel and its reference cannot hide."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import testing
from kernels_pallas.quant_common import quantize_int8
from kernels_pallas.w4a16_matmul import w4a16_matmul_reference
from kernels_pallas.w4a8_matmul import w4a8_matmul_reference
from kernels_pallas.w8a8_matmul import w8a8_matmul_reference

CASES = [
    # (m, k, n, bits, act, n_outlier, per_token, w_signed)
    (33, 256, 128, 8, "int8", 0, False, True),
    (33, 256, 128, 8, "quantize", 64, True, True),
    (17, 512, 256, 8, "int8", 96, False, True),
    (33, 512, 128, 4, "int8", 32, True, True),
    (20, 512, 128, 4, "quantize", 0, False, False),
    (20, 512, 256, 4, "quantize", 96, False, False),
]


@pytest.mark.parametrize("m,k,n,bits,act,n_out,per_token,signed", CASES)
def test_int_references_vs_numpy(m, k, n, bits, act, n_out, per_token, signed):
  p = testing.random_problem(3, m, k, n, bits=bits, act=act, n_outlier=n_out,
                             per_token=per_token, w_signed=signed)
  ref = w8a8_matmul_reference if bits == 8 else w4a8_matmul_reference
  args = (p.x, p.w, p.w_scale, p.w_zero)
  acc = ref(*args, **p.kwargs(), accumulator_only=True)
  np.testing.assert_array_equal(np.asarray(acc), testing.numpy_int_accumulators(p))
  y = ref(*args, **p.kwargs(), out_dtype=jnp.float32)
  testing.assert_close_f32(y, testing.numpy_dequant_matmul(p))
  y_bf16 = ref(*args, **p.kwargs())
  assert y_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y_bf16.astype(jnp.float32)), np.asarray(y),
                             rtol=1e-2, atol=1e-2 * np.abs(np.asarray(y)).max())


@pytest.mark.parametrize("n_out,signed", [(0, True), (64, False)])
def test_w4a16_reference_vs_numpy(n_out, signed):
  p = testing.random_problem(4, 7, 512, 256, bits=4, act="bf16",
                             n_outlier=n_out, w_signed=signed)
  y = w4a16_matmul_reference(p.x, p.w, p.w_scale, p.w_zero, **p.kwargs(a16=True),
                             out_dtype=jnp.float32)
  expect = testing.numpy_dequant_matmul(p, a16=True)
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5,
                             atol=1e-5 * np.abs(expect).max())


def test_quantize_int8_matches_qarvd_uint8_grid():
  """Signed grid with z - 128 equals Q-ARVD's clamp(round(x/s) + z, 0, 255) - 128."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(64, 128)).astype(np.float32) * 4
  x[0, :4] = [0.5 * 0.03, 1.5 * 0.03, 1e6, -1e6]  # ties and saturation
  s, z = np.float32(0.03), 131
  q = np.asarray(quantize_int8(jnp.asarray(x), s, z - 128)).astype(np.int64)
  uint8_grid = np.clip(np.round(x * (np.float32(1) / s)) + z, 0, 255)
  np.testing.assert_array_equal(q, uint8_grid - 128)
