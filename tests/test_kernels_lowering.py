"""Compiled-mode lowering without an accelerator: ``jax.export`` for
``platforms=['tpu']`` runs the Pallas -> Mosaic TPU lowering and for
``['cuda']`` the full Mosaic GPU lowering (layout inference, wgmma operand
checks, shared-memory budget). Neither runs the kernel nor libtpu's Mosaic
compiler / ptxas, so this complements, not replaces, on-device tests."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas import testing
from kernels_pallas.w4a16_matmul import w4a16_matmul
from kernels_pallas.w4a8_matmul import w4a8_matmul
from kernels_pallas.w8a8_matmul import w8a8_matmul

PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}

CASES = [
    # (op, m, k, n, act, n_outlier, per_token)
    ("w8a8", 4680, 1536, 1536, "int8", 0, False),
    ("w8a8", 4680, 1536, 8960, "quantize", 64, True),
    ("w8a8", 4680, 8960, 1536, "quantize", 96, False),
    ("w4a8", 4680, 1536, 1536, "quantize", 32, False),
    ("w4a8", 77, 1536, 8960, "int8", 64, True),
    ("w4a16", 8, 1536, 8960, "bf16", 0, False),
    ("w4a16", 1, 1536, 1536, "bf16", 64, False),
]


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("op,m,k,n,act,n_out,per_token", CASES)
def test_lowers(backend, op, m, k, n, act, n_out, per_token):
  bits = 8 if op == "w8a8" else 4
  p = testing.random_problem(0, m, k, n, bits=bits, act=act, n_outlier=n_out,
                             per_token=per_token)
  fn = {"w8a8": w8a8_matmul, "w4a8": w4a8_matmul, "w4a16": w4a16_matmul}[op]
  kw = p.kwargs(a16=op == "w4a16")
  f = jax.jit(functools.partial(fn, **kw, backend=backend))
  exp = export.export(f, platforms=[PLATFORM[backend]])(
      p.x, p.w, p.w_scale, p.w_zero)
  assert exp.out_avals[0].shape == (m, n)
  text = exp.mlir_module()
  assert ("tpu_custom_call" if backend == "pallas_tpu" else "mosaic_gpu") in text


def test_accumulator_only_lowers_for_gpu():
  p = testing.random_problem(1, 256, 512, 256, act="int8", n_outlier=64)
  f = jax.jit(functools.partial(w8a8_matmul, **p.kwargs(), backend="pallas_gpu",
                                accumulator_only=True))
  exp = export.export(f, platforms=["cuda"])(p.x, p.w, p.w_scale, p.w_zero)
  assert exp.out_avals[0].shape == (2, 256, 256)
  assert exp.out_avals[0].dtype == jnp.int32


@pytest.mark.parametrize("m,k,n,blk", [(4680, 1536, 1536, 128), (77, 8960, 1536, 128), (13, 1536, 8960, 256)])
def test_rotated_w4a4_lowers_for_tpu(m, k, n, blk):
  """The DVD-Quant rotated W4A4/W4A8 kernel (Wan widths; one export serves A4 and A8: ``high`` is traced)."""
  from kernels_pallas.rotated_w4a4_matmul import rotated_w4a4_matmul  # pylint: disable=g-import-not-at-top

  f = jax.jit(functools.partial(rotated_w4a4_matmul, lam_block=blk, backend="pallas_tpu"))
  sds = jax.ShapeDtypeStruct
  args = (sds((m, k), jnp.float32), sds((k,), jnp.float32), sds((n, k // 2), jnp.uint8), sds((n,), jnp.int8),
          sds((n,), jnp.float32), sds((k // blk, n), jnp.int32))
  exp = export.export(f, platforms=["tpu"])(*args, high=sds((), jnp.bool_), bias=sds((n,), jnp.float32))
  assert exp.out_avals[0].shape == (m, n)
  assert "tpu_custom_call" in exp.mlir_module()
