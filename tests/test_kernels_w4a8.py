"""W4A8 kernels (packed int4 weights unpacked in-kernel) vs the reference."""

import functools

import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import testing
from kernels_pallas.w4a8_matmul import w4a8_matmul, w4a8_matmul_reference


check = functools.partial(testing.check_against_reference, w4a8_matmul, w4a8_matmul_reference)


CASES = [
    # (m, k, n, act, n_outlier, per_token, w_signed); tiles 64 x 128 x 256.
    (77, 512, 256, "int8", 0, False, True),
    (200, 1024, 384, "quantize", 96, True, False),
    (130, 512, 256, "int8", 64, False, True),
    (64, 1024, 128, "quantize", 160, False, True),  # full outlier tile + straddle
    (96, 512, 128, "int8", 256, True, False),       # n_outlier == K / 2
]


@pytest.mark.parametrize("m,k,n,act,n_out,per_token,signed", CASES)
def test_w4a8_tpu_and_xla(m, k, n, act, n_out, per_token, signed):
  p = testing.random_problem(m + k + n_out, m, k, n, bits=4, act=act,
                             n_outlier=n_out, per_token=per_token,
                             w_signed=signed)
  check(p, ["pallas_tpu", "xla"], block_m=64, block_n=128, block_k=256)


@pytest.mark.parametrize("m,n", [(300, 8960), (4680, 1536)])
def test_w4a8_wan_shapes_default_tiles(m, n):
  """Wan widths (FFN up N = 8960; a 4680-token chunk), default tiles."""
  p = testing.random_problem(m + n, m, 256, n, bits=4, act="quantize",
                             n_outlier=32)
  check(p, ["pallas_tpu"], acc=False)


def test_w4a8_tpu_interpret_params():
  p = testing.random_problem(22, 77, 512, 256, bits=4, act="quantize",
                             n_outlier=64, per_token=True)
  check(p, ["pallas_tpu"], interpret=pltpu.InterpretParams(detect_races=True),
        block_m=64, block_k=256)


@pytest.mark.parametrize("m,k,n,act,n_out,signed", [
    (77, 512, 128, "quantize", 96, True),
    (64, 512, 256, "int8", 0, False),
])
def test_w4a8_gpu_interpret(m, k, n, act, n_out, signed):
  p = testing.random_problem(m + n_out + 5, m, k, n, bits=4, act=act,
                             n_outlier=n_out, w_signed=signed)
  check(p, ["pallas_gpu"])


@pytest.mark.parametrize("seed", [0, 1])
def test_w4a8_random_shapes(seed):
  rng = np.random.default_rng(200 + seed)
  m = int(rng.integers(1, 300))
  k = 256 * int(rng.integers(1, 5))
  n = 128 * int(rng.integers(1, 4))
  n_out = 32 * int(rng.integers(0, 4))
  p = testing.random_problem(seed, m, k, n, bits=4,
                             act=str(rng.choice(["int8", "quantize"])),
                             n_outlier=n_out, per_token=bool(rng.integers(2)),
                             w_signed=bool(rng.integers(2)))
  check(p, ["pallas_tpu"], block_m=64, block_n=128, block_k=256)
