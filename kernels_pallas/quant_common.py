"""Shared pieces of the low-bit matmul kernels: validation, parameter layout,
activation quantization and the epilogue math (one helper for every backend).

Quantization convention (all integers are *signed* 8-bit on the MXU/tensor
cores; an unsigned grid is shifted once at export time):

* activations ``x ~= s_x * (q_x - z_x)``, ``q_x`` int8 in [-128, 127], static
  scale ``s_x`` and integer zero point ``z_x``, per tensor or per token. A
  Q-ARVD uint8 grid (q in [0, 255], zero z) maps to ``q - 128`` and ``z - 128``.
* weights ``w[n, :] ~= s_w[n] * (q_w[n, :] - z_w[n])``, per output channel,
  ``q_w`` int8 (W8) or a 4-bit nibble (W4, signed -8..7 or unsigned 0..15).

For one K segment of length ``K_s``, with ``acc[m, n] = sum_k q_x[m, k] q_w[n, k]``
(exact int32), ``r[m] = sum_k q_x[m, k]`` (activation row sums, accumulated in
the kernel) and ``c[n] = sum_k q_w[n, k]`` (weight column sums, precomputed):

  sum_k (q_x - z_x)(q_w - z_w) = acc - z_w[n] r[m] - z_x[m] (c[n] - K_s z_w[n])

computed in int32 (wrap-around arithmetic is exact whenever the true value fits
in int32, which it does for |q - z| <= 255 and K_s < 2**15), then

  y[m, n] = sum_over_segments float32(corrected) * (s_x[m] * s_w[n]) + b[n].

The dual-scale form (Q-ARVD section 4) has two segments: the outlier input
channels first (``n_outlier`` of them, a multiple of 32) and then the normal
ones, each with its own activation and weight scales/zero points.
``w_czero[n] = c[n] - K_s z_w[n]`` is what the kernels receive.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kernels_pallas import int4_pack

BACKENDS = ("pallas_tpu", "pallas_gpu", "xla", "reference")
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


# --------------------------------------------------------------------------
# Static description of one call.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatmulSpec:
  """Static (hashable) shape/format description shared by all backends.

  act: 'int8' (pre-quantized activations), 'quantize' (float activations,
  quantized in the kernel prologue with the static scales) or 'bf16' (W4A16:
  no activation quantization, bf16 MXU math with an f32 accumulator).
  """
  m: int
  n: int
  k: int
  n_outlier: int
  weight_bits: int
  w_signed: bool
  act: str
  per_token: bool
  has_bias: bool
  out_dtype: Any
  accumulator_only: bool

  @property
  def n_segments(self) -> int:
    return 2 if self.n_outlier else 1

  @property
  def segments(self) -> tuple[tuple[int, int], ...]:
    """(start, size) of each K segment, outlier segment first."""
    if self.n_outlier:
      return ((0, self.n_outlier), (self.n_outlier, self.k - self.n_outlier))
    return ((0, self.k),)

  @property
  def acc_dtype(self):
    return jnp.float32 if self.act == "bf16" else jnp.int32


class QuantParams(NamedTuple):
  """Normalized per-segment parameters (S = number of segments, Mr = M or 1).

  x_scale, x_inv_scale: (S, Mr) float32; x_zero: (S, Mr) int32 (None for A16).
  w_scale: (S, N) float32; w_zero: (S, N) int32;
  w_czero: (S, N) int32 = colsum - K_s * w_zero (None for A16);
  bias: (N,) float32 or None.
  """
  x_scale: jax.Array | None
  x_inv_scale: jax.Array | None
  x_zero: jax.Array | None
  w_scale: jax.Array
  w_zero: jax.Array
  w_czero: jax.Array | None
  bias: jax.Array | None


class SegmentTile(NamedTuple):
  """Broadcastable epilogue parameters of one segment on one output tile.

  x_* have shape (tm, 1) or (1, 1); w_* have shape (1, tn). x_* are None for
  A16 (no activation quantization).
  """
  x_scale: Any
  x_zero: Any
  w_scale: Any
  w_zero: Any
  w_czero: Any


# --------------------------------------------------------------------------
# Math shared by the references, the XLA path and the kernel bodies.
# --------------------------------------------------------------------------
def quantize_activation(x, inv_scale, zero):
  """int8 ``clip(round(x * inv_scale) + zero, -128, 127)`` in float32.

  ``inv_scale = 1 / s_x`` is computed once outside the kernels so that every
  backend does the same exactly-rounded multiply (``x / s_x`` can differ from
  it by one ulp and flip a tie). ``zero`` is integer valued (any dtype).
  """
  q = jnp.round(x.astype(jnp.float32) * inv_scale) + zero.astype(jnp.float32)
  return jnp.clip(q, -128.0, 127.0).astype(jnp.int8)


def correct_accumulator(acc, rowsum, seg: SegmentTile):
  """Zero-point correction: acc - z_w r - z_x (c - K_s z_w), in acc's dtype."""
  out = acc - seg.w_zero.astype(acc.dtype) * rowsum
  if seg.x_zero is not None:
    out = out - seg.x_zero.astype(acc.dtype) * seg.w_czero
  return out


def dequantize_output(corrected: Sequence[Any], segs: Sequence[SegmentTile],
                      bias=None):
  """float32 ``sum_s corrected_s * (s_x * s_w) + bias`` (fixed summation order)."""
  out = None
  for corr, seg in zip(corrected, segs, strict=True):
    scale = seg.w_scale if seg.x_scale is None else seg.x_scale * seg.w_scale
    term = corr.astype(jnp.float32) * scale
    out = term if out is None else out + term
  if bias is not None:
    out = out + bias
  return out


def corrected_accumulators(accs, rowsums, segs):
  """Per-segment ``sum_k (q_x - z_x)(q_w - z_w)`` (see module docstring)."""
  return [correct_accumulator(a, r, s) for a, r, s in zip(accs, rowsums, segs,
                                                          strict=True)]


def epilogue(accs, rowsums, segs, bias, out_dtype):
  """The whole epilogue: zero-point correction, scaling, bias, cast."""
  corrected = corrected_accumulators(accs, rowsums, segs)
  return dequantize_output(corrected, segs, bias).astype(out_dtype)


def full_segment_tiles(qp: QuantParams, spec: MatmulSpec) -> list[SegmentTile]:
  """SegmentTile views of whole-matrix parameters (XLA path, references)."""
  segs = []
  for s in range(spec.n_segments):
    col = lambda a: None if a is None else a[s][None, :]
    row = lambda a: None if a is None else a[s][:, None]
    segs.append(SegmentTile(row(qp.x_scale), row(qp.x_zero), col(qp.w_scale),
                            col(qp.w_zero), col(qp.w_czero)))
  return segs


def kernel_operands(qp: QuantParams, spec: MatmulSpec):
  """Parameter operands of the Pallas kernels.

  Returns (rows, colf, coli): ``rows`` a list of 3S (Mr,) float32 vectors
  [s_x, 1/s_x, z_x] per segment (None for A16; z_x is exact in float32);
  ``colf`` (S [+1], N) float32 = w_scale per segment [+ bias]; ``coli``
  (2S, N) int32 = w_zero, then w_czero per segment (A16: (S, N) w_zero).
  """
  s = spec.n_segments
  rows = None
  if spec.act != "bf16":
    rows = []
    for i in range(s):
      rows += [qp.x_scale[i], qp.x_inv_scale[i], qp.x_zero[i].astype(jnp.float32)]
  colf = [qp.w_scale[i] for i in range(s)]
  if qp.bias is not None:
    colf.append(qp.bias)
  coli = [qp.w_zero[i] for i in range(s)]
  if qp.w_czero is not None:
    coli += [qp.w_czero[i] for i in range(s)]
  return rows, jnp.stack(colf), jnp.stack(coli)


# --------------------------------------------------------------------------
# Public helpers.
# --------------------------------------------------------------------------
def quantize_int8(x, scale, zero):
  """Static int8 activation quantization for a producer to fuse (XLA fuses it
  into the preceding elementwise op): ``clip(round(x / scale) + zero)``,
  computed as ``x * (1 / scale)`` exactly like the kernel prologues."""
  scale = jnp.asarray(scale, jnp.float32)
  return quantize_activation(x, 1.0 / scale, jnp.asarray(zero))


def weight_colsum(w, *, n_outlier: int = 0, packed: bool = False,
                  signed: bool = True):
  """Per-output-channel sums of the integer weights, per K segment.

  Args:
    w: (N, K) int8 weights, or (N, K // 2) uint8 packed int4 if ``packed``.
    n_outlier: outlier segment length (0 for the single-scale form).
  Returns:
    (N,) int32, or (2, N) int32 [outlier, normal] when ``n_outlier > 0``.
    Precompute it once per layer and pass it as ``w_colsum``.
  """
  wi = int4_pack.unpack_int4(w, signed=signed) if packed else w
  wi = wi.astype(jnp.int32)
  if not n_outlier:
    return jnp.sum(wi, axis=1)
  return jnp.stack([jnp.sum(wi[:, :n_outlier], axis=1),
                    jnp.sum(wi[:, n_outlier:], axis=1)])


def resolve_backend(backend: str | None) -> str:
  """Explicit backend, or pick from ``jax.default_backend()``.

  TPU -> 'pallas_tpu'; a Hopper GPU (compute capability 9.x) -> 'pallas_gpu';
  anything else (CPU, other GPUs) -> 'xla'.
  """
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "pallas_tpu"
  if platform in ("gpu", "cuda"):
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    return "pallas_gpu" if cc.startswith("9") else "xla"
  return "xla"


def pick_block(dim: int, target: int, align: int) -> int:
  """Largest multiple of ``align`` that divides ``dim`` and is <= ``target``."""
  best = align
  for cand in range(align, min(dim, target) + 1, align):
    if dim % cand == 0:
      best = cand
  return best


def check_block(name: str, block: int, dim: int, align: int, what: str):
  if block <= 0 or block % align or dim % block:
    raise ValueError(
        f"{name}={block} must be a positive multiple of {align} dividing "
        f"{what}={dim}")


# --------------------------------------------------------------------------
# Validation and normalization of user inputs.
# --------------------------------------------------------------------------
def _check_numeric(a, name):
  """Scales may be any real dtype; integer-valued floats are accepted (and
  rounded) for zero points and column sums."""
  if not (jnp.issubdtype(a.dtype, jnp.integer)
          or jnp.issubdtype(a.dtype, jnp.floating)):
    raise ValueError(f"{name} must have an integer or floating dtype, got {a.dtype}")


def _check_segment_vector(a, name, s, n):
  """(N,) for one segment or (2, N) for two."""
  want = (n,) if s == 1 else (s, n)
  if a.shape != want:
    raise ValueError(
        f"{name} must have shape {want} (per output channel"
        f"{', [outlier, normal]' if s == 2 else ''}), got {a.shape}")


def _check_row_param(a, name, s, m) -> bool:
  """Per tensor: () or (2,); per token: (M,) or (2, M). Returns per_token."""
  lead = () if s == 1 else (s,)
  if a.shape == lead:
    return False
  if a.shape == lead + (m,):
    return True
  raise ValueError(
      f"{name} must have shape {lead} (per tensor) or {lead + (m,)} (per "
      f"token){' with a leading [outlier, normal] axis' if s == 2 else ''}, "
      f"got {a.shape}")


def _to_int32(a):
  if jnp.issubdtype(a.dtype, jnp.floating):
    a = jnp.round(a)
  return a.astype(jnp.int32)


def prepare(x, w, *, weight_bits: int, w_signed: bool, w_scale, w_zero,
            x_scale=None, x_zero=None, w_colsum=None, bias=None,
            n_outlier: int = 0, out_dtype=jnp.bfloat16,
            accumulator_only: bool = False, a16: bool = False,
            op: str = "quant_matmul") -> tuple[MatmulSpec, QuantParams]:
  """Validates user inputs (shapes, dtypes, alignment; raises ValueError
  naming the offending argument) and normalizes the parameters."""
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  if x.ndim != 2:
    raise ValueError(f"{op}: x must be 2-D (M, K), got shape {x.shape}")
  if w.ndim != 2:
    raise ValueError(f"{op}: w must be 2-D, got shape {w.shape}")
  if a16:
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{op}: x must be bfloat16/float16/float32, got {x.dtype}")
    act = "bf16"
  elif x.dtype == jnp.int8:
    act = "int8"
  elif x.dtype in _FLOAT_DTYPES:
    act = "quantize"
  else:
    raise ValueError(
        f"{op}: x must be int8 (pre-quantized) or bfloat16/float16/float32 "
        f"(quantized in the kernel prologue), got {x.dtype}")
  want_w = jnp.int8 if weight_bits == 8 else jnp.uint8
  if w.dtype != want_w:
    raise ValueError(
        f"{op}: w must be {jnp.dtype(want_w).name} "
        f"{'(N, K)' if weight_bits == 8 else '(N, K // 2) packed int4 (see int4_pack)'}"
        f", got {w.dtype}")
  m, k = x.shape
  n = w.shape[0]
  kw = w.shape[1] * (2 if weight_bits == 4 else 1)
  if kw != k:
    raise ValueError(
        f"{op}: contracting dims differ: x {x.shape} has K={k}, w {w.shape} "
        f"holds K={kw}")
  k_align = 256 if weight_bits == 4 else 128
  if k % k_align:
    raise ValueError(
        f"{op}: K={k} must be a multiple of {k_align}"
        f"{' (packed int4: K/2 must be a multiple of 128)' if weight_bits == 4 else ''}")
  if n % 128:
    raise ValueError(f"{op}: N={n} (w.shape[0]) must be a multiple of 128")
  if m < 1:
    raise ValueError(f"{op}: M must be >= 1, got x shape {x.shape}")
  n_outlier = int(n_outlier)
  if n_outlier:
    limit = k // 2 if weight_bits == 4 else k - 1
    if n_outlier < 0 or n_outlier % 32 or n_outlier > limit:
      raise ValueError(
          f"{op}: n_outlier={n_outlier} must be a positive multiple of 32 and "
          f"<= {limit} for K={k}")
  s = 2 if n_outlier else 1
  if accumulator_only and a16:
    raise ValueError(f"{op}: accumulator_only is only defined for integer activations")

  w_scale, w_zero = jnp.asarray(w_scale), jnp.asarray(w_zero)
  _check_numeric(w_scale, "w_scale")
  _check_numeric(w_zero, "w_zero")
  _check_segment_vector(w_scale, "w_scale", s, n)
  _check_segment_vector(w_zero, "w_zero", s, n)
  if bias is not None:
    bias = jnp.asarray(bias)
    _check_numeric(bias, "bias")
    if bias.shape != (n,):
      raise ValueError(f"{op}: bias must have shape ({n},), got {bias.shape}")
  per_token = False
  if not a16:
    if x_scale is None or x_zero is None:
      raise ValueError(f"{op}: x_scale and x_zero are required")
    x_scale, x_zero = jnp.asarray(x_scale), jnp.asarray(x_zero)
    _check_numeric(x_scale, "x_scale")
    _check_numeric(x_zero, "x_zero")
    per_token = _check_row_param(x_scale, "x_scale", s, m)
    per_token |= _check_row_param(x_zero, "x_zero", s, m)
    if w_colsum is not None:
      w_colsum = jnp.asarray(w_colsum)
      _check_numeric(w_colsum, "w_colsum")
      _check_segment_vector(w_colsum, "w_colsum", s, n)
  spec = MatmulSpec(m=m, n=n, k=k, n_outlier=n_outlier, weight_bits=weight_bits,
                    w_signed=bool(w_signed), act=act, per_token=per_token,
                    has_bias=bias is not None,
                    out_dtype=jnp.dtype(jnp.int32 if accumulator_only else out_dtype),
                    accumulator_only=bool(accumulator_only))
  return spec, _normalize(spec, w, w_scale, w_zero, x_scale, x_zero, w_colsum,
                          bias)


@functools.partial(jax.jit, static_argnames=("spec",))
def _normalize(spec: MatmulSpec, w, w_scale, w_zero, x_scale, x_zero,
               w_colsum, bias) -> QuantParams:
  s, n, m = spec.n_segments, spec.n, spec.m
  w_scale = w_scale.astype(jnp.float32).reshape(s, n)
  w_zero = _to_int32(w_zero).reshape(s, n)
  bias = None if bias is None else bias.astype(jnp.float32)
  if spec.act == "bf16":
    return QuantParams(None, None, None, w_scale, w_zero, None, bias)
  rows = m if spec.per_token else 1
  xs = jnp.broadcast_to(x_scale.astype(jnp.float32).reshape(s, -1), (s, rows))
  xz = jnp.broadcast_to(_to_int32(x_zero).reshape(s, -1), (s, rows))
  if w_colsum is None:
    w_colsum = weight_colsum(w, n_outlier=spec.n_outlier,
                             packed=spec.weight_bits == 4, signed=spec.w_signed)
  colsum = _to_int32(w_colsum).reshape(s, n)
  seg_len = jnp.array([size for _, size in spec.segments], jnp.int32)
  czero = colsum - seg_len[:, None] * w_zero
  return QuantParams(xs, 1.0 / xs, xz, w_scale, w_zero, czero, bias)


