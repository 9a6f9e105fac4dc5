"""Building blocks of the Wan2.1 causal VAE in Flax NNX, channels-last.

Every activation here is ``(B, T, H, W, C)``. The public model (``model.py``) converts from and to
the original ``B,C,T,H,W`` layout.

Feature-cache protocol (replaces the original's mutable ``feat_cache`` list + ``feat_idx`` counter)
----------------------------------------------------------------------------------------------------
A *cached layer* has an int ``num_cache_slots`` and is called as ``y, new_cache = layer(x, cache)``:

* ``cache=None``: a bare call, exactly the original ``feat_cache=None``. Causal convs see zero frames
  before frame 0 and ``Resample`` works on space only. ``new_cache`` is ``None``.
* ``cache`` is a tuple of ``num_cache_slots`` entries, each ``None`` (fresh: the first call of a
  stream, the original's ``None`` slot) or an array. ``new_cache`` is the updated tuple, always of
  arrays with shapes that no longer change, so a stream's later steps can run in ``lax.scan`` / jit.

Slot contents (channels-last):

* ordinary causal conv (kernel 3 in time): the last 2 frames of its input, ``(B, 2, H, W, C)``. A
  fresh slot behaves like zeros, which is what the original's shrinking zero padding amounts to.
* ``upsample3d``: the same, for its ``time_conv``. A fresh slot is the original's first-frame rule:
  no temporal conv, the frame passes through once, and the slot becomes zeros (the ``'Rep'``
  marker, whose only effect is zero context for the next call).
* ``downsample3d``: the last frame after the spatial downsampling, ``(B, 1, H, W, C)``. A fresh slot:
  frames pass through unchanged (no temporal conv) and the last one is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "AttentionBlock",
    "Cache",
    "CausalConv3d",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "RESAMPLE_MODES",
    "apply_cached",
    "upsample_nearest2x",
]

Cache = tuple[jax.Array | None, ...] | None
RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

# PyTorch's default Conv init (kaiming_uniform with a=sqrt(5)); only used for un-loaded models.
_torch_like_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 on H and W of ``(..., H, W, C)`` (``nn.Upsample(mode='nearest-exact')``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def apply_cached(layers: Sequence[Any], x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Run cached layers in order, handing each its slice of the flat ``cache`` tuple."""
    new_slots: list[jax.Array] = []
    pos = 0
    for layer in layers:
        n = layer.num_cache_slots
        part = None if cache is None else tuple(cache[pos:pos + n])
        x, part = layer(x, part)
        pos += n
        if part is not None:
            new_slots.extend(part)
    if cache is not None and pos != len(cache):
        raise ValueError(f"cache has {len(cache)} slots, these layers use {pos}")
    return x, (None if cache is None else tuple(new_slots))


class CausalConv3d(nnx.Module):
    """3D convolution, causal in time: ``padding=(pT, pH, pW)`` pads pH/pW symmetrically in space and
    ``2*pT`` frames in front (none behind). Kernel ``(kT, kH, kW, Cin, Cout)``, bias ``(Cout,)``.

    ``__call__(x, cache)`` follows the module's cache protocol; with ``2*pT > 0`` it uses one slot holding
    the last ``2*pT`` input frames (these replace the zero frames). ``x``: ``(B, T, H, W, Cin)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: str | None = None,
                 rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _triple(kernel_size), _triple(stride)
        pt, self.pad_h, self.pad_w = _triple(padding)
        self.time_pad = 2 * pt
        self.num_cache_slots = 1 if self.time_pad else 0
        self.dtype, self.precision = dtype, precision
        shape = (*self.kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(_torch_like_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))

    def conv(self, x: jax.Array) -> jax.Array:
        """The convolution on already time-padded ``x`` (no temporal padding is added).

        On CPU it runs as a sum over the ``kT`` temporal taps of 2D convolutions on frames (the same
        math, summed in another order): XLA:CPU runs small-channel 2D convolutions 3-5x faster than
        3D ones, forward and backward (measured in ``docs/testbed.md``)."""
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        spatial = ((self.pad_h, self.pad_h), (self.pad_w, self.pad_w))
        if jax.default_backend() != "cpu":
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.stride, padding=((0, 0), *spatial),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
            return y + self.bias[...].astype(self.dtype)
        kt, st = self.kernel_size[0], self.stride[0]
        t_out = (x.shape[1] - kt) // st + 1
        if t_out < 1:
            raise ValueError(f"CausalConv3d: {x.shape[1]} frames are fewer than the temporal kernel {kt}")
        y = None
        for i in range(kt):
            frames = x[:, i:i + st * (t_out - 1) + 1:st]
            b, t = frames.shape[:2]
            yi = jax.lax.conv_general_dilated(
                frames.reshape(b * t, *frames.shape[2:]), kernel[i], window_strides=self.stride[1:],
                padding=spatial, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
            y = yi if y is None else y + yi
        y = y.reshape(b, t, *y.shape[1:])
        return y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        p = self.time_pad
        if p == 0:
            return self.conv(x), (None if cache is None else ())
        history = None if cache is None else cache[0]
        if history is None:
            history = jnp.zeros((x.shape[0], p, *x.shape[2:]), x.dtype)
        elif history.shape[1] != p:
            raise ValueError(f"cache slot has {history.shape[1]} frames, this conv needs {p}")
        full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        return self.conv(full), (None if cache is None else (full[:, -p:],))


class RMSNorm(nnx.Module):
    """Wan's ``RMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels (last axis).

    No mean subtraction, no bias. ``images`` only records the original gamma layout (``[C,1,1]`` for
    the attention norm, ``[C,1,1,1]`` otherwise); the math is the same. Low-precision inputs are
    normalised in float32 and cast back.
    """

    def __init__(self, dim: int, *, images: bool = False, param_dtype: Any = jnp.float32):
        self.dim, self.images = dim, images
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * math.sqrt(self.dim) * self.gamma[...].astype(xf.dtype)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x)``; 3x3x3 causal convs, 2 cache slots.

    ``shortcut`` is a 1x1x1 conv when ``in_dim != out_dim`` (never cached), else identity.
    ``x``: ``(B, T, H, W, in_dim)`` -> ``(B, T, H, W, out_dim)``.
    """

    num_cache_slots = 2

    def __init__(self, in_dim: int, out_dim: int, *, dtype: Any, param_dtype: Any,
                 precision: str | None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        h = x if self.shortcut is None else self.shortcut(x)[0]
        c1, c2 = (None, None) if cache is None else ((cache[0],), (cache[1],))
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), c2)
        return y + h, (None if cache is None else (*c1, *c2))


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing), plus the
    residual: RMSNorm, 1x1 ``to_qkv`` (channels split q|k|v), softmax(q k^T / sqrt(C)) v, 1x1 ``proj``.

    Cached-layer protocol with no slots. ``x``: ``(B, T, H, W, C)``.
    """

    num_cache_slots = 0

    def __init__(self, dim: int, *, dtype: Any, param_dtype: Any, precision: str | None,
                 rngs: nnx.Rngs):
        self.dim, self.dtype, self.precision = dim, dtype, precision
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.norm = RMSNorm(dim, images=True, param_dtype=param_dtype)
        self.to_qkv = nnx.Conv(dim, 3 * dim, (1, 1), kernel_init=_torch_like_init, **kw)
        # zero-initialised like the original (checkpoints hold trained values)
        self.proj = nnx.Conv(dim, dim, (1, 1), kernel_init=nnx.initializers.zeros_init(), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h, w, c)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision,
                            preferred_element_type=jnp.float32) * (1.0 / math.sqrt(c))
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", probs, v, precision=self.precision)
        out = self.proj(out.reshape(b * t, h, w, c)).reshape(b, t, h, w, c)
        return out + x.astype(out.dtype), (None if cache is None else ())


class Resample(nnx.Module):
    """Spatial x2 up/down-sampling, optionally with causal temporal x2 (the ``*3d`` modes).

    * ``upsample2d``: nearest x2, 3x3 conv ``C -> C/2``.
    * ``upsample3d``: ``time_conv`` (causal, kernel (3,1,1), ``C -> 2C``) turns each frame into two
      (channels ``[:C]`` -> frame 2t, ``[C:]`` -> 2t+1), then as ``upsample2d``.
    * ``downsample2d``: pad right/bottom by 1, 3x3 conv stride 2, ``C -> C``.
    * ``downsample3d``: as ``downsample2d``, then ``time_conv`` (kernel (3,1,1), stride 2, no padding)
      over [cached last frame, chunk].

    The temporal parts only run with a cache (``cache=None`` resamples space only, as the original).
    ``x``: ``(B, T, H, W, C)``.
    """

    def __init__(self, dim: int, mode: str, *, dtype: Any, param_dtype: Any, precision: str | None,
                 rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {RESAMPLE_MODES}")
        self.dim, self.mode = dim, mode
        self.num_cache_slots = 1 if mode.endswith("3d") else 0
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        if mode.startswith("up"):
            self.conv = nnx.Conv(dim, dim // 2, (3, 3), padding=((1, 1), (1, 1)),
                                 kernel_init=_torch_like_init, **kw)
        else:
            self.conv = nnx.Conv(dim, dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                                 kernel_init=_torch_like_init, **kw)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
        else:
            self.time_conv = None

    def _upsample_time(self, x: jax.Array, slot: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        if slot is None:  # first call of a stream: pass through, later calls see zero context
            return x, jnp.zeros((x.shape[0], self.time_conv.time_pad, *x.shape[2:]), x.dtype)
        y, (slot,) = self.time_conv(x, (slot,))
        b, t, h, w, _ = y.shape
        y = y.reshape(b, t, h, w, 2, self.dim)
        return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, self.dim), slot

    def _downsample_time(self, x: jax.Array, slot: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        if slot is None:  # first call of a stream: pass through, keep the last frame
            return x, x[:, -1:]
        y = self.time_conv.conv(jnp.concatenate([slot.astype(x.dtype), x], axis=1))
        return y, x[:, -1:]

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new_cache: Cache = None if cache is None else ()
        if self.mode == "upsample3d" and cache is not None:
            x, slot = self._upsample_time(x, cache[0])
            new_cache = (slot,)
        if self.mode.startswith("up"):
            x = upsample_nearest2x(x)
        x = self.conv(x)
        if self.mode == "downsample3d" and cache is not None:
            x, slot = self._downsample_time(x, cache[0])
            new_cache = (slot,)
        return x, new_cache
