"""Bad inputs raise ValueErrors that name the offending shape/dtype."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.int4_pack import pack_int4
from kernels_pallas.w4a16_matmul import w4a16_matmul
from kernels_pallas.w4a8_matmul import w4a8_matmul
from kernels_pallas.w8a8_matmul import w8a8_matmul

M, K, N = 8, 256, 128


def _w8(**over):
  kw = dict(x=jnp.zeros((M, K), jnp.int8), w=jnp.zeros((N, K), jnp.int8),
            w_scale=jnp.ones((N,)), w_zero=jnp.zeros((N,), jnp.int32),
            x_scale=1.0, x_zero=0, backend="xla")
  kw.update(over)
  return w8a8_matmul(kw.pop("x"), kw.pop("w"), kw.pop("w_scale"),
                     kw.pop("w_zero"), **kw)


@pytest.mark.parametrize("over,match", [
    (dict(x=jnp.zeros((2, M, K), jnp.int8)), r"x must be 2-D.*\(2, 8, 256\)"),
    (dict(x=jnp.zeros((M, K), jnp.int16)), "int16"),
    (dict(x=jnp.zeros((M, K), jnp.uint8)), "uint8"),
    (dict(w=jnp.zeros((N, K), jnp.uint8)), "w must be int8.*uint8"),
    (dict(w=jnp.zeros((N, 384), jnp.int8)), r"K=256.*\(128, 384\).*K=384"),
    (dict(x=jnp.zeros((M, 200), jnp.int8), w=jnp.zeros((N, 200), jnp.int8)),
     "K=200 must be a multiple of 128"),
    (dict(w=jnp.zeros((100, K), jnp.int8), w_scale=jnp.ones((100,)),
          w_zero=jnp.zeros((100,))), "N=100"),
    (dict(n_outlier=48), "n_outlier=48"),
    (dict(n_outlier=256), "n_outlier=256"),
    (dict(w_scale=jnp.ones((N + 1,))), r"w_scale must have shape \(128,\)"),
    (dict(n_outlier=32), r"w_scale must have shape \(2, 128\)"),
    (dict(x_scale=jnp.ones((3,))), r"x_scale must have shape \(\).*\(8,\)"),
    (dict(x_zero=jnp.zeros((M + 1,))), r"x_zero"),
    (dict(x_zero=None), "x_scale and x_zero are required"),
    (dict(w_zero=jnp.zeros((N,), jnp.bool_)), "w_zero must have an integer"),
    (dict(bias=jnp.ones((N + 1,))), r"bias must have shape \(128,\)"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="pallas_tpu", block_n=96), "block_n=96"),
    (dict(backend="pallas_tpu", block_k=384), "block_k=384"),
    (dict(backend="pallas_tpu", block_m=40, x=jnp.zeros((100, K), jnp.int8)),
     "block_m=40"),
    (dict(backend="pallas_gpu", block_m=96), "block_m=96"),
    (dict(backend="pallas_gpu", block_k=256), "block_k must be 128"),
])
def test_w8a8_errors(over, match):
  with pytest.raises(ValueError, match=match):
    _w8(**over)


def test_w4_errors():
  x = jnp.zeros((M, 384), jnp.int8)
  w = pack_int4(jnp.zeros((N, 384), jnp.int8))
  with pytest.raises(ValueError, match="K=384 must be a multiple of 256"):
    w4a8_matmul(x, w, jnp.ones((N,)), jnp.zeros((N,)), x_scale=1.0, x_zero=0)
  x = jnp.zeros((M, 512), jnp.int8)
  w = pack_int4(jnp.zeros((N, 512), jnp.int8))
  with pytest.raises(ValueError, match=r"n_outlier=288.*<= 256"):
    w4a8_matmul(x, w, jnp.ones((2, N)), jnp.zeros((2, N)), x_scale=jnp.ones(2),
                x_zero=jnp.zeros(2), n_outlier=288)
  with pytest.raises(ValueError, match="w must be uint8"):
    w4a8_matmul(x, jnp.zeros((N, 256), jnp.int8), jnp.ones((N,)),
                jnp.zeros((N,)), x_scale=1.0, x_zero=0)
  with pytest.raises(ValueError, match="x must be bfloat16/float16/float32"):
    w4a16_matmul(x, w, jnp.ones((N,)), jnp.zeros((N,)))
  with pytest.raises(ValueError, match=r"w_zero must have shape \(128,\)"):
    w4a16_matmul(x.astype(jnp.bfloat16), w, jnp.ones((N,)), np.zeros((2, N)))
