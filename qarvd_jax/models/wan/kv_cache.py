"""Explicit, fixed-size KV caches for streaming inference (functional, jit-friendly pytrees).

Self-attention cache (:class:`KVCache`): per layer ``k``/``v`` [B, cache_len, H, D] (keys stored
*after* RoPE) and two int32 scalars shared by all layers, ``global_end`` (absolute token index
just past the last written token) and ``local_end`` (in-cache index just past it). Update rule of
the original CausalWanSelfAttention, for new tokens [current_start, current_end):

1. with a local window, when the call moves forward in time (``current_end > global_end``) and the
   new tokens do not fit (``num_new + local_end > cache_len``), roll: keep ``sink`` leading tokens,
   shift the rest left by ``evicted = num_new + local_end - cache_len``;
2. ``local_end += (current_end - global_end) - evicted``;
3. write the new k/v at [local_end - num_new, local_end) (calls within one chunk overwrite the same
   slots);
4. attend to every valid slot [0, local_end).

Quantized caches (``kv_cache`` = ``"int8"``, ``"fp8"``, ``"int4"``, :mod:`~qarvd_jax.models.wan.kv_quant`):
the per-layer ``k``/``v`` entries are :class:`~qarvd_jax.models.wan.kv_quant.QuantizedKV` pytrees
(codes + float32 scales, K per channel per frame, V per token) with the same roll and write rule;
``"bf16"`` keeps plain arrays in the compute dtype (the path of before, unchanged).

Cross-attention cache (:class:`CrossKV`): per layer ``k``/``v`` [B, text_len, H, D], computed once
from the text context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qarvd_jax.models.wan import kv_quant as kvq

__all__ = ["KVCache", "CrossKV", "init_kv_cache", "new_cache", "cache_len_tokens", "advance_layer_cache",
           "stack_cache", "unstack_cache", "roll_source"]


@struct.dataclass
class KVCache:
    """Self-attention KV cache: tuples of per-layer arrays [B, cache_len, H, D] (or per-layer
    :class:`~qarvd_jax.models.wan.kv_quant.QuantizedKV` of that logical shape) + int32 indices."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    global_end: jax.Array
    local_end: jax.Array

    @property
    def cache_len(self) -> int:
        return self.k[0].shape[1]


@struct.dataclass
class CrossKV:
    """Cross-attention K/V of the text context, per layer [B, text_len, H, D]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def cache_len_tokens(local_attn_size: int, num_frames: int, frame_seq_length: int) -> int:
    """Cache length in tokens: the window with local attention, else the whole video."""
    frames = num_frames if local_attn_size == -1 else local_attn_size
    return frames * frame_seq_length


def init_kv_cache(num_layers: int, batch: int, cache_len: int, num_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
    """An empty cache (zeros, indices 0)."""
    shape = (batch, cache_len, num_heads, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    zeros_v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return KVCache(k=zeros, v=zeros_v, global_end=jnp.zeros((), jnp.int32), local_end=jnp.zeros((), jnp.int32))


def new_cache(cfg, batch: int, num_frames: int, frame_seq_length: int, dtype=None, *, kv_cache: str = "bf16",
              sink_float: bool = False) -> KVCache:
    """Empty cache for a :class:`WanDiTConfig` and a video of ``num_frames`` latent frames (the whole
    video with global attention, the window with ``local_attn_size``).

    ``kv_cache``: ``"bf16"`` (float arrays in ``dtype``, default the compute dtype) or a quantized
    format (:data:`~qarvd_jax.models.wan.kv_quant.KV_FORMATS`; K scales per frame of
    ``frame_seq_length`` tokens). ``sink_float``: with a rolling cache and sink frames, keep the sink
    frames in ``dtype`` too (quantized formats only)."""
    kvq.check_kv_format(kv_cache)
    if num_frames > cfg.rope_max_positions:
        raise ValueError(f"{num_frames} frames exceed the RoPE table ({cfg.rope_max_positions} positions)")
    length = cache_len_tokens(cfg.local_attn_size, num_frames, frame_seq_length)
    dtype = dtype or jnp.dtype(cfg.dtype)
    if kv_cache == "bf16":
        return init_kv_cache(cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim, dtype)
    sink = cfg.sink_size * frame_seq_length if sink_float and cfg.local_attn_size != -1 else 0
    shape = (batch, length, cfg.num_heads, cfg.head_dim, kv_cache)
    ks = tuple(kvq.init_quantized(*shape, frame_seq_length, sink, dtype) for _ in range(cfg.num_layers))
    vs = tuple(kvq.init_quantized(*shape, None, sink, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=ks, v=vs, global_end=jnp.zeros((), jnp.int32), local_end=jnp.zeros((), jnp.int32))


def stack_cache(cache: KVCache) -> KVCache:
    """The same cache with ``k``/``v`` as stacked [L, B, cache_len, H, D] arrays (training path)."""
    return KVCache(k=jnp.stack(cache.k), v=jnp.stack(cache.v), global_end=cache.global_end,
                   local_end=cache.local_end)


def unstack_cache(cache: KVCache) -> KVCache:
    """Inverse of :func:`stack_cache`: per-layer tuples."""
    return KVCache(k=tuple(cache.k), v=tuple(cache.v), global_end=cache.global_end, local_end=cache.local_end)


def _roll_plan(global_end, local_end, current_start, num_new: int, cache_len: int, local_attn_size: int):
    """(evicted, new_local_end) for one call; pure integer arithmetic on traced scalars."""
    current_end = current_start + num_new
    advance = current_end - global_end
    if local_attn_size == -1:
        evicted = jnp.zeros((), jnp.int32)
    else:
        must_roll = (current_end > global_end) & (num_new + local_end > cache_len)
        evicted = jnp.where(must_roll, num_new + local_end - cache_len, 0).astype(jnp.int32)
    return evicted, (local_end + advance - evicted).astype(jnp.int32)


def roll_source(cache_len: int, local_end, evicted, sink_tokens: int):
    """Source slot of every cache slot [cache_len] (int32) for the roll
    ``cache[sink : sink+rolled] <- cache[sink+evicted : sink+evicted+rolled]``, ``rolled = local_end-evicted-sink``
    (identity when nothing is evicted)."""
    rolled = local_end - evicted - sink_tokens
    idx = jnp.arange(cache_len, dtype=jnp.int32)
    moving = (idx >= sink_tokens) & (idx < sink_tokens + rolled) & (evicted > 0)
    return jnp.where(moving, idx + evicted, idx)


def advance_layer_cache(k_cache, v_cache, new_k, new_v, *, global_end, local_end, current_start,
                        local_attn_size: int, sink_tokens: int):
    """Roll (if needed) and write one layer's new keys/values.

    Args:
      k_cache, v_cache: [B, cache_len, H, D] arrays, or both :class:`~qarvd_jax.models.wan.kv_quant.QuantizedKV`
        (the new keys/values are quantized as they are written; every roll and write moves whole K
        scale groups).
      new_k, new_v: [B, num_new, H, D] (keys already rotated).
      global_end, local_end, current_start: int32 scalars (traced).
      local_attn_size: static window in frames (-1: global, never rolls).
      sink_tokens: static number of leading tokens that never roll.

    Returns:
      ``(k_cache, v_cache, new_local_end)``.
    """
    cache_len = k_cache.shape[1]
    num_new = new_k.shape[1]
    if num_new > cache_len:
        raise ValueError(f"a call writes {num_new} tokens but the KV cache holds only {cache_len}")
    evicted, new_local_end = _roll_plan(global_end, local_end, current_start, num_new, cache_len,
                                        local_attn_size)
    src = None if local_attn_size == -1 else roll_source(cache_len, local_end, evicted, sink_tokens)
    start = new_local_end - num_new
    if kvq.is_quantized(k_cache):
        g = k_cache.group
        if num_new % g or sink_tokens % g:
            raise ValueError(f"quantized KV cache: a call writes {num_new} tokens and the sink holds {sink_tokens}; "
                             f"both must be whole K scale groups of {g} tokens (whole frames)")
        return (kvq.write_quantized(k_cache, new_k, src, start), kvq.write_quantized(v_cache, new_v, src, start),
                new_local_end)
    if src is not None:
        k_cache = jnp.take(k_cache, src, axis=1)
        v_cache = jnp.take(v_cache, src, axis=1)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, new_k.astype(k_cache.dtype), start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, new_v.astype(v_cache.dtype), start, axis=1)
    return k_cache, v_cache, new_local_end
