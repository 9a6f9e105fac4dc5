"""Wan2.1 3D causal VAE (``WanVAE_``) in Flax NNX, with an explicit, functional feature cache.

Layouts: the public methods of :class:`WanVAE` take and return the original ``B,C,T,H,W`` (the
``*_to_*`` wrapper helpers use Self-Forcing's ``B,T,C,H,W``, see each docstring). Internally
everything is channels-last ``B,T,H,W,C``, and so are the feature-cache slots.

Temporal structure (identical to the original):

* decoding runs the decoder once per latent frame, threading the cache; the first latent frame of a
  stream gives 1 pixel frame, every later one 4, so ``T_lat`` frames give ``1 + 4 (T_lat - 1)``.
* encoding splits the video into chunks of 1, 4, 4, ... frames, each giving one latent frame;
  frames after the last full chunk are dropped (``T -> 1 + (T - 1) // 4`` latent frames).

Streaming: :meth:`WanVAE.decode_chunk` takes the cache returned by the previous chunk (``None`` to
start a stream) and returns ``(pixels, cache)``; decoding chunk by chunk equals decoding at once.
Later frames run in a ``lax.scan`` over latent frames, so peak memory is one frame's activations plus
the cache (the last 2 frames of every causal conv input), whatever the video length.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qarvd_jax.models.wan_vae.config import WanVAEConfig
from qarvd_jax.models.wan_vae.layers import (
    AttentionBlock,
    Cache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    apply_cached,
)

__all__ = [
    "Decoder3d",
    "Encoder3d",
    "FeatureCache",
    "WanVAE",
    "decode_chunk_jit",
    "decode_chunks",
    "to_channels_first",
    "to_channels_last",
]

ENCODER_CHUNK = 4  # video frames per encoder call after the first (the time stride)


class FeatureCache(NamedTuple):
    """Decoder (or encoder) feature cache: one array per cached causal conv, in call order.

    Each slot is channels-last ``(B, frames, H, W, C)`` at that layer's resolution (2 frames for the
    decoder; for the real model at 480x832 these are the original's 32 ``ZERO_VAE_CACHE`` shapes,
    transposed). A pytree, so it can be passed through ``jax.jit`` and ``lax.scan``.
    """

    slots: tuple[jax.Array, ...]


def to_channels_last(x: jax.Array) -> jax.Array:
    """``(B, C, T, H, W) -> (B, T, H, W, C)``."""
    return jnp.transpose(x, (0, 2, 3, 4, 1))


def to_channels_first(x: jax.Array) -> jax.Array:
    """``(B, T, H, W, C) -> (B, C, T, H, W)``."""
    return jnp.transpose(x, (0, 4, 1, 2, 3))


class _CausalStack(nnx.Module):
    """Shared structure of encoder and decoder: stem conv, a body of cached layers, and a head
    (RMSNorm, SiLU, causal 3x3x3 conv). Subclasses set ``conv1``, ``head_norm``, ``head_conv`` and
    list their body in :meth:`body`.
    """

    conv1: CausalConv3d
    head_norm: RMSNorm
    head_conv: CausalConv3d

    def body(self) -> list:
        raise NotImplementedError

    @property
    def num_cache_slots(self) -> int:
        return self.conv1.num_cache_slots + sum(m.num_cache_slots for m in self.body()) + \
            self.head_conv.num_cache_slots

    def fresh_cache(self) -> tuple[None, ...]:
        """The cache of a new stream (every slot unset, like the original's ``clear_cache``)."""
        return (None,) * self.num_cache_slots

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        """``x``: ``(B, T, H, W, C_in)``; returns ``(y, new_cache)`` per the cache protocol."""
        head = _Head(self.head_norm, self.head_conv)
        return apply_cached([self.conv1, *self.body(), head], x, cache)


class _Head:
    """RMSNorm -> SiLU -> causal conv, as one cached layer (a plain helper, owns no parameters)."""

    def __init__(self, norm: RMSNorm, conv: CausalConv3d):
        self.norm, self.conv, self.num_cache_slots = norm, conv, conv.num_cache_slots

    def __call__(self, x, cache):
        return self.conv(jax.nn.silu(self.norm(x)), cache)


def _block_kwargs(cfg: WanVAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, precision=cfg.precision, rngs=rngs)


def _middle(dim: int, kw: dict) -> nnx.List:
    return nnx.List([ResidualBlock(dim, dim, **kw), AttentionBlock(dim, **kw), ResidualBlock(dim, dim, **kw)])


class Encoder3d(_CausalStack):
    """Video ``(B, T, H, W, 3)`` -> ``(B, T', H/8, W/8, out_channels)`` (``2*z_dim`` in the VAE).

    ``downsamples`` mirrors the original ``nn.Sequential`` index for index: per stage,
    ``num_res_blocks`` residual blocks (+ attention at ``attn_scales``) and, except after the last
    stage, a ``downsample3d`` / ``downsample2d`` Resample.
    """

    def __init__(self, cfg: WanVAEConfig, out_channels: int, *, rngs: nnx.Rngs):
        kw = _block_kwargs(cfg, rngs)
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1, **kw)
        layers, scale = [], 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, **kw))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode, **kw))
                scale /= 2.0
        self.downsamples = nnx.List(layers)
        self.middle = _middle(dims[-1], kw)
        self.head_norm = RMSNorm(dims[-1], param_dtype=cfg.param_dtype)
        self.head_conv = CausalConv3d(dims[-1], out_channels, 3, padding=1, **kw)

    def body(self) -> list:
        return [*self.downsamples, *self.middle]


class Decoder3d(_CausalStack):
    """Latent ``(B, T, h, w, z_dim)`` -> pixels ``(B, T', 8h, 8w, 3)``.

    ``upsamples`` mirrors the original ``nn.Sequential``: per stage, ``num_res_blocks + 1`` residual
    blocks (+ attention at ``attn_scales``) and, except after the last stage, an ``upsample3d`` /
    ``upsample2d`` Resample, which halves the channels (hence each later stage's ``in_dim // 2``).
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        kw = _block_kwargs(cfg, rngs)
        dims = list(cfg.decoder_widths)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.middle = _middle(dims[0], kw)
        layers, scale = [], 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, **kw))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
                layers.append(Resample(out_dim, mode, **kw))
                scale *= 2.0
        self.upsamples = nnx.List(layers)
        self.head_norm = RMSNorm(dims[-1], param_dtype=cfg.param_dtype)
        self.head_conv = CausalConv3d(dims[-1], 3, 3, padding=1, **kw)

    def body(self) -> list:
        return [*self.middle, *self.upsamples]


class WanVAE(nnx.Module):
    """The Wan2.1 VAE (``WanVAE_``): ``encoder`` + ``conv1`` (-> mu | log_var), ``conv2`` + ``decoder``.

    Latents are in the normalised space the DiT uses, ``(mu - mean) / std`` with the config's
    per-channel statistics.
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = _block_kwargs(config, rngs)
        z = config.z_dim
        self.encoder = Encoder3d(config, 2 * z, rngs=rngs)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1, **kw)
        self.conv2 = CausalConv3d(z, z, 1, **kw)
        self.decoder = Decoder3d(config, rngs=rngs)

    # ----------------------------------------------------------------------------- normalisation
    def _scale(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(mean, 1/std)`` in ``dtype``, computed as the wrapper does (cast, then reciprocal)."""
        mean, std = self.config.latent_stats()
        return jnp.asarray(mean, dtype), 1.0 / jnp.asarray(std, dtype)

    def _denormalise(self, latent: jax.Array) -> jax.Array:
        """Normalised ``(B, C, T, h, w)`` latent -> raw channels-last ``(B, T, h, w, C)`` decoder input."""
        mean, inv_std = self._scale(latent.dtype)
        z = to_channels_last(latent) / inv_std + mean  # the original's exact form
        return z.astype(self.config.dtype)

    # ----------------------------------------------------------------------------- decoding
    def decode_chunk(self, latent_chunk: jax.Array, cache: FeatureCache | None = None
                     ) -> tuple[jax.Array, FeatureCache]:
        """Decode consecutive latent frames of a stream.

        Args:
          latent_chunk: normalised latents ``(B, z_dim, T, h, w)``, ``T >= 1``.
          cache: ``None`` to start a stream (the first latent frame then gives one pixel frame), or
            the cache returned by the previous call. A cache of zeros (:meth:`zero_decode_cache`)
            reproduces Self-Forcing's demo decoder (every frame, the first included, gives 4).
        Returns:
          ``(pixels, cache)``: unclamped pixels ``(B, 3, T_out, 8h, 8w)`` in the compute dtype, with
          ``T_out = 4T - 3`` for a new stream and ``4T`` otherwise, and the cache for the next call
          (4 and 8 are ``config.time_stride`` / ``space_stride`` of the Wan layout).
        """
        if latent_chunk.ndim != 5 or latent_chunk.shape[1] != self.config.z_dim or not latent_chunk.shape[2]:
            raise ValueError(f"latent chunk must be (B, {self.config.z_dim}, T>=1, h, w), got "
                             f"{latent_chunk.shape}")
        x = self.conv2(self._denormalise(latent_chunk))[0]
        outs = []
        if cache is None:
            y, slots = self.decoder(x[:, :1], self.decoder.fresh_cache())
            outs.append(y)
            x = x[:, 1:]
        else:
            slots = tuple(s.astype(self.config.dtype) for s in cache.slots)  # a fixed scan carry type
            if len(slots) != self.decoder.num_cache_slots:
                raise ValueError(f"decoder cache has {len(slots)} slots, expected "
                                 f"{self.decoder.num_cache_slots}")
        if x.shape[1]:
            def step(carry, frame):
                y, carry = self.decoder(frame[:, None], carry)
                return carry, y

            slots, ys = jax.lax.scan(step, slots, jnp.moveaxis(x, 1, 0))
            n, b, t, h, w, c = ys.shape
            outs.append(jnp.moveaxis(ys, 0, 1).reshape(b, n * t, h, w, c))
        return to_channels_first(jnp.concatenate(outs, axis=1)), FeatureCache(slots)

    def decode(self, latent: jax.Array) -> jax.Array:
        """``WanVAE_.decode``: normalised latent ``(B, z_dim, T, h, w)`` -> unclamped pixels
        ``(B, 3, 1 + 4 (T - 1), 8h, 8w)``; a fresh stream decoded in one chunk."""
        return self.decode_chunk(latent, None)[0]

    def decode_chunks(self, chunks: Sequence[jax.Array], cache: FeatureCache | None = None
                      ) -> tuple[jax.Array, FeatureCache]:
        """Decode latent chunks ``(B, z_dim, T_i, h, w)`` in order, un-jitted (traceable); pixels
        concatenated on T. See the module-level :func:`decode_chunks` for the jitted driver."""
        return decode_chunks(self, chunks, cache, jit=False, per_frame=False)

    def zero_decode_cache(self, batch: int, latent_hw: tuple[int, int]) -> FeatureCache:
        """An all-zero decoder cache (``demo_utils.ZERO_VAE_CACHE``, channels-last) for latents of
        spatial size ``latent_hw``. Decoding from it is the demo's streaming decoder, not the
        pipeline's: it skips the first-frame rule (see ``decode_chunk``)."""
        h, w = latent_hw
        z = jax.ShapeDtypeStruct((batch, 1, h, w, self.config.z_dim), self.config.dtype)
        shapes = jax.eval_shape(lambda x: self.decoder(x, self.decoder.fresh_cache())[1], z)
        return FeatureCache(tuple(jnp.zeros(s.shape, s.dtype) for s in shapes))

    # ----------------------------------------------------------------------------- encoding
    def encode_moments(self, video: jax.Array) -> jax.Array:
        """Raw output of the top-level ``conv1`` after the encoder: ``(B, 2 z_dim, T', H/8, W/8)``,
        channels ``[:z_dim]`` = mu (un-normalised), ``[z_dim:]`` = log_var. ``video``:
        ``(B, 3, T, H, W)`` in [-1, 1]; ``T' = 1 + (T - 1) // 4``, extra frames are ignored."""
        if video.ndim != 5 or video.shape[1] != 3 or not video.shape[2]:
            raise ValueError(f"video must be (B, 3, T>=1, H, W), got {video.shape}")
        s = self.config.space_stride
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"video H, W must be multiples of {s}, got {video.shape[3:]}")
        x = to_channels_last(video).astype(self.config.dtype)
        n_chunks = (x.shape[1] - 1) // ENCODER_CHUNK
        out, slots = self.encoder(x[:, :1], self.encoder.fresh_cache())
        if n_chunks:
            b, _, h, w, c = x.shape
            rest = x[:, 1:1 + ENCODER_CHUNK * n_chunks].reshape(b, n_chunks, ENCODER_CHUNK, h, w, c)

            def step(carry, chunk):
                y, carry = self.encoder(chunk, carry)
                return carry, y

            _, ys = jax.lax.scan(step, slots, jnp.moveaxis(rest, 1, 0))
            n, b, t, h2, w2, c2 = ys.shape
            out = jnp.concatenate([out, jnp.moveaxis(ys, 0, 1).reshape(b, n * t, h2, w2, c2)], axis=1)
        return to_channels_first(self.conv1(out)[0])

    def encode(self, video: jax.Array) -> jax.Array:
        """``WanVAE_.encode``: video ``(B, 3, T, H, W)`` -> normalised latent
        ``(B, z_dim, 1 + (T - 1) // 4, H/8, W/8)`` = ``(mu - mean) * (1/std)`` (deterministic)."""
        return self.normalise_latent(self.encode_moments(video))

    def normalise_latent(self, moments: jax.Array) -> jax.Array:
        """``(mu - mean) * (1/std)`` from :meth:`encode_moments` output (or mu alone),
        ``(B, >= z_dim, T, h, w)`` -> ``(B, z_dim, T, h, w)``."""
        mu = moments[:, :self.config.z_dim]
        mean, inv_std = self._scale(mu.dtype)
        return (mu - mean[:, None, None, None]) * inv_std[:, None, None, None]

    # ----------------------------------------------------------------------------- wrapper helpers
    def decode_to_pixel(self, latent: jax.Array) -> jax.Array:
        """``WanVAEWrapper.decode_to_pixel``: latents ``(B, T, z_dim, h, w)`` -> float32 pixels
        ``(B, 1 + 4 (T - 1), 3, 8h, 8w)`` clamped to [-1, 1] (note the B,T,C,H,W layout)."""
        pixels = self.decode(jnp.swapaxes(latent, 1, 2))
        return jnp.swapaxes(jnp.clip(pixels.astype(jnp.float32), -1.0, 1.0), 1, 2)

    def encode_to_latent(self, pixel: jax.Array) -> jax.Array:
        """``WanVAEWrapper.encode_to_latent``: video ``(B, 3, T, H, W)`` (B,C,T,H,W, as the original)
        -> float32 normalised latents ``(B, T', z_dim, H/8, W/8)`` (B,T,C,H,W)."""
        return jnp.swapaxes(self.encode(pixel).astype(jnp.float32), 1, 2)


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _decode_chunk_functional(graphdef, state, latent_chunk: jax.Array, cache: FeatureCache | None):
    return nnx.merge(graphdef, state).decode_chunk(latent_chunk, cache)


def decode_chunk_jit(model: WanVAE, latent_chunk: jax.Array, cache: FeatureCache | None = None
                     ) -> tuple[jax.Array, FeatureCache]:
    """Jitted :meth:`WanVAE.decode_chunk`. Compiles once per chunk shape and cache kind: a stream's
    first chunk (``cache=None``) compiles separately, later equal-size chunks reuse one executable.
    Parameters are arguments, not constants, so the compiled code does not embed the weights. The
    model is split once per call (cheap ``jax.jit`` dispatch, not ``nnx.jit``) and the old cache is
    donated, so only one feature cache is live at a time."""
    graphdef, state = nnx.split(model)
    return _decode_chunk_functional(graphdef, state, latent_chunk, cache)


def decode_chunks(model: WanVAE, chunks: Sequence[jax.Array], cache: FeatureCache | None = None, *,
                  jit: bool = True, per_frame: bool = True) -> tuple[jax.Array, FeatureCache]:
    """Decode latent chunks ``(B, z_dim, T_i, h, w)`` one after another, threading the cache.

    Returns the pixels of all chunks concatenated on T, ``(B, 3, sum T_out_i, 8h, 8w)``, and the final
    cache (pass it back to continue the stream). Equal to ``model.decode`` on the concatenated latent
    when ``cache`` is None (to float32 rounding; bitwise between any two chunkings here).

    ``per_frame=True`` (default) feeds the decoder one latent frame per call, as the original does,
    so with ``jit=True`` there are exactly two executables per input size (a stream's first frame,
    and every later frame) whatever the chunking, and peak memory is one frame's activations.
    ``per_frame=False`` makes one call per chunk (one executable per chunk length).
    """
    if not chunks:
        raise ValueError("decode_chunks needs at least one chunk")
    if jit:
        graphdef, state = nnx.split(model)  # once per call, not once per frame

        def step(z, c):
            return _decode_chunk_functional(graphdef, state, z, c)
    else:
        step = model.decode_chunk
    outs = []
    for chunk in chunks:
        pieces = [chunk[:, :, i:i + 1] for i in range(chunk.shape[2])] if per_frame else [chunk]
        for piece in pieces:
            pixels, cache = step(piece, cache)
            outs.append(pixels)
    return jnp.concatenate(outs, axis=2), cache
