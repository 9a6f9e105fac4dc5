"""Quantized self-attention KV cache: int8 / fp8 (e4m3) / int4 codes with per-channel K and per-token V scales.

Formats (``KV_FORMATS``):

* ``"bf16"``: no quantization: the plain float cache of :mod:`~qarvd_jax.models.wan.kv_cache` in the
  model's compute dtype (bf16 at deployment, float32 for a float32 model), the path of today, bit for bit.
* ``"int8"``: symmetric int8 codes in [-127, 127], ``x ~ code * scale`` (error <= scale / 2).
* ``"fp8"``: float8_e4m3fn codes, ``x / scale`` in [-448, 448] (relative error <= 2^-4 in the normal
  range, absolute <= 2^-10 * scale below it).
* ``"int4"``: symmetric int4 codes in [-7, 7], packed two per byte along the head dim in the
  half-split layout of :mod:`kernels_pallas.int4_pack` (codes ``[B, L, H, D/2]`` uint8).

Scales (float32, both per head):

* **K per channel** (KIVI: a few channels of the keys carry outliers; per-channel scales keep them
  from crushing the others). The cache fills chunk by chunk, so a channel's scale is taken over a
  fixed *group of tokens*, one latent frame (``frame_seq_length`` tokens) by default: scale
  ``[B, L / G, H, D]``, one per (frame, head, channel), computed when the frame is written and never
  revised. Frames are the unit of every cache operation (chunks write whole frames, the roll evicts
  whole frames, the sink is whole frames), so a group never straddles two writes and rolls with its
  frame.
* **V per token**: scale ``[B, L, H, 1]``, the amax over the head dim of each token.

With ``sink_float`` the sink frames of a rolling cache are also kept in the compute dtype (``sink``
``[B, S, H, D]``): attention reads them from there instead of from the codes (their codes are still
written, so the code array keeps one fixed shape).

Dequantization happens inside attention (:func:`dense` for the whole cache, :meth:`QuantizedKV.window`
for one key block of the blockwise path), never in the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels_pallas.int4_pack import pack_int4, unpack_int4

__all__ = ["KV_FORMATS", "QuantizedKV", "check_kv_format", "quantize_kv", "dequantize_codes", "dense",
           "is_quantized", "init_quantized", "write_quantized", "kv_bytes", "format_qmax"]

KV_FORMATS = ("bf16", "int8", "fp8", "int4")
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
_FP8 = jnp.float8_e4m3fn


def check_kv_format(name, flag: str = "kv_cache") -> str:
    """``name`` if it is a known cache format, else a ValueError naming ``flag``."""
    if name not in KV_FORMATS:
        raise ValueError(f"{flag}={name!r} is not a KV-cache format; choose one of {', '.join(KV_FORMATS)}")
    return name


def format_qmax(fmt: str) -> float:
    """Largest code magnitude of a quantized format (127, 448, 7)."""
    return _QMAX[check_kv_format(fmt)] if fmt != "bf16" else float("inf")


@struct.dataclass
class QuantizedKV:
    """One layer's quantized K or V.

    Attributes:
      codes: ``[B, L, H, D]`` int8 / float8_e4m3fn, or ``[B, L, H, D/2]`` uint8 (int4, packed).
      scale: float32 ``[B, L / group, H, D]`` (K, per channel) or ``[B, L, H, 1]`` (V, per token).
      sink: ``None`` or ``[B, S, H, D]`` float copy of the first S tokens (read instead of their codes).
      fmt, group, head_dim, per_token: static: format, tokens per scale row, logical head dim, and
        whether the scale is per token (V) rather than per channel (K).
    """

    codes: jax.Array
    scale: jax.Array
    sink: jax.Array | None = None
    fmt: str = struct.field(pytree_node=False, default="int8")
    group: int = struct.field(pytree_node=False, default=1)
    head_dim: int = struct.field(pytree_node=False, default=0)
    per_token: bool = struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical shape [B, L, H, D] of the dequantized tensor."""
        b, length, h, _ = self.codes.shape
        return (b, length, h, self.head_dim)

    def window(self, start, size: int, dtype) -> jax.Array:
        """Dequantized tokens [start, start + size) as ``[B, size, H, D]`` in ``dtype``; ``start`` may be
        traced and must be a multiple of ``group`` (``size`` too)."""
        codes = jax.lax.dynamic_slice_in_dim(self.codes, start, size, axis=1)
        scale = jax.lax.dynamic_slice_in_dim(self.scale, start // self.group, size // self.group, axis=1)
        out = dequantize_codes(codes, scale, self.fmt, self.group, dtype)
        if self.sink is not None:
            n = self.sink.shape[1]
            tok = start + jnp.arange(size)
            from_sink = jnp.take(self.sink, jnp.clip(tok, 0, n - 1), axis=1).astype(dtype)
            out = jnp.where((tok < n)[None, :, None, None], from_sink, out)
        return out


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedKV)


def quantize_kv(x: jax.Array, fmt: str, group: int | None):
    """Quantize ``x`` [B, N, H, D] -> ``(codes, scale)``.

    ``group``: tokens per per-channel scale (K; ``N % group == 0``); ``None``: per-token scale over the
    head dim (V). Scales are float32 ``amax / qmax`` (1 where the amax is 0, so zeros stay zeros).
    """
    b, n, h, d = x.shape
    xf = x.astype(jnp.float32)
    if group is None:
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)  # [B, N, H, 1]
        scale = jnp.where(amax > 0, amax / _QMAX[fmt], 1.0)
        y = xf / scale
    else:
        if n % group:
            raise ValueError(f"{n} tokens are not a multiple of the K scale group of {group} tokens")
        xg = xf.reshape(b, n // group, group, h, d)
        amax = jnp.max(jnp.abs(xg), axis=2)  # [B, N/G, H, D]
        scale = jnp.where(amax > 0, amax / _QMAX[fmt], 1.0)
        y = (xg / scale[:, :, None]).reshape(b, n, h, d)
    if fmt == "fp8":
        codes = jnp.clip(y, -448.0, 448.0).astype(_FP8)
    else:
        q = jnp.clip(jnp.round(y), -_QMAX[fmt], _QMAX[fmt]).astype(jnp.int8)
        codes = pack_int4(q, signed=True, axis=-1) if fmt == "int4" else q
    return codes, scale


def dequantize_codes(codes, scale, fmt: str, group: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_kv`: codes [B, N, H, D|D/2], scale [B, N/group, H, D|1] -> [B, N, H, D]."""
    vals = unpack_int4(codes, signed=True, axis=-1) if fmt == "int4" else codes
    vals = vals.astype(jnp.float32)
    b, n, h, d = vals.shape
    if group == 1:
        out = vals * scale
    else:
        out = (vals.reshape(b, n // group, group, h, d) * scale[:, :, None]).reshape(b, n, h, d)
    return out.astype(dtype)


def dense(x, dtype) -> jax.Array:
    """A K/V operand of attention as a dense array: a QuantizedKV dequantized whole (sink included),
    an array returned unchanged."""
    if not is_quantized(x):
        return x
    return x.window(0, x.shape[1], dtype)


def init_quantized(batch: int, cache_len: int, heads: int, head_dim: int, fmt: str, group: int | None,
                   sink_tokens: int = 0, sink_dtype=jnp.bfloat16) -> QuantizedKV:
    """An empty (zero) quantized K (``group`` tokens per channel scale) or V (``group=None``) of one layer."""
    if fmt == "int4" and head_dim % 2:
        raise ValueError(f"kv_cache='int4' packs two codes per byte along head_dim={head_dim}, which must be even")
    d_codes = head_dim // 2 if fmt == "int4" else head_dim
    dtype = {"int8": jnp.int8, "fp8": _FP8, "int4": jnp.uint8}[fmt]
    codes = jnp.zeros((batch, cache_len, heads, d_codes), dtype)
    if group is None:
        scale = jnp.ones((batch, cache_len, heads, 1), jnp.float32)
    else:
        if cache_len % group:
            raise ValueError(f"cache of {cache_len} tokens is not a multiple of the K scale group ({group} tokens)")
        scale = jnp.ones((batch, cache_len // group, heads, head_dim), jnp.float32)
    sink = jnp.zeros((batch, sink_tokens, heads, head_dim), sink_dtype) if sink_tokens else None
    return QuantizedKV(codes=codes, scale=scale, sink=sink, fmt=fmt, group=1 if group is None else group,
                       head_dim=head_dim, per_token=group is None)


def write_quantized(cache: QuantizedKV, new: jax.Array, src, start) -> QuantizedKV:
    """Roll ``cache`` by the token source index ``src`` [L] (None: no roll) and write ``new``
    [B, N, H, D] quantized at token ``start`` (traced; ``start``, ``N`` and every roll a multiple of
    ``cache.group``). The float sink copy takes the new tokens that land in it."""
    g = cache.group
    codes, scale = cache.codes, cache.scale
    if src is not None:
        codes = jnp.take(codes, src, axis=1)
        scale = jnp.take(scale, src[::g] // g, axis=1)
    new_codes, new_scale = quantize_kv(new, cache.fmt, None if cache.per_token else g)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, new_codes, start, axis=1)
    scale = jax.lax.dynamic_update_slice_in_dim(scale, new_scale, start // g, axis=1)
    sink = cache.sink
    if sink is not None:
        n = sink.shape[1]
        rel = jnp.arange(n) - start
        hit = (rel >= 0) & (rel < new.shape[1])
        fresh = jnp.take(new, jnp.clip(rel, 0, new.shape[1] - 1), axis=1).astype(sink.dtype)
        sink = jnp.where(hit[None, :, None, None], fresh, sink)
    return cache.replace(codes=codes, scale=scale, sink=sink)


def kv_bytes(cache) -> int:
    """Exact device bytes of a cache pytree (codes, scales, sink copies and the int32 indices)."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))
