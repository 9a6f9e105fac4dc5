"""Test helpers: random quantized problems and an independent NumPy model.

``numpy_dequant_matmul`` recomputes the quantized linear layer from scratch in
float64 (dequantize both operands, then matmul) and ``numpy_int_accumulators``
the exact integer sums in int64, sharing no code with the jnp references.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kernels_pallas import int4_pack


@dataclasses.dataclass
class Problem:
  """Arguments of one call; ``w`` is packed for 4-bit, ``w_int`` unpacked."""
  x: jnp.ndarray
  w: jnp.ndarray
  w_int: np.ndarray
  w_scale: jnp.ndarray
  w_zero: jnp.ndarray
  x_scale: jnp.ndarray | None
  x_zero: jnp.ndarray | None
  bias: jnp.ndarray | None
  n_outlier: int
  w_signed: bool

  def kwargs(self, a16: bool = False) -> dict:
    kw = dict(bias=self.bias, n_outlier=self.n_outlier)
    if not a16:
      kw.update(x_scale=self.x_scale, x_zero=self.x_zero)
    if self.w.dtype == jnp.uint8:
      kw["w_signed"] = self.w_signed
    return kw


def random_problem(seed: int, m: int, k: int, n: int, *, bits: int = 8,
                   act: str = "int8", n_outlier: int = 0,
                   per_token: bool = False, w_signed: bool = True,
                   bias: bool = True, x_dtype=jnp.bfloat16) -> Problem:
  """act: 'int8' (pre-quantized x), 'quantize' (float x) or 'bf16' (A16)."""
  rng = np.random.default_rng(seed)
  s = 2 if n_outlier else 1
  lead = (s,) if n_outlier else ()
  if bits == 4:
    lo, hi = int4_pack.int4_range(w_signed)
  else:
    lo, hi = -128, 127
  w_int = rng.integers(lo, hi + 1, size=(n, k))
  w = (int4_pack.pack_int4(jnp.asarray(w_int), signed=w_signed) if bits == 4
       else jnp.asarray(w_int, jnp.int8))
  mid = (lo + hi) // 2
  w_zero = jnp.asarray(rng.integers(mid - 4, mid + 5, size=lead + (n,)), jnp.int32)
  w_scale = jnp.asarray(rng.uniform(1e-3, 1e-2, size=lead + (n,)), jnp.float32)
  row_shape = lead + ((m,) if per_token else ())
  x_scale = jnp.asarray(rng.uniform(0.02, 0.08, size=row_shape), jnp.float32)
  x_zero = jnp.asarray(rng.integers(-20, 21, size=row_shape), jnp.int32)
  if act == "int8":
    x = jnp.asarray(rng.integers(-128, 128, size=(m, k)), jnp.int8)
  else:
    xf = rng.normal(size=(m, k)) * 2.0
    if n_outlier:
      xf[:, :n_outlier] *= 8.0  # outlier channels: larger range
    x = jnp.asarray(xf, x_dtype)
  b = jnp.asarray(rng.normal(size=(n,)), jnp.float32) if bias else None
  return Problem(x, w, w_int, w_scale, w_zero, x_scale, x_zero, b, n_outlier,
                 w_signed)


def _segments(k, n_outlier):
  return [(0, n_outlier), (n_outlier, k)] if n_outlier else [(0, k)]


def _per_segment(a, s_count, length):
  """-> list over segments of float64 arrays broadcastable to `length`."""
  a = np.asarray(a, np.float64)
  if s_count == 1:
    a = a[None]
  return [np.broadcast_to(a[i], (length,)) if a[i].ndim else np.full(length, a[i])
          for i in range(s_count)]


def numpy_quantize(x, x_scale, x_zero):
  """float32 NumPy version of the kernels' prologue quantization."""
  inv = np.float32(1.0) / np.asarray(x_scale, np.float32)
  q = np.round(np.asarray(x, np.float32) * inv) + np.asarray(x_zero, np.float32)
  return np.clip(q, -128, 127).astype(np.int64)


def numpy_int_accumulators(p: Problem) -> np.ndarray:
  """(S, M, N) int64 ``sum_k (q_x - z_x)(q_w - z_w)`` per segment."""
  m, k = p.x.shape
  s_count = 2 if p.n_outlier else 1
  xs = _per_segment(p.x_scale, s_count, m)
  xz = _per_segment(p.x_zero, s_count, m)
  wz = _per_segment(p.w_zero, s_count, p.w_int.shape[0])
  out = []
  for i, (a, b) in enumerate(_segments(k, p.n_outlier)):
    x = np.asarray(p.x[:, a:b].astype(jnp.float32))
    q = (x.astype(np.int64) if p.x.dtype == jnp.int8
         else numpy_quantize(x, xs[i][:, None], xz[i][:, None]))
    dx = q - xz[i][:, None].astype(np.int64)
    dw = p.w_int[:, a:b].astype(np.int64) - wz[i][:, None].astype(np.int64)
    out.append(dx @ dw.T)
  return np.stack(out)


def numpy_dequant_matmul(p: Problem, a16: bool = False) -> np.ndarray:
  """float64 ``x_hat @ w_hat.T + b`` with both operands dequantized."""
  m, k = p.x.shape
  n = p.w_int.shape[0]
  s_count = 2 if p.n_outlier else 1
  ws = _per_segment(p.w_scale, s_count, n)
  wz = _per_segment(p.w_zero, s_count, n)
  if not a16:
    xs = _per_segment(p.x_scale, s_count, m)
    xz = _per_segment(p.x_zero, s_count, m)
  y = np.zeros((m, n))
  for i, (a, b) in enumerate(_segments(k, p.n_outlier)):
    x = np.asarray(p.x[:, a:b].astype(jnp.float32), np.float64)
    if a16:
      x_hat = np.asarray(p.x[:, a:b].astype(jnp.bfloat16).astype(jnp.float32),
                         np.float64)
    else:
      q = x if p.x.dtype == jnp.int8 else numpy_quantize(x, xs[i][:, None],
                                                         xz[i][:, None])
      x_hat = xs[i][:, None] * (q - xz[i][:, None])
    w_hat = ws[i][:, None] * (p.w_int[:, a:b] - wz[i][:, None])
    y += x_hat @ w_hat.T
  if p.bias is not None:
    y += np.asarray(p.bias, np.float64)[None, :]
  return y


def assert_close_f32(actual, desired, ulps: float = 8.0):
  """Equal up to float32 rounding: |a - d| <= ulps * eps32 * max|d|.

  The epilogue rounds once per segment term, the bias add and the output
  cast; the kernels and references may order/fuse them differently.
  """
  actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  tol = ulps * np.finfo(np.float32).eps * max(1.0, np.abs(desired).max())
  err = np.abs(actual - desired).max()
  assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def check_against_reference(op, reference, p: Problem, backends, interpret=True, acc=True, **blocks):
  """``op`` on every backend equals ``reference``: int32 accumulators exactly (when ``acc``) and the
  float32 output to :func:`assert_close_f32`."""
  args = (p.x, p.w, p.w_scale, p.w_zero)
  kw = p.kwargs()
  y_ref = reference(*args, **kw, out_dtype=jnp.float32)
  acc_ref = reference(*args, **kw, accumulator_only=True) if acc else None
  for backend in backends:
    if acc:
      got = op(*args, **kw, accumulator_only=True, backend=backend, interpret=interpret, **blocks)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(acc_ref), err_msg=backend)
    y = op(*args, **kw, out_dtype=jnp.float32, backend=backend, interpret=interpret, **blocks)
    assert_close_f32(y, y_ref)
