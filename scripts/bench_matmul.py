#!/usr/bin/env python3
"""Benchmark the low-bit matmul kernels against XLA bf16 / int8 / fp8 dots.

Prints one row per (M, K, N, kernel, backend): time per call, TFLOP/s (TOP/s
for integer math; 2 M N K operations either way) and the speedup over the
XLA bf16 dot, the XLA int8 dot (s8 x s8 -> s32) and, where the device has
fp8 matmul units (Hopper/Ada GPUs, TPU v6e/v7x), an XLA fp8 e4m3 dot. Timing:
jit, warm-up calls, then back-to-back calls with ``block_until_ready`` on the
last one; the best of ``--repeats`` runs is reported.

Shapes: M in {4680, 9360, 18720} (1/2/4 Wan chunks of 4680 tokens) and
(K, N) in {(1536, 1536), (1536, 8960), (8960, 1536)} (Wan-1.3B attention
projections, FFN up, FFN down), plus a decode table for W4A16 (small M).

  python scripts/bench_matmul.py                 # on a TPU / GPU host
  python scripts/bench_matmul.py --quick         # tiny CPU smoke run
  python scripts/bench_matmul.py --quick --backends xla,pallas_tpu --interpret

Each kernel call includes its per-call parameter normalization (a few tiny
XLA ops on N-length vectors); the weight column sums are precomputed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels_pallas import int4_pack  # noqa: E402
from kernels_pallas import quant_common as qc  # noqa: E402
from kernels_pallas.w4a16_matmul import w4a16_matmul  # noqa: E402
from kernels_pallas.w4a8_matmul import w4a8_matmul  # noqa: E402
from kernels_pallas.w8a8_matmul import w8a8_matmul  # noqa: E402

FULL_M = (4680, 9360, 18720)
FULL_KN = ((1536, 1536), (1536, 8960), (8960, 1536))
QUICK_M = (77, 200)
QUICK_KN = ((256, 256), (256, 512), (512, 256))
DECODE_M = (1, 16, 128)
_NT = (((1,), (1,)), ((), ()))


def time_fn(fn, args, warmup: int, iters: int, repeats: int) -> float:
  """Best-of-repeats mean seconds per call."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best


def fp8_supported() -> bool:
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    cc = str(getattr(dev, "compute_capability", "0"))
    return tuple(int(v) for v in cc.split(".")[:2]) >= (8, 9)
  if dev.platform == "tpu":
    kind = dev.device_kind.lower()
    return any(tag in kind for tag in ("v6", "v7", "7x"))
  return False


def make_inputs(m, k, n, n_outlier, seed=0):
  rng = np.random.default_rng(seed)
  s = 2 if n_outlier else 1
  lead = (s,) if n_outlier else ()
  x_bf16 = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  x_i8 = jnp.asarray(rng.integers(-128, 128, size=(m, k)), jnp.int8)
  w8 = jnp.asarray(rng.integers(-128, 128, size=(n, k)), jnp.int8)
  w4 = int4_pack.pack_int4(jnp.asarray(rng.integers(-8, 8, size=(n, k))))
  params = dict(
      w_scale=jnp.asarray(rng.uniform(1e-3, 1e-2, size=lead + (n,)), jnp.float32),
      w_zero=jnp.asarray(rng.integers(-4, 4, size=lead + (n,)), jnp.int32),
      x_scale=jnp.full(lead, 0.05, jnp.float32),
      x_zero=jnp.full(lead, 3, jnp.int32),
      bias=jnp.asarray(rng.normal(size=(n,)), jnp.float32))
  return x_bf16, x_i8, w8, w4, params


def kernel_cases(m, k, n, backend, interpret, n_outlier):
  """(name, jitted fn, args) for every kernel variant."""
  x_bf16, x_i8, w8, w4, prm = make_inputs(m, k, n, n_outlier)
  ws, wz = prm["w_scale"], prm["w_zero"]
  xs, xz, b = prm["x_scale"], prm["x_zero"], prm["bias"]
  cs8 = qc.weight_colsum(w8, n_outlier=n_outlier)
  cs4 = qc.weight_colsum(w4, n_outlier=n_outlier, packed=True)
  common = dict(n_outlier=n_outlier, backend=backend, interpret=interpret)
  dual = f"/dual{n_outlier}" if n_outlier else ""

  def int_op(op, colsum):
    return jax.jit(lambda x, w: op(x, w, ws, wz, x_scale=xs, x_zero=xz, bias=b,
                                   w_colsum=colsum, **common))

  cases = [
      (f"w8a8{dual}", int_op(w8a8_matmul, cs8), (x_i8, w8)),
      (f"w8a8{dual}+fused-quant", int_op(w8a8_matmul, cs8), (x_bf16, w8)),
      (f"w4a8{dual}", int_op(w4a8_matmul, cs4), (x_i8, w4)),
      (f"w4a8{dual}+fused-quant", int_op(w4a8_matmul, cs4), (x_bf16, w4)),
      (f"w4a16{dual}", jax.jit(lambda x, w: w4a16_matmul(
          x, w, ws, wz, bias=b, **common)), (x_bf16, w4)),
  ]
  return cases


def baselines(m, k, n, with_fp8):
  rng = np.random.default_rng(1)
  xb = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  wb = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
  xi = jnp.asarray(rng.integers(-128, 128, size=(m, k)), jnp.int8)
  wi = jnp.asarray(rng.integers(-128, 128, size=(n, k)), jnp.int8)
  out = {
      "xla-bf16": (jax.jit(lambda a, c: jax.lax.dot_general(
          a, c, _NT, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                   (xb, wb)),
      "xla-int8": (jax.jit(functools.partial(
          jax.lax.dot_general, dimension_numbers=_NT,
          preferred_element_type=jnp.int32)), (xi, wi)),
  }
  if with_fp8:
    f8 = jnp.float8_e4m3fn
    out["xla-fp8"] = (jax.jit(lambda a, c: jax.lax.dot_general(
        a, c, _NT, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                      (xb.astype(f8), wb.astype(f8)))
  return out


def fmt_ratio(base, t):
  return f"{base / t:7.2f}x" if base else "      -"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes and few iterations (CPU smoke run)")
  ap.add_argument("--backends", default=None,
                  help="comma list from pallas_tpu,pallas_gpu,xla "
                       "(default: the device's backend, plus xla)")
  ap.add_argument("--interpret", action="store_true",
                  help="run Pallas backends in interpret mode (CPU only)")
  ap.add_argument("--n-outlier", type=int, default=64,
                  help="dual-scale outlier channels (0 = single scale)")
  ap.add_argument("--warmup", type=int, default=None)
  ap.add_argument("--iters", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)

  ms, kns = (QUICK_M, QUICK_KN) if args.quick else (FULL_M, FULL_KN)
  warmup = args.warmup or (1 if args.quick else 5)
  iters = args.iters or (2 if args.quick else 20)
  if args.backends:
    backends = args.backends.split(",")
    for b in backends:
      if b not in qc.BACKENDS or b == "reference":
        ap.error(f"unknown backend {b!r}")
  else:
    default = qc.resolve_backend(None)
    backends = [default] + (["xla"] if default != "xla" else [])
  with_fp8 = fp8_supported()
  dev = jax.devices()[0]
  print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
  print(f"jax {jax.__version__}, device: {dev.platform} / {dev.device_kind} "
        f"(x{jax.device_count()}), backends: {','.join(backends)}"
        f"{' (interpret)' if args.interpret else ''}, fp8 baseline: "
        f"{'yes' if with_fp8 else 'no (device has no fp8 matmul)'}")
  print(f"timing: {warmup} warm-up + best of {args.repeats} x {iters} calls; "
        f"n_outlier={args.n_outlier}")
  if dev.platform == "cpu":
    print("NOTE: CPU numbers are not meaningful; this only exercises the code.")

  header = (f"{'M':>6} {'K':>5} {'N':>5}  {'kernel':<28} {'backend':<10} "
            f"{'time_us':>10} {'TOP/s':>8} {'vs bf16':>8} {'vs int8':>8} "
            f"{'vs fp8':>8}")
  print(header)
  print("-" * len(header))
  for m in ms:
    for k, n in kns:
      flops = 2.0 * m * n * k
      base_t = {}
      for name, (fn, fargs) in baselines(m, k, n, with_fp8).items():
        base_t[name] = time_fn(fn, fargs, warmup, iters, args.repeats)
      rows = [(name, "xla", t) for name, t in base_t.items()]
      for backend in backends:
        interpret = args.interpret and backend.startswith("pallas")
        for name, fn, fargs in kernel_cases(m, k, n, backend, interpret,
                                            args.n_outlier):
          rows.append((name, backend, time_fn(fn, fargs, warmup, iters,
                                              args.repeats)))
      for name, backend, t in rows:
        print(f"{m:>6} {k:>5} {n:>5}  {name:<28} {backend:<10} {t * 1e6:>10.1f} "
              f"{flops / t / 1e12:>8.2f} {fmt_ratio(base_t['xla-bf16'], t):>8} "
              f"{fmt_ratio(base_t['xla-int8'], t):>8} "
              f"{fmt_ratio(base_t.get('xla-fp8'), t):>8}")
      sys.stdout.flush()

  print("\nW4A16 decode (small M) vs XLA bf16 dot")
  for m in (DECODE_M[:2] if args.quick else DECODE_M):
    for k, n in kns:
      x_bf16, _, _, w4, prm = make_inputs(m, k, n, 0)
      base = baselines(m, k, n, False)["xla-bf16"]
      t_b = time_fn(*base, warmup, iters, args.repeats)
      for backend in backends:
        interpret = args.interpret and backend.startswith("pallas")
        fn = jax.jit(lambda x, w, backend=backend, interpret=interpret:
                     w4a16_matmul(x, w, prm["w_scale"], prm["w_zero"],
                                  bias=prm["bias"], backend=backend,
                                  interpret=interpret))
        t = time_fn(fn, (x_bf16, w4), warmup, iters, args.repeats)
        print(f"{m:>6} {k:>5} {n:>5}  {'w4a16':<28} {backend:<10} "
              f"{t * 1e6:>10.1f} {2.0 * m * n * k / t / 1e12:>8.3f} "
              f"{fmt_ratio(t_b, t):>8}  (bf16 dot {t_b * 1e6:.1f} us)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
