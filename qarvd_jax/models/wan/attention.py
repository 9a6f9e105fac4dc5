"""Pluggable attention for the Wan DiT, and the block-causal training mask.

An attention function has the signature::

    attn(q, k, v, *, mask=None, kv_len=None, precision=None) -> out

* ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] (same dtype), ``out`` [B, Lq, H, D] in q's dtype.
* ``mask``: optional bool [Lq, Lk], True = may attend (shared by batch and heads).
* ``kv_len``: optional int32 scalar; keys at positions >= kv_len are invalid (the KV-cache path
  attends a fixed-size cache of which only a prefix is filled). Fused kernels can skip those
  blocks; the reference masks them.
* Scale is 1/sqrt(D); no dropout, no bias.
* With a quantized KV cache, ``k``/``v`` are :class:`~qarvd_jax.models.wan.kv_quant.QuantizedKV`
  (logical shape [B, Lk, H, D]) for functions marked ``fn.quantized_kv = True``, which dequantize
  inside (the reference path whole, the blockwise path one key block at a time); other functions get
  them dequantized by the model.

Register new implementations with :func:`register_attention`; pick one by name in the config.

Kernels that jax cannot partition (a Pallas TPU kernel under a multi-device ``jit``) wrap themselves in
``jax.shard_map`` inside an :func:`attention_sharding` context: the training step
(:func:`qarvd_jax.train.qat.train_step`) sets it to its activation shardings (the mesh and the project's
logical-axis rules), and ``"splash"`` splits q/k/v over their ``batch`` and ``heads`` rules.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qarvd_jax.models.wan import kv_quant as kvq

__all__ = [
    "AttentionFn",
    "attention_sharding",
    "block_causal_mask",
    "current_attention_sharding",
    "flash_attention",
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


_SHARDING: contextvars.ContextVar = contextvars.ContextVar("attention_sharding", default=None)


@contextlib.contextmanager
def attention_sharding(sharding: Callable | None):
    """Attention functions traced inside the ``with`` block see ``sharding``: a ``(logical axes, shape) ->
    NamedSharding`` such as :func:`qarvd_jax.train.sharding.activation_sharding` (the mesh and its
    logical-axis rules), or None (no mesh: the default). Kernels that jax cannot partition use it to wrap
    themselves in ``jax.shard_map``; the others ignore it. Enter it inside the jitted function (as
    :func:`~qarvd_jax.train.qat.train_step` does): jax's trace cache does not key on it."""
    token = _SHARDING.set(sharding)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def current_attention_sharding() -> Callable | None:
    """The innermost :func:`attention_sharding` (None outside any)."""
    return _SHARDING.get()


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
    k, v = kvq.dense(k, q.dtype), kvq.dense(v, q.dtype)
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
    """``jax.nn.dot_product_attention`` (XLA; cuDNN flash attention on GPU in bf16/fp16 when there is
    no dense mask: the KV-cache path passes ``kv_len`` as key lengths, which cuDNN handles natively)."""
    lq, lk = q.shape[1], k.shape[1]
    flash = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and mask is None
    if flash:
        lengths = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    m = _combined_mask(lq, lk, mask, kv_len)
    return jax.nn.dot_product_attention(q, k, v, mask=None if m is None else m[None, None])


def blockwise_attention(q, k, v, *, mask=None, kv_len=None, precision=None, block_k: int = 2048):
    """Exact softmax attention with an online softmax over key blocks (flash-style, pure jnp).

    Peak memory is O(B·H·Lq·block_k) instead of O(B·H·Lq·Lk): the real 1.3B KV path (4680 queries x
    32760 cached keys x 12 heads) needs ~0.5 GB of float32 logits per block instead of 7.4 GB. Equal
    to :func:`reference_attention` up to float32 summation order.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if k.shape[0] != b or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if lk <= block_k:
        return reference_attention(q, k, v, mask=mask, kv_len=kv_len, precision=precision)
    if kvq.is_quantized(k) or kvq.is_quantized(v):
        return _blockwise_quantized(q, k, v, mask, kv_len, precision, block_k)
    m = _combined_mask(lq, lk, mask, kv_len)
    nblk = -(-lk // block_k)
    pad = nblk * block_k - lk
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        m = jnp.pad(jnp.ones((1, lk), bool) if m is None else m, ((0, 0), (0, pad)))
    kb = k.reshape(b, nblk, block_k, h, d).swapaxes(0, 1)
    vb = v.reshape(b, nblk, block_k, h, d).swapaxes(0, 1)
    mb = None if m is None else jnp.broadcast_to(m, (m.shape[0], nblk * block_k)).reshape(
        m.shape[0], nblk, block_k).swapaxes(0, 1)
    scale = 1.0 / np.sqrt(d)

    def step(carry, blk):
        kj, vj, mj = blk
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kj, preferred_element_type=jnp.float32, precision=precision) * scale
        return online_softmax_update(carry, s, mj, lambda p: jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32, precision=precision)), None

    (acc, _, denom), _ = jax.lax.scan(step, online_softmax_init(b, h, lq, d), (kb, vb, mb))
    return (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


def online_softmax_init(b: int, h: int, lq: int, d: int):
    """Carry ``(acc [B, H, Lq, D], row_max [B, H, Lq], denom [B, H, Lq])`` of :func:`online_softmax_update`."""
    return (jnp.zeros((b, h, lq, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, lq), jnp.float32))


def online_softmax_update(carry, s, mj, pv):
    """One key block of an online softmax: logits ``s`` [B, H, Lq, bk] (float32, scaled), validity
    ``mj`` [1|Lq, bk] or None, ``pv``: unnormalised probabilities [B, H, Lq, bk] -> ``P @ V`` [B, H, Lq, D]
    float32. The output is ``acc / denom`` after the last block."""
    acc, row_max, denom = carry
    if mj is not None:
        s = jnp.where(mj[None, None], s, -jnp.inf)
    new_max = jnp.maximum(row_max, s.max(-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    p = jnp.exp(s - safe_max[..., None])
    corr = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max, -jnp.inf) - safe_max)
    denom = denom * corr + p.sum(-1)
    acc = acc * corr[..., None] + pv(p)
    return acc, new_max, denom


def kv_block_size(lk: int, block_k: int, *operands) -> int:
    """Key block size for quantized K/V operands: a multiple of every operand's scale group that
    divides ``lk`` (no padding of the codes), the largest one <= ``max(block_k, group)``."""
    g = int(np.lcm.reduce([x.group for x in operands if kvq.is_quantized(x)] or [1]))
    if lk % g:
        raise ValueError(f"{lk} cached keys are not a multiple of the KV scale group ({g} tokens)")
    ng = lk // g
    m = max(c for c in range(1, ng + 1) if ng % c == 0 and c * g <= max(block_k, g))
    return m * g


def _blockwise_quantized(q, k, v, mask, kv_len, precision, block_k: int):
    """:func:`blockwise_attention` over a quantized cache: each key block is dequantized (K and V
    windows, :meth:`~qarvd_jax.models.wan.kv_quant.QuantizedKV.window`) inside the scan, so no float
    copy of the whole cache exists."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bk = kv_block_size(lk, block_k, k, v)
    m = _combined_mask(lq, lk, mask, kv_len)
    scale = 1.0 / np.sqrt(d)

    def window(x, start):
        return x.window(start, bk, q.dtype) if kvq.is_quantized(x) else jax.lax.dynamic_slice_in_dim(
            x, start, bk, axis=1).astype(q.dtype)

    def step(carry, j):
        start = j * bk
        kj, vj = window(k, start), window(v, start)
        mj = None if m is None else jax.lax.dynamic_slice_in_dim(m, start, bk, axis=1)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kj, preferred_element_type=jnp.float32, precision=precision) * scale
        return online_softmax_update(carry, s, mj, lambda p: jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32, precision=precision)), None

    (acc, _, denom), _ = jax.lax.scan(step, online_softmax_init(b, h, lq, d), jnp.arange(lk // bk))
    return (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


# ------------------------------------------------------------------------------------ flash attention
def _kv_valid(lk_pad: int, lk: int, kv_len):
    """Number of valid keys (an int32 scalar): ``min(kv_len, lk)``; padding past ``lk`` is never valid."""
    n = jnp.asarray(lk, jnp.int32)
    return n if kv_len is None else jnp.minimum(jnp.asarray(kv_len, jnp.int32), n)


def _flash_blocks(k, v, mask, block_k: int):
    """Keys/values as [nblk, B, bk, H, D] blocks (zero padded) and the mask as [nblk, Lq, bk] (or None)."""
    b, lk, h, d = k.shape
    nblk = -(-lk // block_k)
    pad = nblk * block_k - lk
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        if mask is not None:
            mask = jnp.pad(mask, ((0, 0), (0, pad)))
    kb = k.reshape(b, nblk, block_k, h, d).swapaxes(0, 1)
    vb = v.reshape(b, nblk, block_k, h, d).swapaxes(0, 1)
    mb = None if mask is None else mask.reshape(mask.shape[0], nblk, block_k).swapaxes(0, 1)
    return kb, vb, mb, nblk


def _block_logits(q, kj, mj, j, n_valid, block_k, scale, precision):
    """Scaled float32 logits [B, H, Lq, bk] of key block ``j`` and its validity [1|Lq, bk] (bool)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kj, preferred_element_type=jnp.float32, precision=precision) * scale
    valid = (j * block_k + jnp.arange(block_k))[None, :] < n_valid
    if mj is not None:
        valid = valid & mj
    return s, valid


def _flash_forward(q, k, v, mask, kv_len, block_k, precision):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / np.sqrt(d)
    kb, vb, mb, nblk = _flash_blocks(k, v, mask, block_k)
    n_valid = _kv_valid(nblk * block_k, lk, kv_len)

    def compute(carry, j, kj, vj, mj):
        acc, row_max, denom = carry
        s, valid = _block_logits(q, kj, mj, j, n_valid, block_k, scale, precision)
        s = jnp.where(valid[None, None], s, -jnp.inf)
        new_max = jnp.maximum(row_max, s.max(-1))
        safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        p = jnp.exp(s - safe[..., None])
        corr = jnp.exp(row_max - safe)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj,
                                                 preferred_element_type=jnp.float32, precision=precision)
        return acc, new_max, denom

    def step(carry, xs):
        j, kj, vj, mj = xs
        # blocks wholly past kv_len are skipped (not masked): no FLOPs on empty cache slots
        carry = jax.lax.cond(j * block_k < n_valid, lambda c: compute(c, j, kj, vj, mj), lambda c: c, carry)
        return carry, None

    init = (jnp.zeros((b, h, lq, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, lq), jnp.float32))
    (acc, row_max, denom), _ = jax.lax.scan(step, init, (jnp.arange(nblk), kb, vb, mb))
    ok = denom > 0
    out = jnp.where(ok[..., None], acc / jnp.where(ok, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(ok, row_max + jnp.log(jnp.where(ok, denom, 1.0)), jnp.inf)  # fully masked row: p = 0
    return out.transpose(0, 2, 1, 3).astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, mask, kv_len, block_k, precision):
    return _flash_forward(q, k, v, mask, kv_len, block_k, precision)[0]


def _flash_fwd(q, k, v, mask, kv_len, block_k, precision):
    out, lse = _flash_forward(q, k, v, mask, kv_len, block_k, precision)
    return out, (q, k, v, mask, kv_len, out, lse)


def _flash_bwd(block_k, precision, res, g):
    """Recomputing backward (FlashAttention-2): one key block at a time, O(B H Lq bk) memory."""
    q, k, v, mask, kv_len, out, lse = res
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / np.sqrt(d)
    kb, vb, mb, nblk = _flash_blocks(k, v, mask, block_k)
    n_valid = _kv_valid(nblk * block_k, lk, kv_len)
    g = g.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(jnp.float32), out.astype(jnp.float32))

    def compute(dq, j, kj, vj, mj):
        s, valid = _block_logits(q, kj, mj, j, n_valid, block_k, scale, precision)
        p = jnp.where(valid[None, None], jnp.exp(s - lse[..., None]), 0.0)  # [B, H, Lq, bk]
        dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(g.dtype), g, preferred_element_type=jnp.float32,
                        precision=precision)
        dp = jnp.einsum("bqhd,bkhd->bhqk", g, vj, preferred_element_type=jnp.float32, precision=precision)
        ds = (p * (dp - delta[..., None])).astype(q.dtype)
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kj, preferred_element_type=jnp.float32,
                             precision=precision) * scale
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32, precision=precision) * scale
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    def skip(dq, *_):
        return dq, (jnp.zeros((b, block_k, h, d), k.dtype), jnp.zeros((b, block_k, h, d), v.dtype))

    def step(dq, xs):
        j, kj, vj, mj = xs
        return jax.lax.cond(j * block_k < n_valid, lambda a: compute(a, j, kj, vj, mj), lambda a: skip(a), dq)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros((b, lq, h, d), jnp.float32), (jnp.arange(nblk), kb, vb, mb))
    dk = dk.swapaxes(0, 1).reshape(b, nblk * block_k, h, d)[:, :lk]
    dv = dv.swapaxes(0, 1).reshape(b, nblk * block_k, h, d)[:, :lk]
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, mask=None, kv_len=None, precision=None, block_k: int = 1024):
    """Exact attention with an O(block) forward *and* backward (for training at the real geometry).

    * GPU, bf16/fp16, no dense mask: cuDNN flash attention (``jax.nn.dot_product_attention``,
      ``key_value_seq_lengths`` = ``kv_len``), which has its own fused backward.
    * Otherwise: a jnp FlashAttention-2 with a ``custom_vjp``: the forward keeps only the output and
      the row log-sum-exp; the backward recomputes each key block's probabilities. Key blocks wholly
      at or past ``kv_len`` are skipped (``lax.cond``), not masked.

    Equal to :func:`reference_attention` up to float32 summation order (rows with no valid key give 0
    instead of NaN).
    """
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and mask is None:
        lengths = None if kv_len is None else jnp.full((b,), kv_len, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    if mask is not None:
        if mask.shape != (lq, k.shape[1]):
            raise ValueError(f"attention mask shape {mask.shape} != (Lq, Lk) = {(lq, k.shape[1])}")
        mask = jnp.asarray(mask, bool)
    block_k = int(min(block_k, k.shape[1]))
    return _flash(q, k, v, mask, None if kv_len is None else jnp.asarray(kv_len, jnp.int32), block_k, precision)


reference_attention.quantized_kv = True
blockwise_attention.quantized_kv = True
register_attention("reference", reference_attention)
register_attention("xla", xla_attention)
register_attention("blockwise", blockwise_attention)
register_attention("flash", flash_attention)


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


from qarvd_jax.models.wan import sage_attention as _sage  # noqa: E402,F401  (registers sage_int8, sage_int8_fp8)
from qarvd_jax.models.wan import splash_attention as _splash  # noqa: E402,F401  (registers splash)
