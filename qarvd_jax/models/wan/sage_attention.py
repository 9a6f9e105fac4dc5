"""SageAttention-style quantized attention: int8 Q·Kᵀ with channel-mean-smoothed K, P·V in bf16 or fp8.

Selectable as ``WanDiTConfig(attention="sage_int8")`` (P·V in bf16) or ``"sage_int8_fp8"`` (P·V in
float8_e4m3fn), for the KV-cache inference path and the training path alike (forward only: no
custom gradient). Steps, for ``q`` [B, Lq, H, D] and ``k``/``v`` [B, Lk, H, D] (arrays or a quantized
cache, :mod:`~qarvd_jax.models.wan.kv_quant`, dequantized first):

1. **Smooth K**: subtract each (batch, head, channel) mean over the valid keys (``kv_len``):
   ``q·(k - m) = q·k - q·m`` and ``q·m`` is the same for every key of a query, so the softmax is
   unchanged while K's per-channel offsets (which int8 per-token scales handle badly) are gone.
2. **int8 Q·Kᵀ**: Q and smoothed K symmetric int8 with one scale per (token, head) (amax / 127),
   ``int8 x int8 -> int32`` dot, logits ``= acc * s_q * s_k / sqrt(D)`` in float32.
3. Softmax online over key blocks of ``block_k`` (float32, :func:`online_softmax_update`).
4. **P·V**: ``"bf16"``: P and V in bfloat16, float32 accumulation. ``"fp8"``: V float8 with one scale
   per (batch, head, channel) over the keys (amax / 448), P (in [0, 1]) times 448 in float8, float32
   accumulation, rescaled by ``s_v / 448``.

Error: each logit moves by at most ``sum_d (|q_d| s_k + |k_d| s_q + s_q s_k / 2) / (2 sqrt(D))`` from
rounding (half an int8 step each); ``tests/test_kv_quant.py`` checks the output against the float
reference within the bound this implies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qarvd_jax.models.wan import kv_quant as kvq
from qarvd_jax.models.wan.attention import (_combined_mask, online_softmax_init, online_softmax_update,
                                            register_attention)

__all__ = ["sage_attention", "sage_fp8_attention", "int8_per_token"]


def int8_per_token(x: jax.Array):
    """Symmetric int8 per (token, head): x [B, L, H, D] -> (codes int8 [B, L, H, D], scale f32 [B, L, H, 1])."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8), scale


def _smoothed_k(k: jax.Array, valid):
    """K minus its per-(batch, head, channel) mean over the valid keys (``valid`` [Lk] bool or None)."""
    kf = k.astype(jnp.float32)
    if valid is None:
        mean = kf.mean(axis=1, keepdims=True)
    else:
        w = valid.astype(jnp.float32)[None, :, None, None]
        mean = (kf * w).sum(axis=1, keepdims=True) / jnp.maximum(w.sum(), 1.0)
    return kf - mean


def sage_attention(q, k, v, *, mask=None, kv_len=None, precision=None, pv: str = "bf16", block_k: int = 2048):
    """Quantized attention (module docstring); same signature and layouts as ``reference_attention``."""
    if pv not in ("bf16", "fp8"):
        raise ValueError(f"sage attention pv={pv!r} is not 'bf16' or 'fp8'")
    b, lq, h, d = q.shape
    k, v = kvq.dense(k, jnp.float32), kvq.dense(v, jnp.float32)
    if k.shape[0] != b or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    lk = k.shape[1]
    m = _combined_mask(lq, lk, mask, kv_len)
    valid = None if kv_len is None else jnp.arange(lk) < kv_len
    qi, sq = int8_per_token(q)
    ki, sk = int8_per_token(_smoothed_k(k, valid))
    if pv == "fp8":
        vmax = jnp.max(jnp.abs(v) if valid is None else jnp.where(valid[None, :, None, None], jnp.abs(v), 0.0),
                       axis=1, keepdims=True)
        sv = jnp.where(vmax > 0, vmax / 448.0, 1.0)  # [B, 1, H, D]
        vc = jnp.clip(v / sv, -448.0, 448.0).astype(jnp.float8_e4m3fn)
        sv_acc = sv.transpose(0, 2, 1, 3) / 448.0  # [B, H, 1, D]
    else:
        vc, sv_acc = v.astype(jnp.bfloat16), None
    bk = int(min(block_k, lk))
    nblk = -(-lk // bk)
    pad = nblk * bk - lk
    if pad:
        ki = jnp.pad(ki, ((0, 0), (0, pad), (0, 0), (0, 0)))
        sk = jnp.pad(sk, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=1.0)
        vc = jnp.pad(vc, ((0, 0), (0, pad), (0, 0), (0, 0)))
        m = jnp.pad(jnp.ones((1, lk), bool) if m is None else m, ((0, 0), (0, pad)))
    blocks = lambda x: x.reshape(x.shape[0], nblk, bk, *x.shape[2:]).swapaxes(0, 1)
    mb = None if m is None else jnp.broadcast_to(m, (m.shape[0], nblk * bk)).reshape(m.shape[0], nblk, bk).swapaxes(0, 1)
    sq_t = sq.transpose(0, 2, 1, 3) * (1.0 / np.sqrt(d))  # [B, H, Lq, 1]

    def step(carry, blk):
        kj, skj, vj, mj = blk
        acc = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.int32)
        s = acc.astype(jnp.float32) * sq_t * skj[..., 0].transpose(0, 2, 1)[:, :, None, :]
        if pv == "fp8":
            def pv_fn(p):
                p8 = (p * 448.0).astype(jnp.float8_e4m3fn)
                return jnp.einsum("bhqk,bkhd->bhqd", p8, vj, preferred_element_type=jnp.float32) * sv_acc
        else:
            def pv_fn(p):
                return jnp.einsum("bhqk,bkhd->bhqd", p.astype(jnp.bfloat16), vj, preferred_element_type=jnp.float32)
        return online_softmax_update(carry, s, mj, pv_fn), None

    (acc, _, denom), _ = jax.lax.scan(step, online_softmax_init(b, h, lq, d), (blocks(ki), blocks(sk), blocks(vc), mb))
    return (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


def sage_fp8_attention(q, k, v, *, mask=None, kv_len=None, precision=None, block_k: int = 2048):
    """:func:`sage_attention` with P·V in fp8 (e4m3)."""
    return sage_attention(q, k, v, mask=mask, kv_len=kv_len, precision=precision, pv="fp8", block_k=block_k)


register_attention("sage_int8", sage_attention)
register_attention("sage_int8_fp8", sage_fp8_attention)
