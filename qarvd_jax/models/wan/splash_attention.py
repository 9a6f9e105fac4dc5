"""Splash attention (jax's Pallas TPU kernel) behind the pluggable attention signature.

Selectable as ``WanDiTConfig(attention="splash")``. A thin adapter around
:mod:`jax.experimental.pallas.ops.tpu.splash_attention`, whose kernel has its own ``custom_vjp``
(separate dq and dk/dv backward kernels), so ``jax.grad`` trains through it:

* **Layouts.** The contract's ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] become [B, H, L, D]
  (head-dim minor); the kernel runs per batch element ([H, L, D]) under ``jax.vmap``. The output is
  transposed back to [B, Lq, H, D] in q's dtype.
* **Scale.** The kernel computes ``softmax(q kᵀ)``: the 1/sqrt(D) scale is applied to q here (in q's
  dtype, so bf16 q is rounded once more than in the reference, which scales float32 logits).
* **Padding.** Sequence lengths are zero-padded to a multiple of 128 (the kernel's lane width) and
  the q / kv blocks are the largest of 512, 256, 128 that divide the padded length. Padded keys are
  masked out; padded query rows get a non-empty mask row (the last real row's, so no extra blocks)
  and are dropped (their zero cotangent adds nothing to dk/dv). The head dim is zero-padded to a
  multiple of 128 too: jax tests the kernel on TPU with head dims 128 and 256 only (D=64 passes the
  Pallas lowering unpadded but is untested on hardware), and zero channels leave q·kᵀ and the first
  D output channels unchanged. The 1.3B model (12 heads x 128) needs no head-dim padding.
* **Mask.** Splash needs the ``[Lq, Lk]`` mask as a concrete (numpy) array at trace time: it is
  turned into a block-sparse table (fully masked blocks are skipped, fully visible ones run without
  a mask) by ``splash_attention_mask.NumpyMask``, shared by all heads (``MultiHeadMask``). The
  training path of :class:`~qarvd_jax.models.wan.model.CausalWanModel` keeps a numpy mask (its
  default :func:`~qarvd_jax.models.wan.attention.block_causal_mask`) numpy under ``jit``; a traced
  mask (e.g. a jnp mask passed as a jit argument) is a ``ValueError``.
* **kv_len** (traced int32 scalar) becomes segment ids: every query is segment 0, keys below
  ``min(kv_len, Lk)`` segment 0, the rest segment 1 (also how padded keys are excluded when there is
  no mask). Those key blocks are masked, not skipped (the table is static); ``"flash"`` skips them.
* ``precision`` is ignored (the kernel's matmuls accumulate in float32).
* **Sharding.** jax does not partition Mosaic kernels (a bare call under a multi-device ``jit`` fails
  to lower: "wrap the call in a shard_map"). Inside an
  :func:`~qarvd_jax.models.wan.attention.attention_sharding` context over more than one device (the QAT
  step sets it to its mesh and logical-axis rules) the kernel runs under ``jax.shard_map``: q/k/v (and
  the output) split as the logical axes ``(batch, None, heads, None)``, i.e. over the mesh axes of the
  ``batch`` rule (default ``data``, ``fsdp``) and of the ``heads`` rule (default ``tensor``), with the
  sequence whole on every device (an activation ``context`` split is gathered first) and kv_len
  replicated; the static mask is shared. Attention is independent per batch element and head, so this
  is exact. A dimension its mesh axes do not divide is replicated, as everywhere in
  :func:`qarvd_jax.train.sharding.partition_spec` (the QAT entry points reject such batch / head
  counts up front); outside a context (or on one device) the kernel is called directly.

On TPU the kernel compiles through Mosaic (``interpret=False`` forces that on any backend, e.g. for
``jax.export(..., platforms=["tpu"])`` from a CPU host). Elsewhere it runs only in the Pallas
interpreter, when asked (``interpret=True`` or a ``pltpu.InterpretParams``; slow, for tests);
otherwise a clear error points at ``"flash"`` / ``"xla"``. The project has no global interpret
switch: the registered ``"splash"`` is the compiled kernel, and tests register
``functools.partial(splash_attention, interpret=True)`` under another name to run the model on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from qarvd_jax.models.wan import kv_quant as kvq
from qarvd_jax.models.wan.attention import current_attention_sharding, register_attention

__all__ = ["splash_attention", "splash_block_size"]

LANES = 128  # sequence and head-dim padding unit (TPU lane width)
BLOCKS = (512, 256, 128)  # candidate q / kv block sizes, largest first
SHARD_AXES = ("batch", None, "heads", None)  # logical axes of q/k/v [B, L, H, D] under shard_map


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_block_size(padded_len: int) -> int:
    """The largest of :data:`BLOCKS` that divides ``padded_len`` (a multiple of 128)."""
    return next(blk for blk in BLOCKS if padded_len % blk == 0)


def _resolve_interpret(interpret):
    """``None``: the compiled kernel on TPU, else a clear error; ``False``: the compiled (Mosaic) kernel on
    any backend (``jax.export(..., platforms=["tpu"])`` from a CPU host); otherwise the interpreter."""
    if interpret is not None:
        return interpret
    if jax.default_backend() == "tpu":
        return False
    raise RuntimeError(
        f"attention='splash' is the Pallas TPU splash-attention kernel and runs on TPU only (backend here: "
        f"{jax.default_backend()!r}); use attention='flash' (jnp flash attention with its own backward) or "
        "'xla' (jax.nn.dot_product_attention, cuDNN on GPU), or interpret=True for the (slow) Pallas interpreter")


def _static_mask(mask, lq: int, lk: int) -> np.ndarray | None:
    """The mask as a concrete numpy bool [Lq, Lk] (or None); a traced mask is a ValueError."""
    if mask is None:
        return None
    if isinstance(mask, jax.core.Tracer):
        raise ValueError(
            "attention='splash' needs a static mask: the [Lq, Lk] mask must be a concrete (numpy) array at trace "
            "time, because the kernel's block-sparsity table is built from it in Python. Pass a numpy mask (the "
            "model's default block_causal_mask is one) or use attention='flash' for a traced mask")
    m = np.asarray(mask, bool)
    if m.shape != (lq, lk):
        raise ValueError(f"attention mask shape {m.shape} != (Lq, Lk) = {(lq, lk)}")
    return m


class _HashedNumpyMask(splash_mask.NumpyMask):
    """A ``NumpyMask`` that hashes its array once: upstream hashes all of it (``tobytes``) on every lookup,
    about a hundred times per kernel build (~60 s of tracing per call at L=32760, 12 heads)."""

    def __post_init__(self):
        super().__post_init__()
        self._hash = hash((splash_mask.NumpyMask, self.array.tobytes()))

    def __hash__(self):
        return self._hash


_LAST_PADDED: list = []  # [(mask, padded shape, padded Mask)]: a model trace passes one mask to every layer


def _pad_mask(m: np.ndarray | None, lq: int, lk: int, lq_p: int, lk_p: int) -> splash_mask.Mask:
    """The padded [Lq_p, Lk_p] mask: without a mask a ``FullMask`` (padded keys go by segment ids: no dense
    table for a long KV cache); else padded key columns False, padded query rows a copy of the last row.
    The last one is reused for the same (unmodified) mask object, so every layer shares its block tables
    (``_process_mask`` is lru-cached upstream)."""
    if m is None:
        return splash_mask.FullMask((lq_p, lk_p))
    if _LAST_PADDED and _LAST_PADDED[0][0] is m and _LAST_PADDED[0][1] == (lq_p, lk_p):
        return _LAST_PADDED[0][2]
    out = np.zeros((lq_p, lk_p), bool)
    out[:lq, :lk] = m
    out[lq:, :lk] = m[-1]  # padded query rows: the last real row's pattern (non-empty; adds no blocks)
    _LAST_PADDED[:] = [(m, (lq_p, lk_p), _HashedNumpyMask(out))]
    return _LAST_PADDED[0][2]


def _to_kernel_layout(x, length: int, d_p: int):
    """[B, L, H, D] -> [B, H, length, d_p], zero padded."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_p - x.shape[3])))
    return x.transpose(0, 2, 1, 3)


def splash_attention(q, k, v, *, mask=None, kv_len=None, precision=None, interpret=None):
    """Exact softmax attention with jax's Pallas TPU splash kernel (forward and backward).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (same dtype; a quantized cache is dequantized first).
      mask: optional *concrete* bool [Lq, Lk], True = may attend (shared by batch and heads).
      kv_len: optional int32 scalar (may be traced); keys at positions >= kv_len are invalid.
      precision: ignored (float32 accumulation inside the kernel).
      interpret: ``None`` (TPU: compiled; elsewhere an error); ``False``: compiled for TPU whatever the
        default backend (cross-platform ``jax.export``); ``True`` or a ``pltpu.InterpretParams``: the
        Pallas interpreter (any backend).

    Returns:
      [B, Lq, H, D] in q's dtype. Equal to :func:`~qarvd_jax.models.wan.attention.reference_attention`
      up to float32 summation order (and the scaling of q in q's dtype, module docstring).

    Inside :func:`~qarvd_jax.models.wan.attention.attention_sharding` on a multi-device mesh the kernel runs
    under ``jax.shard_map`` over the batch and heads (module docstring, "Sharding").
    """
    del precision
    interpret = _resolve_interpret(interpret)
    k, v = kvq.dense(k, q.dtype), kvq.dense(v, q.dtype)
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    lk = k.shape[1]
    m = _static_mask(mask, lq, lk)
    n_valid = None if kv_len is None else jnp.clip(jnp.asarray(kv_len, jnp.int32), 0, lk)
    local = functools.partial(_splash_local, mask=m, interpret=interpret)
    plan = _shard_plan(q.shape, k.shape)
    if plan is None:
        return local(q, k, v, n_valid)
    mesh, q_spec, kv_spec = plan
    args = (q, k, v) if n_valid is None else (q, k, v, n_valid)
    specs = (q_spec, kv_spec, kv_spec, P())[:len(args)]  # kv_len replicated
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _shard_plan(q_shape, k_shape):
    """``(mesh, q spec, k/v spec)`` of the :func:`~qarvd_jax.models.wan.attention.attention_sharding` context
    (:data:`SHARD_AXES` under its rules), or None: no context, or a one-device mesh (call the kernel directly).
    ``check_vma=False`` at the call: the upstream kernel's ``pallas_call`` declares no varying mesh axes."""
    sharding = current_attention_sharding()
    if sharding is None:
        return None
    q_sh, kv_sh = sharding(SHARD_AXES, q_shape), sharding(SHARD_AXES, k_shape)
    if q_sh.mesh.size == 1:
        return None
    return q_sh.mesh, q_sh.spec, kv_sh.spec


def _splash_local(q, k, v, n_valid=None, *, mask, interpret):
    """The kernel on (per-device) [B, L, H, D] operands; ``n_valid``: None or the clipped kv_len."""
    _, lq, h, d = q.shape
    lk = k.shape[1]
    lq_p, lk_p, d_p = _round_up(lq, LANES), _round_up(lk, LANES), _round_up(d, LANES)
    bq, bkv = splash_block_size(lq_p), splash_block_size(lk_p)
    sizes = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                     block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    head_mask = _pad_mask(mask, lq, lk, lq_p, lk_p)
    kernel = splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * h), block_sizes=sizes,
                                           head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = None
    if n_valid is not None or (mask is None and lk_p > lk):  # (a given mask already excludes padded keys)
        n_valid = lk if n_valid is None else n_valid
        segments = splash_kernel.SegmentIds(q=jnp.zeros((lq_p,), jnp.int32),
                                            kv=(jnp.arange(lk_p) >= n_valid).astype(jnp.int32))
    qs = (q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)).astype(q.dtype)
    out = jax.vmap(lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=segments))(
        _to_kernel_layout(qs, lq_p, d_p), _to_kernel_layout(k, lk_p, d_p), _to_kernel_layout(v, lk_p, d_p))
    return out[:, :, :lq, :d].transpose(0, 2, 1, 3).astype(q.dtype)


register_attention("splash", splash_attention)
