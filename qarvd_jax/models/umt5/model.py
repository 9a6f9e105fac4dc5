"""umT5 encoder in Flax NNX, numerically faithful to Self-Forcing's ``wan/modules/t5.py`` (``T5Encoder``).

Pre-norm transformer::

    x = token_embedding[ids]                        (no sqrt(D) scaling)
    for each block l:
        x = x + Attn_l(RMSNorm1_l(x), mask, bias_l)  (bias_l: per-block relative bias, umT5)
        x = x + FFN_l(RMSNorm2_l(x))                 (fc2(fc1(x) * gelu_tanh(gate(x))))
    out = RMSNorm(x)

Layouts: ids / mask ``[B, L]``; activations ``[B, L, D]``; Linear kernels ``[in, out]`` (the
PyTorch checkpoint stores ``[out, in]``; ``params.py`` transposes); embeddings ``[rows, features]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.umt5.config import UMT5Config

__all__ = [
    "T5LayerNorm",
    "T5Attention",
    "T5FeedForward",
    "T5RelativeBias",
    "T5Block",
    "UMT5Encoder",
    "relative_position_bucket",
    "gelu_tanh",
    "encoder_forward",
    "encode_prompts",
    "make_prompt_encoder",
]


def relative_position_bucket(rel_pos: jax.Array | np.ndarray, *, num_buckets: int = 32, max_distance: int = 128,
                             bidirectional: bool = True) -> jax.Array:
    """T5 bucket index of ``rel_pos = key_pos - query_pos`` (any int shape -> same shape, int32).

    Bidirectional: ``num_buckets // 2`` buckets per sign, ``rel > 0`` adds that offset. With
    ``n = |rel|`` and ``e = buckets_per_sign // 2``: ``n < e`` -> ``n``; otherwise
    ``e + floor(log(n / e) / log(max_distance / e) * (buckets_per_sign - e))``, capped at
    ``buckets_per_sign - 1``. Computed in float32 like the original, so the table matches it exactly.
    Unidirectional (decoder) buckets use ``n = max(-rel, 0)`` and all ``num_buckets``.
    """
    rel_pos = jnp.asarray(rel_pos).astype(jnp.int32)
    if bidirectional:
        nb = num_buckets // 2
        offset = jnp.where(rel_pos > 0, nb, 0).astype(jnp.int32)
        n = jnp.abs(rel_pos)
    else:
        nb = num_buckets
        offset = jnp.zeros_like(rel_pos)
        n = -jnp.minimum(rel_pos, 0)
    max_exact = nb // 2
    # log of n >= 1 only: n < max_exact takes the exact branch anyway (avoids log(0) = -inf -> int).
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    scale = jnp.float32(math.log(max_distance / max_exact))
    large = max_exact + (jnp.log(nf / max_exact) / scale * (nb - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, nb - 1)
    return offset + jnp.where(n < max_exact, n, large)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (the original's ``GELU``, HF ``gelu_new``)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def _normal(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


def _precision(config: UMT5Config) -> jax.lax.Precision | None:
    return None if config.precision is None else jax.lax.Precision(config.precision)


def _linear(config: UMT5Config, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=config.compute_dtype, param_dtype=config.param_dtype,
                      precision=_precision(config), kernel_init=_normal(std), rngs=rngs)


def _fp16_clamp(x: jax.Array) -> jax.Array:
    """The original clamps float16 activations to +-(max - 1000) when any is inf; a no-op otherwise."""
    if x.dtype != jnp.float16:
        return x
    c = float(jnp.finfo(jnp.float16).max) - 1000.0
    return jnp.where(jnp.isinf(x).any(), jnp.clip(x, -c, c), x)


class T5LayerNorm(nnx.Module):
    """T5 RMS norm over the last axis: ``weight * (x * rsqrt(mean(x^2) + eps))``.

    The mean square and the normalisation run in float32; the result is cast to the compute dtype
    before the (compute-dtype) weight is applied, as the original does for half-precision weights.
    No mean subtraction, no bias. Param: ``weight [D]``.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class T5RelativeBias(nnx.Module):
    """Relative position bias table ``embedding [num_buckets, num_heads]`` -> bias ``[1, H, Lq, Lk]``."""

    def __init__(self, config: UMT5Config, *, bidirectional: bool = True, rngs: nnx.Rngs):
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.bidirectional = bidirectional
        self.embedding = nnx.Embed(config.num_buckets, config.num_heads, dtype=config.compute_dtype,
                                   param_dtype=config.param_dtype,
                                   embedding_init=_normal((2 * config.num_buckets * config.num_heads) ** -0.5),
                                   rngs=rngs)

    def __call__(self, lq: int, lk: int) -> jax.Array:
        rel = jnp.arange(lk, dtype=jnp.int32)[None, :] - jnp.arange(lq, dtype=jnp.int32)[:, None]
        buckets = relative_position_bucket(rel, num_buckets=self.num_buckets, max_distance=self.max_distance,
                                           bidirectional=self.bidirectional)
        return jnp.transpose(self.embedding(buckets), (2, 0, 1))[None]  # [Lq, Lk, H] -> [1, H, Lq, Lk]


class T5Attention(nnx.Module):
    """Multi-head self-attention without the ``1/sqrt(head_dim)`` scaling (T5).

    ``logits[b,h,i,j] = q_i . k_j + bias[h,i,j]``; keys with ``mask == 0`` get the dtype's most
    negative finite value; softmax in float32, cast back to the compute dtype. Padded *queries*
    are computed normally. Params: ``q, k, v: [D, dim_attn]``, ``o: [dim_attn, D]``.
    """

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        d, da = config.dim, config.dim_attn
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.precision = _precision(config)
        self.q = _linear(config, d, da, (d * da) ** -0.5, rngs)
        self.k = _linear(config, d, da, d ** -0.5, rngs)
        self.v = _linear(config, d, da, d ** -0.5, rngs)
        self.o = _linear(config, da, d, (config.num_heads * da) ** -0.5, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, pos_bias: jax.Array | None) -> jax.Array:
        """x ``[B, L, D]``, mask ``[B, L]`` (keys; nonzero = real) or None, pos_bias ``[1|B, H, L, L]``."""
        b, l, _ = x.shape
        split = (b, l, self.num_heads, self.head_dim)
        q, k, v = self.q(x).reshape(split), self.k(x).reshape(split), self.v(x).reshape(split)
        logits = jnp.einsum("binc,bjnc->bnij", q, k, precision=self.precision)
        if pos_bias is not None:
            logits = logits + pos_bias.astype(logits.dtype)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :] != 0, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnij,bjnc->binc", probs, v, precision=self.precision)
        return self.o(out.reshape(b, l, self.num_heads * self.head_dim))


class T5FeedForward(nnx.Module):
    """Gated GELU: ``fc2(fc1(x) * gelu_tanh(gate(x)))``. Params ``gate, fc1: [D, F]``, ``fc2: [F, D]``."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        d, f = config.dim, config.dim_ffn
        self.gate = _linear(config, d, f, d ** -0.5, rngs)
        self.fc1 = _linear(config, d, f, d ** -0.5, rngs)
        self.fc2 = _linear(config, f, d, f ** -0.5, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class T5Block(nnx.Module):
    """One encoder block (``T5SelfAttention`` in the original); owns its bias table unless shared."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        norm = dict(eps=config.eps, dtype=config.compute_dtype, param_dtype=config.param_dtype)
        self.norm1 = T5LayerNorm(config.dim, **norm)
        self.attn = T5Attention(config, rngs=rngs)
        self.norm2 = T5LayerNorm(config.dim, **norm)
        self.ffn = T5FeedForward(config, rngs=rngs)
        self.pos_embedding = None if config.shared_pos else T5RelativeBias(config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, pos_bias: jax.Array | None = None) -> jax.Array:
        if self.pos_embedding is not None:
            pos_bias = self.pos_embedding(x.shape[1], x.shape[1])
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask, pos_bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nnx.Module):
    """umT5 encoder: ``ids [B, L] int, mask [B, L] -> hidden [B, L, D]`` (compute dtype).

    Construct with random weights (``UMT5Encoder(cfg, rngs=nnx.Rngs(0))``) or load a checkpoint with
    :func:`qarvd_jax.models.umt5.params.load_umt5`, which never materialises random weights.
    """

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedding = nnx.Embed(config.vocab_size, config.dim, dtype=config.compute_dtype,
                                         param_dtype=config.param_dtype, embedding_init=_normal(1.0), rngs=rngs)
        self.pos_embedding = T5RelativeBias(config, rngs=rngs) if config.shared_pos else None
        self.blocks = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = T5LayerNorm(config.dim, eps=config.eps, dtype=config.compute_dtype,
                                param_dtype=config.param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
                 return_block_outputs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Encode token ids.

        Args:
          ids: ``[B, L]`` integer token ids.
          mask: ``[B, L]`` attention mask over keys (nonzero = real token) or None (all real).
          return_block_outputs: also return every block's output (before the final norm),
            stacked ``[num_layers, B, L, D]``.

        Returns:
          hidden ``[B, L, D]`` in the compute dtype (padded rows are computed, not zeroed), or
          ``(hidden, block_outputs)``.
        """
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, L], got shape {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} does not match ids shape {ids.shape}")
        x = self.token_embedding(ids)
        l = ids.shape[1]
        pos_bias = self.pos_embedding(l, l) if self.pos_embedding is not None else None
        outs = []
        for block in self.blocks:
            x = block(x, mask, pos_bias)
            if return_block_outputs:
                outs.append(x)
        h = self.norm(x)
        return (h, jnp.stack(outs)) if return_block_outputs else h

    def encode_prompts(self, ids, mask, *, pad_multiple: int | None = None) -> jax.Array:
        """``WanTextEncoder`` output: hidden states with rows ``>= seq_len`` set to 0. See :func:`encode_prompts`."""
        return encode_prompts(self, ids, mask, pad_multiple=pad_multiple)


@nnx.jit(static_argnames=("return_block_outputs",))
def encoder_forward(model: UMT5Encoder, ids: jax.Array, mask: jax.Array, return_block_outputs: bool = False):
    """Jitted ``model(ids, mask, return_block_outputs=...)`` (one compile per shape)."""
    return model(ids, mask, return_block_outputs=return_block_outputs)


def encode_prompts(model: UMT5Encoder, ids, mask, *, pad_multiple: int | None = None) -> jax.Array:
    """Prompt embeddings as Self-Forcing's ``WanTextEncoder`` returns them (``prompt_embeds``).

    Runs the (jitted) encoder and sets every row ``>= seq_len = (mask > 0).sum(1)`` to exactly 0.

    Args:
      model: the encoder.
      ids, mask: ``[B, L]`` (numpy or jax), right-padded as the tokenizer produces them.
      pad_multiple: if set, run the encoder only on the first ``ceil(max(seq_len) / pad_multiple) *
        pad_multiple`` positions (capped at L) and zero-pad the result back to L. Real-token outputs
        do not depend on trailing padding (the mask removes padded keys), so this only changes
        float rounding (~1e-6 in float32) and saves most of the compute for short prompts. The
        skipped positions must have mask 0. ``None`` (default) runs the full length, as the original.

    Returns:
      ``[B, L, D]`` in the compute dtype.
    """
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
    b, l = ids.shape
    seq_lens = (mask > 0).sum(axis=1)
    run_len = l
    if pad_multiple is not None:
        if pad_multiple <= 0:
            raise ValueError(f"pad_multiple must be positive, got {pad_multiple}")
        run_len = min(l, max(1, -(-int(seq_lens.max(initial=1)) // pad_multiple)) * pad_multiple)
        if mask[:, run_len:].any():
            raise ValueError("pad_multiple needs right-padded masks (a real token lies beyond max(seq_len))")
    hidden = encoder_forward(model, jnp.asarray(ids[:, :run_len]), jnp.asarray(mask[:, :run_len]))
    valid = np.arange(run_len)[None, :] < seq_lens[:, None]
    out = jnp.where(jnp.asarray(valid)[..., None], hidden, jnp.zeros((), hidden.dtype))
    if run_len < l:
        out = jnp.pad(out, ((0, 0), (0, l - run_len), (0, 0)))
    return out


def make_prompt_encoder(model: UMT5Encoder, tokenizer: Callable, *, pad_multiple: int | None = None,
                        batch_size: int | None = None) -> Callable[[Sequence[str]], np.ndarray]:
    """``prompts -> np.ndarray [B, text_len, D]``: tokenizer + :func:`encode_prompts`, for the embed cache.

    ``tokenizer(prompts)`` must return ``(ids, mask)`` (e.g. :class:`UMT5Tokenizer`); it does the
    text cleaning. ``batch_size`` bounds how many prompts run through the encoder at once;
    ``pad_multiple`` is passed to :func:`encode_prompts` (``None``: full length, as the original).
    """

    def encode(prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        step = batch_size or max(1, len(prompts))
        chunks = []
        for i in range(0, len(prompts), step):
            ids, mask = tokenizer(prompts[i:i + step])
            chunks.append(np.asarray(encode_prompts(model, ids, mask, pad_multiple=pad_multiple)))
        return np.concatenate(chunks, axis=0)

    return encode
