"""W4A16 (decode) kernels vs the reference: bf16 products are exact, so only
the float32 accumulation order differs."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import testing
from kernels_pallas.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference


def check(p, backends, **blocks):
  args = (p.x, p.w, p.w_scale, p.w_zero)
  kw = p.kwargs(a16=True)
  ref = np.asarray(w4a16_matmul_reference(*args, **kw, out_dtype=jnp.float32))
  for backend in backends:
    y = w4a16_matmul(*args, **kw, out_dtype=jnp.float32, backend=backend,
                     interpret=True, **blocks)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max(), err_msg=backend)


@pytest.mark.parametrize("m,k,n,n_out,signed", [
    (1, 512, 256, 0, True),
    (5, 1024, 384, 96, False),
    (77, 512, 256, 64, True),
])
def test_w4a16_tpu_and_xla(m, k, n, n_out, signed):
  p = testing.random_problem(m + k, m, k, n, bits=4, act="bf16",
                             n_outlier=n_out, w_signed=signed)
  check(p, ["pallas_tpu", "xla"], block_m=64, block_k=256)


def test_w4a16_wan_width_default_tiles():
  p = testing.random_problem(31, 8, 1536, 8960, bits=4, act="bf16")
  check(p, ["pallas_tpu"])


@pytest.mark.parametrize("x_dtype,n_out", [(jnp.bfloat16, 32), (jnp.float32, 0)])
def test_w4a16_gpu_interpret(x_dtype, n_out):
  p = testing.random_problem(32, 3, 512, 128, bits=4, act="bf16",
                             n_outlier=n_out, x_dtype=x_dtype)
  check(p, ["pallas_gpu"])


def test_w4a16_default_out_dtype():
  p = testing.random_problem(33, 2, 256, 128, bits=4, act="bf16")
  y = w4a16_matmul(p.x, p.w, p.w_scale, p.w_zero, backend="pallas_tpu",
                   interpret=True)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 128)
