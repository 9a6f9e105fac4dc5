"""Flax NNX port of Self-Forcing's CausalWanModel (causal Wan2.1 DiT).

Layouts: latents are ``[B, F, C, H, W]`` (the Self-Forcing wrapper's convention), timesteps
``[B, F]`` floats (one per latent frame), text context ``[B, Lc, text_dim]`` with ``Lc <= text_len``.
Tokens are ordered frame-major, then patch row, then patch column.

Two entry points share every layer:

* :meth:`CausalWanModel.__call__` — training path: the whole sequence at once with the
  block-causal mask (optionally a local window), no KV cache.
* :meth:`CausalWanModel.forward_chunk` — inference path: one chunk of new frames attending an
  explicit :class:`~qarvd_jax.models.wan.kv_cache.KVCache` (returned updated) and a precomputed
  :class:`~qarvd_jax.models.wan.kv_cache.CrossKV`. ``current_start`` may be traced, so a single
  compilation serves every chunk, denoising step and context pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan import kv_cache as kvc
from qarvd_jax.models.wan import kv_quant as kvq
from qarvd_jax.models.wan.attention import block_causal_mask, get_attention
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.rope import apply_rope, rope_cos_sin, sinusoidal_embedding

__all__ = ["CausalWanModel", "BlockStack", "block_stack_plan", "patchify", "unpatchify"]


def _dtype(name: str):
    return jnp.dtype(name)


def _precision(cfg: WanDiTConfig):
    return None if cfg.matmul_precision == "default" else jax.lax.Precision[cfg.matmul_precision.upper()]


def layer_norm(x: jax.Array, eps: float, scale=None, bias=None) -> jax.Array:
    """LayerNorm over the last dim, biased variance, statistics in float32, cast back to x.dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """WanRMSNorm: ``x * rsqrt(mean(x^2) + eps)`` in float32, cast back, then times ``scale`` [dim]."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return y * self.scale[...].astype(x.dtype)


class AffineLayerNorm(nnx.Module):
    """``norm3``: LayerNorm with learned scale and bias (statistics in float32)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


def _linear(cfg: WanDiTConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                      precision=_precision(cfg), rngs=rngs)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class _QKVNorms(nnx.Module):
    """q/k/v/o projections with full-width RMSNorm on q and k (shared by self and cross attention)."""

    def __init__(self, cfg: WanDiTConfig, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = _linear(cfg, cfg.dim, cfg.dim, rngs)
        self.k = _linear(cfg, cfg.dim, cfg.dim, rngs)
        self.v = _linear(cfg, cfg.dim, cfg.dim, rngs)
        self.o = _linear(cfg, cfg.dim, cfg.dim, rngs)
        pdt = _dtype(cfg.param_dtype)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps, param_dtype=pdt) if cfg.qk_norm else None
        self.norm_k = RMSNorm(cfg.dim, cfg.eps, param_dtype=pdt) if cfg.qk_norm else None

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def project_q(self, x):
        q = self.q(x)
        return self._heads(self.norm_q(q) if self.norm_q is not None else q)

    def project_kv(self, x):
        k = self.k(x)
        k = self.norm_k(k) if self.norm_k is not None else k
        return self._heads(k), self._heads(self.v(x))

    def output(self, attn):
        return self.o(attn.reshape(*attn.shape[:-2], -1))


class SelfAttention(_QKVNorms):
    """CausalWanSelfAttention with RoPE on q/k; training (masked) and KV-cache modes."""


class CrossAttention(_QKVNorms):
    """WanT2VCrossAttention: full attention over every text token, no mask."""


class CausalWanBlock(nnx.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: WanDiTConfig, rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        self.eps = cfg.eps
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, cfg.dim), pdt) / cfg.dim ** 0.5)
        self.self_attn = SelfAttention(cfg, rngs)
        self.norm3 = AffineLayerNorm(cfg.dim, cfg.eps, param_dtype=pdt) if cfg.cross_attn_norm else None
        self.cross_attn = CrossAttention(cfg, rngs)
        self.ffn = nnx.Sequential(_linear(cfg, cfg.dim, cfg.ffn_dim, rngs), _gelu_tanh,
                                  _linear(cfg, cfg.ffn_dim, cfg.dim, rngs))

    def __call__(self, x, e0, cross_k, cross_v, self_attend, attn_fn, ffn_hidden=None):
        """One block.

        Args:
          x: [B, F, S, dim] residual stream (frames x tokens per frame).
          e0: [B, F, 6, dim] time projection.
          cross_k, cross_v: [B, Lc, H, D] precomputed cross-attention keys/values.
          self_attend: ``(SelfAttention, h [B, L, dim]) -> [B, L, dim]`` (mask or KV-cache mode).
          attn_fn: attention function (unmasked) used for cross-attention.
          ffn_hidden: optional ``h [B, L, ffn_dim] -> h`` applied to the FFN hidden activations (a sharding
            constraint); None: ``ffn`` as one Sequential.
        """
        b, f, s, dim = x.shape
        mod = self.modulation[...].astype(e0.dtype)[:, None] + e0  # [B, F, 6, dim]
        m = [mod[:, :, i][:, :, None, :] for i in range(6)]  # each [B, F, 1, dim]
        h = (layer_norm(x, self.eps) * (1 + m[1]) + m[0]).reshape(b, f * s, dim)
        y = self_attend(self.self_attn, h).reshape(b, f, s, dim)
        x = x + y * m[2]
        xt = x.reshape(b, f * s, dim)
        xn = self.norm3(xt) if self.norm3 is not None else xt
        q = self.cross_attn.project_q(xn)
        cross = self.cross_attn.output(attn_fn(q, cross_k, cross_v))
        x = x + cross.reshape(b, f, s, dim)
        h = (layer_norm(x, self.eps) * (1 + m[4]) + m[3]).reshape(b, f * s, dim)
        if ffn_hidden is None:
            y = self.ffn(h)
        else:
            up, act, down = self.ffn.layers
            y = down(ffn_hidden(act(ffn_hidden(up(h)))))
        return x + y.reshape(b, f, s, dim) * m[5]


class CausalHead(nnx.Module):
    """Output head: per-frame modulation from ``e`` (not ``e0``): shift, scale; then a Linear."""

    def __init__(self, cfg: WanDiTConfig, rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        self.eps = cfg.eps
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 2, cfg.dim), pdt) / cfg.dim ** 0.5)
        self.head = _linear(cfg, cfg.dim, cfg.patch_features * cfg.out_dim, rngs)

    def __call__(self, x, e):
        """x [B, F, S, dim], e [B, F, dim] -> [B, F*S, prod(patch)*out_dim]."""
        b, f, s, dim = x.shape
        mod = self.modulation[...].astype(e.dtype)[:, None] + e[:, :, None, :]  # [B, F, 2, dim]
        shift, scale = mod[:, :, 0][:, :, None], mod[:, :, 1][:, :, None]
        return self.head((layer_norm(x, self.eps) * (1 + scale) + shift).reshape(b, f * s, dim))


def patchify(x: jax.Array, patch_size) -> jax.Array:
    """[B, F, C, H, W] -> tokens [B, F'*H'*W', C*pt*ph*pw] (features ordered c, pt, ph, pw)."""
    pt, ph, pw = patch_size
    return einops.rearrange(x, "b (f pt) c (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: jax.Array, grid, patch_size, out_dim: int) -> jax.Array:
    """Head output [B, L, pt*ph*pw*C] (c fastest) -> [B, F, C, H, W]."""
    f, h, w = grid
    pt, ph, pw = patch_size
    return einops.rearrange(tokens, "b (f h w) (pt ph pw c) -> b (f pt) c (h ph) (w pw)",
                            f=f, h=h, w=w, pt=pt, ph=ph, pw=pw, c=out_dim)


def _kv_operand(x, dtype, attn_fn):
    """A cache entry as the attention's K/V operand: a float array cast to ``dtype`` (as always); a
    :class:`~qarvd_jax.models.wan.kv_quant.QuantizedKV` passed through to attention functions that
    dequantize inside (``attn_fn.quantized_kv``), else dequantized whole here."""
    if not kvq.is_quantized(x):
        return x.astype(dtype)
    return x if getattr(attn_fn, "quantized_kv", False) else kvq.dense(x, dtype)


def _block_signature(blk: nnx.Module, state) -> tuple:
    """What a block's compute depends on, apart from per-layer names: module types and static
    settings (a QuantLinear's config without its name) and the state's structure, shapes and dtypes."""
    parts = []
    for path, node in nnx.iter_graph(blk):
        if isinstance(node, nnx.Module):
            cfg = getattr(node, "cfg", None)
            if dataclasses.is_dataclass(cfg) and hasattr(cfg, "name"):
                cfg = dataclasses.replace(cfg, name="")
            parts.append((path, type(node).__name__, cfg, getattr(node, "collect", None)))
    leaves, treedef = jax.tree.flatten(state)
    return tuple(parts), treedef, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves)


def block_stack_plan(model: "CausalWanModel") -> tuple[Any, ...]:
    """Graph definitions for running the transformer blocks from per-block states (training path).

    Returns ``(graphdef,)`` when every block computes the same way up to its weights (same module
    types, quantizer settings and state shapes: the blocks can be stacked and scanned), else one
    graphdef per block (e.g. dual-scale layers with different outlier counts: a Python loop).
    """
    sigs = [_block_signature(b, nnx.state(b)) for b in model.blocks]
    if all(sig == sigs[0] for sig in sigs[1:]):
        return (nnx.graphdef(model.blocks[0]),)
    return tuple(nnx.graphdef(b) for b in model.blocks)


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """The transformer blocks as explicit states, for :meth:`CausalWanModel.forward_chunk` in training.

    Attributes:
      graphdefs: from :func:`block_stack_plan`; one graphdef: ``states`` are stacked over a leading
        layer axis and the blocks run under ``lax.scan``; one per block: ``states`` is a list and the
        blocks run in a Python loop.
      states: a tuple of state trees (e.g. ``(trainable, frozen)``), each stacked or a per-block list.
      remat_policy: ``None`` (no rematerialisation) or a ``jax.checkpoint`` policy: each block is
        rematerialised in the backward pass, saving what the policy allows (``nothing_saveable``:
        only the block inputs).
      constrain: optional ``(kind, x) -> x`` sharding constraint of activations, kind ``"hidden"``
        (block input [B, F, S, dim]), ``"heads"`` (q/k/v [B, L, H, D]) or ``"mlp"`` (FFN hidden
        [B, L, ffn_dim]); None: XLA decides.
    """

    graphdefs: tuple
    states: tuple
    remat_policy: Callable | None = None
    constrain: Callable | None = None

    @property
    def scanned(self) -> bool:
        return len(self.graphdefs) == 1


def _scan_or_loop(blocks: BlockStack, body, carry, xs):
    """``lax.scan(body, carry, (states, *xs))`` over stacked blocks, or the same as a Python loop."""
    if blocks.remat_policy is not None:
        body = jax.checkpoint(body, policy=blocks.remat_policy, prevent_cse=not blocks.scanned)
    if blocks.scanned:
        gdef = blocks.graphdefs[0]
        return jax.lax.scan(lambda c, x: body(c, (gdef, x[0]), x[1:]), carry, (blocks.states, *xs))
    ys = []
    for i, gdef in enumerate(blocks.graphdefs):
        carry, y = body(carry, (gdef, tuple(s[i] for s in blocks.states)), jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class CausalWanModel(nnx.Module):
    """Self-Forcing CausalWanModel (T2V) in Flax NNX. See the module docstring for layouts."""

    def __init__(self, config: WanDiTConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.patch_embedding = _linear(cfg, cfg.in_dim * cfg.patch_features, cfg.dim, rngs)
        self.text_embedding = nnx.Sequential(_linear(cfg, cfg.text_dim, cfg.dim, rngs), _gelu_tanh,
                                             _linear(cfg, cfg.dim, cfg.dim, rngs))
        self.time_embedding = nnx.Sequential(_linear(cfg, cfg.freq_dim, cfg.dim, rngs), jax.nn.silu,
                                             _linear(cfg, cfg.dim, cfg.dim, rngs))
        self.time_projection = nnx.Sequential(jax.nn.silu, _linear(cfg, cfg.dim, 6 * cfg.dim, rngs))
        self.blocks = nnx.List([CausalWanBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.head = CausalHead(cfg, rngs)

    # -------------------------------------------------------------------------------- helpers
    @property
    def _attn(self):
        return get_attention(self.config.attention)

    def _grid(self, x: jax.Array) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"latents must be [B, F, C={cfg.in_dim}, H, W], got {x.shape}")
        _, f, _, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent [F, H, W] = {(f, h, w)} is not a multiple of patch_size {cfg.patch_size}")
        return f // pt, h // ph, w // pw

    def embed_text(self, context: jax.Array) -> jax.Array:
        """[B, Lc, text_dim] -> [B, text_len, dim]; rows past Lc are zero-padded before the MLP."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim={cfg.text_dim}], got {context.shape}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        pad = cfg.text_len - context.shape[1]
        context = jnp.pad(context.astype(_dtype(cfg.dtype)), ((0, 0), (0, pad), (0, 0)))
        return self.text_embedding(context)

    def embed_time(self, t: jax.Array):
        """t [B, F] -> (e [B, F, dim], e0 [B, F, 6, dim]); sinusoid in float32 (high precision)."""
        cfg = self.config
        s = sinusoidal_embedding(t, cfg.freq_dim).astype(_dtype(cfg.dtype))
        e = self.time_embedding(s)
        e0 = self.time_projection(e).reshape(*t.shape, 6, cfg.dim)
        return e, e0

    def cross_kv(self, context: jax.Array, *, blocks: BlockStack | None = None) -> kvc.CrossKV:
        """Text context [B, Lc, text_dim] -> per-layer cross-attention K/V (computed once per video).

        With ``blocks`` (training): K/V come from the given block states, stacked [L, B, Lc, H, D].
        """
        ctx = self.embed_text(context)
        if blocks is not None:
            def body(c, blk, _):
                gdef, states = blk
                return c, nnx.merge(gdef, *states).cross_attn.project_kv(ctx)

            plain = BlockStack(blocks.graphdefs, blocks.states, None)
            _, (ks, vs) = _scan_or_loop(plain, body, 0, ())
            return kvc.CrossKV(k=ks, v=vs)
        ks, vs = zip(*(blk.cross_attn.project_kv(ctx) for blk in self.blocks))
        return kvc.CrossKV(k=tuple(ks), v=tuple(vs))

    def _check_t(self, t, grid):
        if t.ndim != 2 or t.shape[1] != grid[0]:
            raise ValueError(f"timesteps must be [B, F'={grid[0]}] (one per patched frame), got {t.shape}")

    def _run(self, x, t, cross: kvc.CrossKV, attend, taps):
        cfg = self.config
        grid = self._grid(x)
        self._check_t(t, grid)
        b = x.shape[0]
        tokens = self.patch_embedding(patchify(x.astype(_dtype(cfg.dtype)), cfg.patch_size))
        e, e0 = self.embed_time(t)
        if taps is not None:
            taps.update(patch_tokens=tokens, time_embedding=e, time_projection=e0)
            taps["block_out"] = []
        h = tokens.reshape(b, grid[0], grid[1] * grid[2], cfg.dim)
        attn_fn, prec = self._attn, _precision(cfg)

        def cross_attend(q, k, v):
            return attn_fn(q, k, v, precision=prec)

        for i, blk in enumerate(self.blocks):
            h = blk(h, e0, cross.k[i], cross.v[i], lambda attn, hx, i=i: attend(i, attn, hx), cross_attend)
            if taps is not None:
                taps["block_out"].append(h.reshape(b, -1, cfg.dim))
        out = self.head(h, e)
        if taps is not None:
            taps["head_out"] = out
        return unpatchify(out, grid, cfg.patch_size, cfg.out_dim)

    # ---------------------------------------------------------------------------- training path
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, *, taps: dict | None = None,
                 attn_mask=None) -> jax.Array:
        """Training path over the whole sequence with the block-causal mask.

        Args:
          x: noisy latents [B, F, C, H, W].
          t: per-frame float timesteps [B, F] (F counted after temporal patching).
          context: text embeddings [B, Lc, text_dim], Lc <= text_len (zero rows are *not* masked).
          taps: optional dict filled with intermediate activations (patch_tokens, time_embedding,
            time_projection, text_embedding, block_out list, head_out) for parity checks.
          attn_mask: optional bool [L, L] token mask replacing the block-causal one (True = attend).

        Returns:
          flow prediction [B, F, C, H, W] in the compute dtype.
        """
        cfg = self.config
        grid = self._grid(x)
        fsl = grid[1] * grid[2]
        if attn_mask is None:
            attn_mask = block_causal_mask(grid[0], fsl, cfg.num_frame_per_block, cfg.local_attn_size)
        # a numpy mask stays numpy (concrete under jit: attention='splash' builds its block table from it)
        mask = np.asarray(attn_mask, bool) if isinstance(attn_mask, np.ndarray) else jnp.asarray(attn_mask, bool)
        cos, sin = rope_cos_sin(grid, 0, cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        ctx = self.embed_text(context)
        if taps is not None:
            taps["text_embedding"] = ctx
        ks, vs = zip(*(blk.cross_attn.project_kv(ctx) for blk in self.blocks))
        attn_fn, prec = self._attn, _precision(cfg)

        def attend(_, attn: SelfAttention, h):
            q = apply_rope(attn.project_q(h), cos, sin)
            k, v = attn.project_kv(h)
            return attn.output(attn_fn(q, apply_rope(k, cos, sin), v, mask=mask, precision=prec))

        return self._run(x, t, kvc.CrossKV(ks, vs), attend, taps)

    # --------------------------------------------------------------------------- inference path
    def init_cache(self, batch: int, num_frames: int, frame_seq_length: int, dtype=None, *, kv_cache: str = "bf16",
                   sink_float: bool = False) -> kvc.KVCache:
        """Empty self-attention cache sized for ``num_frames`` latent frames (or the local window);
        ``kv_cache``/``sink_float`` as :func:`~qarvd_jax.models.wan.kv_cache.new_cache`."""
        return kvc.new_cache(self.config, batch, num_frames, frame_seq_length, dtype, kv_cache=kv_cache,
                             sink_float=sink_float)

    def forward_chunk(self, x: jax.Array, t: jax.Array, cross: kvc.CrossKV, cache: kvc.KVCache,
                      current_start: jax.Array | int, *,
                      blocks: BlockStack | None = None) -> tuple[jax.Array, kvc.KVCache]:
        """One inference call on a chunk of new frames, attending (and updating) the KV cache.

        Args:
          x: [B, Fc, C, H, W] latents of the chunk; t: [B, Fc] timesteps.
          cross: cross-attention K/V from :meth:`cross_kv`.
          cache: self-attention cache; ``current_start``: absolute index of the chunk's first token
            (int32 scalar, may be traced).

        Returns:
          ``(flow [B, Fc, C, H, W], updated cache)``. RoPE uses absolute frame positions
          ``current_start // frame_seq_length + f``.

        With ``blocks`` (the training path, :class:`BlockStack`): the blocks run from those states
        (``lax.scan`` over stacked blocks, optionally rematerialised per block), ``cross`` and
        ``cache`` hold stacked [L, ...] arrays, each layer attends its old cache plus the chunk's new
        keys (written in place of the same slots), and the new keys are written into the stacked
        cache after the blocks. Same numbers as the per-layer path.
        """
        if blocks is not None:
            if kvq.is_quantized(cache.k[0] if isinstance(cache.k, (tuple, list)) else cache.k):
                raise ValueError("a quantized KV cache (kv_cache int8/fp8/int4) is for inference only: the stacked "
                                 "training path (forward_chunk with blocks=...) needs the bf16 cache")
            return self._forward_chunk_blocks(x, t, cross, cache, current_start, blocks)
        cfg = self.config
        grid = self._grid(x)
        fsl = grid[1] * grid[2]
        current_start = jnp.asarray(current_start, jnp.int32)
        cos, sin = rope_cos_sin(grid, current_start // fsl, cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        attn_fn, prec = self._attn, _precision(cfg)
        new_k, new_v, new_local = list(cache.k), list(cache.v), [cache.local_end]

        def attend(i, attn: SelfAttention, h):
            q = apply_rope(attn.project_q(h), cos, sin)
            k, v = attn.project_kv(h)
            kc, vc, local_end = kvc.advance_layer_cache(
                cache.k[i], cache.v[i], apply_rope(k, cos, sin), v, global_end=cache.global_end,
                local_end=cache.local_end, current_start=current_start, local_attn_size=cfg.local_attn_size,
                sink_tokens=cfg.sink_size * fsl)
            new_k[i], new_v[i] = kc, vc
            new_local[0] = local_end
            out = attn_fn(q, _kv_operand(kc, q.dtype, attn_fn), _kv_operand(vc, q.dtype, attn_fn), kv_len=local_end,
                          precision=prec)
            return attn.output(out)

        flow = self._run(x, t, cross, attend, None)
        current_end = current_start + grid[0] * fsl
        new_cache = kvc.KVCache(k=tuple(new_k), v=tuple(new_v), global_end=current_end.astype(jnp.int32),
                                local_end=new_local[0])
        return flow, new_cache

    def _forward_chunk_blocks(self, x, t, cross: kvc.CrossKV, cache: kvc.KVCache, current_start,
                              blocks: BlockStack):
        cfg = self.config
        grid = self._grid(x)
        self._check_t(t, grid)
        fsl = grid[1] * grid[2]
        b = x.shape[0]
        current_start = jnp.asarray(current_start, jnp.int32)
        cos, sin = rope_cos_sin(grid, current_start // fsl, cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        attn_fn, prec = self._attn, _precision(cfg)
        sink = cfg.sink_size * fsl
        num_new = grid[0] * fsl
        cache_len = cache.k.shape[2]
        evicted, local_end = kvc._roll_plan(cache.global_end, cache.local_end, current_start, num_new, cache_len,
                                            cfg.local_attn_size)

        def cross_attend(q, k, v):
            return attn_fn(q, k, v, precision=prec)

        cons = blocks.constrain or (lambda _kind, a: a)
        ffn_hidden = (lambda a: blocks.constrain("mlp", a)) if blocks.constrain is not None else None

        def body(h, blk, xs):
            gdef, states = blk
            ck, cv, k_old, v_old = xs
            block = nnx.merge(gdef, *states)
            new = []
            h = cons("hidden", h)

            def self_attend(attn, hx):
                q = cons("heads", apply_rope(attn.project_q(hx), cos, sin))
                k, v = attn.project_kv(hx)
                k, v = cons("heads", apply_rope(k, cos, sin)), cons("heads", v)
                kc, vc, _ = kvc.advance_layer_cache(
                    k_old, v_old, k, v, global_end=cache.global_end, local_end=cache.local_end,
                    current_start=current_start, local_attn_size=cfg.local_attn_size, sink_tokens=sink)
                new.append((k.astype(k_old.dtype), v.astype(v_old.dtype)))
                return attn.output(attn_fn(q, kc.astype(q.dtype), vc.astype(q.dtype), kv_len=local_end,
                                           precision=prec))

            h = block(h, e0, ck, cv, self_attend, cross_attend, ffn_hidden)
            return h, new[0]

        tokens = self.patch_embedding(patchify(x.astype(_dtype(cfg.dtype)), cfg.patch_size))
        e, e0 = self.embed_time(t)
        h = tokens.reshape(b, grid[0], fsl, cfg.dim)
        h, (new_k, new_v) = _scan_or_loop(blocks, body, h, (cross.k, cross.v, cache.k, cache.v))
        flow = unpatchify(self.head(h, e), grid, cfg.patch_size, cfg.out_dim)
        k_all, v_all = cache.k, cache.v
        if cfg.local_attn_size != -1:  # the same roll as advance_layer_cache, on every layer at once
            src = kvc.roll_source(cache_len, cache.local_end, evicted, sink)
            k_all, v_all = jnp.take(k_all, src, axis=2), jnp.take(v_all, src, axis=2)
        slot = local_end - num_new
        k_all = jax.lax.dynamic_update_slice_in_dim(k_all, new_k, slot, axis=2)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_all, new_v, slot, axis=2)
        new_cache = kvc.KVCache(k=k_all, v=v_all, global_end=(current_start + num_new).astype(jnp.int32),
                                local_end=local_end)
        return flow, new_cache
