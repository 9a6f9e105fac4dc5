"""W8A8 kernels (Pallas TPU / Mosaic GPU in interpret mode, XLA) vs the
reference: exact int32 accumulators, float32-rounding-equal outputs."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import testing
from kernels_pallas.quant_common import weight_colsum
from kernels_pallas.w8a8_matmul import w8a8_matmul, w8a8_matmul_reference


check = functools.partial(testing.check_against_reference, w8a8_matmul, w8a8_matmul_reference)


CASES = [
    # (m, k, n, act, n_outlier, per_token); tiles 64 x 128 (x K 128).
    (77, 512, 256, "int8", 0, False),
    (200, 1024, 384, "quantize", 96, True),   # 200 = 3 * 64 + 8
    (130, 512, 256, "int8", 32, False),
    (64, 512, 256, "quantize", 160, False),   # a full outlier tile + straddle
    (96, 512, 128, "int8", 256, True),        # segment edge on a tile edge
]


@pytest.mark.parametrize("m,k,n,act,n_out,per_token", CASES)
def test_w8a8_tpu_and_xla(m, k, n, act, n_out, per_token):
  p = testing.random_problem(m + k + n_out, m, k, n, act=act, n_outlier=n_out,
                             per_token=per_token)
  check(p, ["pallas_tpu", "xla"], block_m=64, block_n=128, block_k=128)


@pytest.mark.parametrize("n", [1536, 8960])
def test_w8a8_wan_widths(n):
  p = testing.random_problem(n, 77, 256, n, act="quantize", n_outlier=64)
  check(p, ["pallas_tpu"], acc=False)


def test_w8a8_m4680_default_tiles():
  """Wan chunk: M = 4680 tokens (not a multiple of the 256-row tile)."""
  p = testing.random_problem(11, 4680, 1536, 1536, act="quantize", n_outlier=64)
  check(p, ["pallas_tpu"], acc=False)


def test_w8a8_tpu_interpret_params():
  """Full TPU interpreter (VMEM/DMA simulation, race detection)."""
  p = testing.random_problem(12, 77, 512, 256, act="quantize", n_outlier=96,
                             per_token=True)
  check(p, ["pallas_tpu"], interpret=pltpu.InterpretParams(detect_races=True),
        block_m=64, block_k=256)


@pytest.mark.parametrize("m,k,n,act,n_out,per_token", [
    (77, 256, 256, "quantize", 64, True),
    (64, 512, 128, "int8", 160, False),
])
def test_w8a8_gpu_interpret(m, k, n, act, n_out, per_token):
  p = testing.random_problem(m * 3 + n_out, m, k, n, act=act, n_outlier=n_out,
                             per_token=per_token)
  check(p, ["pallas_gpu"])


def test_w8a8_bf16_output_float32_input_precomputed_colsum():
  p = testing.random_problem(13, 50, 256, 128, act="quantize", n_outlier=32,
                             x_dtype=jnp.float32)
  args = (p.x, p.w, p.w_scale, p.w_zero)
  colsum = weight_colsum(p.w, n_outlier=32)
  y = w8a8_matmul(*args, **p.kwargs(), w_colsum=colsum, backend="pallas_tpu",
                  interpret=True)
  ref = w8a8_matmul_reference(*args, **p.kwargs())
  assert y.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)),
                             np.asarray(ref.astype(jnp.float32)), rtol=1e-2,
                             atol=1e-2)
  # No backend given on CPU: the XLA fallback.
  y = w8a8_matmul(*args, **p.kwargs(), w_colsum=colsum, out_dtype=jnp.float32)
  testing.assert_close_f32(y, w8a8_matmul_reference(*args, **p.kwargs(),
                                                    out_dtype=jnp.float32))


@pytest.mark.parametrize("seed", [0, 1])
def test_w8a8_random_shapes(seed):
  rng = np.random.default_rng(100 + seed)
  m = int(rng.integers(1, 300))
  k = 128 * int(rng.integers(2, 9))
  n = 128 * int(rng.integers(1, 4))
  n_out = 32 * int(rng.integers(0, 4))
  p = testing.random_problem(seed, m, k, n, act=str(rng.choice(["int8", "quantize"])),
                             n_outlier=n_out, per_token=bool(rng.integers(2)))
  check(p, ["pallas_tpu"], block_m=64, block_n=128, block_k=128)
