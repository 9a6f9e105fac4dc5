"""Pluggable attention for the Wan DiT, and the block-causal training mask.

An attention function has the signature::

    attn(q, k, v, *, mask=None, kv_len=None, precision=None) -> out

* ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] (same dtype), ``out`` [B, Lq, H, D] in q's dtype.
* ``mask``: optional bool [Lq, Lk], True = may attend (shared by batch and heads).
* ``kv_len``: optional int32 scalar; keys at positions >= kv_len are invalid (the KV-cache path
  attends a fixed-size cache of which only a prefix is filled). Fused kernels can skip those
  blocks; the reference masks them.
* Scale is 1/sqrt(D); no dropout, no bias.

Register new implementations with :func:`register_attention`; pick one by name in the config.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AttentionFn",
    "block_causal_mask",
    "get_attention",
    "reference_attention",
    "register_attention",
]

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``WanDiTConfig(attention=name)``."""
    _REGISTRY[name] = fn


def get_attention(name: str) -> AttentionFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention implementation {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def _combined_mask(lq: int, lk: int, mask, kv_len):
    m = None
    if mask is not None:
        if mask.shape != (lq, lk):
            raise ValueError(f"attention mask shape {mask.shape} != (Lq, Lk) = {(lq, lk)}")
        m = mask
    if kv_len is not None:
        valid = (jnp.arange(lk) < kv_len)[None, :]
        m = valid if m is None else (m & valid)
    return m


def reference_attention(q, k, v, *, mask=None, kv_len=None, precision=None):
    """Exact softmax attention in jnp: logits and softmax in float32, ``P @ V`` in v's dtype."""
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    lk = k.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32, precision=precision)
    logits = logits * (1.0 / np.sqrt(d))
    m = _combined_mask(lq, lk, mask, kv_len)
    if m is not None:
        logits = jnp.where(m[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
    return out.astype(q.dtype)


def xla_attention(q, k, v, *, mask=None, kv_len=None, precision=None):
    """``jax.nn.dot_product_attention`` (XLA; cuDNN flash attention when available on GPU)."""
    lq, lk = q.shape[1], k.shape[1]
    m = _combined_mask(lq, lk, mask, kv_len)
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn" if m is None else None
    return jax.nn.dot_product_attention(q, k, v, mask=None if m is None else m[None, None],
                                        implementation=impl)


register_attention("reference", reference_attention)
register_attention("xla", xla_attention)


def block_causal_mask(num_frames: int, frame_seq_length: int, num_frame_per_block: int,
                      local_attn_size: int = -1) -> np.ndarray:
    """Token-level training mask of CausalWanModel (True = may attend), shape [L, L].

    Query frame ``f_q`` is in chunk ``c = f_q // nfb``; it may attend key frame ``f_k`` iff
    ``f_k < (c + 1) * nfb`` and, with a local window ``W != -1``, ``f_k >= (c + 1) * nfb - W``
    (no sink in training). The diagonal is always allowed. Built with numpy (static shapes).
    """
    frames = np.repeat(np.arange(num_frames), frame_seq_length)
    chunk_end = (frames // num_frame_per_block + 1) * num_frame_per_block
    fk = frames[None, :]
    end = chunk_end[:, None]
    allowed = fk < end
    if local_attn_size != -1:
        allowed &= fk >= end - local_attn_size
    np.fill_diagonal(allowed, True)
    return allowed
