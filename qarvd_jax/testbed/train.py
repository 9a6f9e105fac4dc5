"""Training of the testbed (library side of ``scripts/train_testbed.py``).

1. :func:`train_images` (Wan's image-first curriculum: single frames through the stream's first-frame
   path), then :func:`inflate_to_video` (past-frame taps zeroed, temporal resampling as keep-last /
   repeat), then optionally :func:`train_images` on the decoder alone, :func:`train_vae` on clips
   (truncated back-propagation through the stream, loss MSE + 0.1 L1 on pixels in [-1, 1] + a small L2 on
   the latent mean; the chunk loop is unrolled, XLA:CPU differentiates it ~10x faster than ``lax.scan``)
   and :func:`finetune_decoder` on whole clips.
2. :func:`encode_dataset`: training clips -> normalised latents ``[N, 21, 16, h, w]`` with the trained
   encoder and the measured per-channel latent statistics.
3. :func:`train_dit`: flow matching on whole latent videos with the block-causal mask and an
   independent timestep per chunk (diffusion forcing); a chunk is kept clean (t = 0, no loss) with
   probability ``clean_prob``, as the KV-cache context is at inference (teacher forcing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from qarvd_jax.models.wan_vae import WanVAE
from qarvd_jax.models.wan_vae.model import to_channels_first, to_channels_last
from qarvd_jax.pipeline import scheduler as sch
from qarvd_jax.testbed import data

__all__ = ["VAETrainConfig", "DecoderTuneConfig", "DiTTrainConfig", "autoencode", "train_images",
           "inflate_to_video", "object_weights", "latent_object_mask", "render_pool", "train_vae",
           "finetune_decoder", "latent_moments",
           "encode_dataset", "train_dit", "reconstruct_clips", "vae_psnr", "psnr"]


@dataclass(frozen=True)
class VAETrainConfig:
    # stage 1a: single frames through the first-frame path (Wan's image-first curriculum), then inflated
    image_steps: int = 1500
    image_batch_size: int = 32
    image_lr: float = 1e-3
    # then the decoder alone on images (encoder frozen), after inflation
    decoder_image_steps: int = 1200
    decoder_image_lr: float = 5e-4
    # stage 1b: clips (0 skips it: the inflated image VAE already reconstructs held-out clips at ~29 dB)
    steps: int = 0
    batch_size: int = 8
    crop: int = 32
    frames: int = 9  # 1 + 4k: the first-frame path and two cached chunks
    lr: float = 2e-4  # 1e-3 and above collapse to a constant output within ~100 steps (Adam, width 8 and 16)
    warmup: int = 50
    latent_l2: float = 1e-4
    pool_size: int = 192
    seed: int = 0
    # Probability that a step trains a window from the middle of the stream (truncated back-propagation):
    # the encoder's and decoder's caches are first run forward, without gradients, over a random prefix of
    # whole chunks, then ``frames - 1`` frames after it carry the loss. Trained only from a stream's start,
    # the decoder's causal cache drifts past the trained length (docs/testbed.md).
    stream_prob: float = 0.0
    # Pixels of the object (further than 24/255 from the frame's border median in some channel) weigh
    # 1 + object_weight in the pixel loss: the background is ~90 % of the pixels and is learnt first.
    object_weight: float = 0.0


@dataclass(frozen=True)
class DecoderTuneConfig:
    """Stage 1c: the decoder alone on whole 81-frame clips at full size (the encoder frozen). Trained on
    9-frame crops only, the decoder's causal cache drifts after ~3 latent frames (PSNR falls from ~30 to
    ~9 dB over a 21-latent stream); this stage trains the steady state the pipeline decodes."""

    steps: int = 0
    lr: float = 2e-4
    warmup: int = 10
    pool_size: int = 48
    seed: int = 0


@dataclass(frozen=True)
class DiTTrainConfig:
    steps: int = 9000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clean_prob: float = 0.25
    timestep_shift: float = 3.0
    seed: int = 0
    # The returned model holds an exponential moving average of the weights (decay warmed up as
    # min(ema_decay, (1 + i) / (10 + i))); 0 keeps the last iterate.
    ema_decay: float = 0.999
    # Probability that a video trains with ``null_text`` (the script: zeros, i.e. all padding) instead of
    # its caption: the unconditional model that classifier-free guidance (``InferenceConfig.guidance_scale``)
    # needs.
    caption_dropout: float = 0.1
    # Latent pixels that hold the object (``latent_object_mask``) weigh 1 + object_weight in the flow loss
    # (a weighted mean per frame); the object is ~20 % of the latent and carries the caption's colour and
    # shape, the background is learnt first (docs/testbed.md: colour 0.73 -> 0.92, shape 0.23 -> 0.30 in the
    # chunk-0 proxy).
    object_weight: float = 4.0


def _adamw(lr: float, warmup: int, steps: int, weight_decay: float = 0.0):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def autoencode(vae: WanVAE, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``video (B, 3, T, H, W)`` in [-1, 1], ``T = 1 + 4k`` -> ``(reconstruction (B, 3, T, H, W), mu
    (B, T', h, w, z))`` through the causal encoder and decoder (un-normalised latents, no clamp)."""
    x = to_channels_last(video).astype(vae.config.dtype)
    mu, _ = _encode_stream(vae, x, vae.encoder.fresh_cache(), first=True)
    return _decode_stream(vae, mu), mu


def render_pool(captions: list[data.Caption], count: int, data_seed: int, **geometry) -> tuple[np.ndarray, list]:
    """``count`` clips as uint8 ``[count, T, H, W, 3]`` and their ``(caption, seed)``."""
    frames, meta = [], []
    for cap, seed, f in tqdm(data.clips(captions, count, data_seed, **geometry), total=count, desc="render",
                             leave=False):
        frames.append(f)
        meta.append((cap, seed))
    return np.stack(frames), meta


def _encode_stream(vae: WanVAE, x: jax.Array, slots, first: bool):
    """Channels-last frames ``x (B, T, H, W, 3)`` -> un-normalised latent means ``(B, T', h, w, z)`` and the
    encoder cache; ``first``: ``x`` starts a stream (its first frame alone, then chunks of 4)."""
    outs, start = [], 0
    if first:
        y, slots = vae.encoder(x[:, :1], slots)
        outs.append(y)
        start = 1
    for i in range(start, x.shape[1], 4):
        y, slots = vae.encoder(x[:, i:i + 4], slots)
        outs.append(y)
    return vae.conv1(jnp.concatenate(outs, axis=1))[0][..., :vae.config.z_dim], slots


def _decode_frames(vae: WanVAE, mu: jax.Array, slots):
    """Latent means ``(B, T', h, w, z)`` -> channels-last pixels, one latent frame per decoder call."""
    z = vae.conv2(mu)[0]
    ys = []
    for i in range(z.shape[1]):
        y, slots = vae.decoder(z[:, i:i + 1], slots)
        ys.append(y)
    return jnp.concatenate(ys, axis=1), slots


def _pixel_loss(recon: jax.Array, video: jax.Array, mu: jax.Array, latent_l2: float,
                weight: jax.Array | None = None) -> jax.Array:
    """MSE + 0.1 L1 (per-pixel ``weight (B, T, H, W, 1)`` if given) + ``latent_l2`` on the latent means."""
    err = recon - video
    per_pixel = err ** 2 + 0.1 * jnp.abs(err)
    if weight is not None:
        per_pixel = per_pixel * weight
    return jnp.mean(per_pixel) + latent_l2 * jnp.mean(mu ** 2)


def _stream_start_loss(vae: WanVAE, x: jax.Array, latent_l2: float, weight: jax.Array | None = None) -> jax.Array:
    """Pixel loss of channels-last frames ``x (B, T, H, W, 3)`` encoded and decoded as a new stream."""
    mu, _ = _encode_stream(vae, x, vae.encoder.fresh_cache(), first=True)
    recon, _ = _decode_frames(vae, mu, vae.decoder.fresh_cache())
    return _pixel_loss(recon, x, mu, latent_l2, weight)


def object_weights(frames_u8: np.ndarray, object_weight: float, threshold: int = 24) -> np.ndarray:
    """Per-pixel loss weights ``[..., T, H, W, 1]`` of uint8 frames ``[..., T, H, W, 3]``: 1, plus
    ``object_weight`` where a pixel differs from its frame's 2-px border median by more than ``threshold``
    in some channel (the object; the testbed's backgrounds are smooth gradients)."""
    f = frames_u8.astype(np.int16)
    border = np.concatenate([f[..., :2, :, :].reshape(*f.shape[:-3], -1, 3), f[..., -2:, :, :].reshape(
        *f.shape[:-3], -1, 3), f[..., :, :2, :].reshape(*f.shape[:-3], -1, 3),
        f[..., :, -2:, :].reshape(*f.shape[:-3], -1, 3)], axis=-2)
    bg = np.median(border, axis=-2)[..., None, None, :]
    mask = np.abs(f - bg).max(axis=-1, keepdims=True) > threshold
    return (1.0 + object_weight * mask).astype(np.float32)


def latent_object_mask(frames_u8: np.ndarray, spatial_stride: int, temporal_stride: int = 4) -> np.ndarray:
    """Object masks at latent resolution, float32 ``[N, T', h, w]`` in {0, 1}, of uint8 clips ``[N, T, H, W, 3]``
    (``T = 1 + 4k``): a latent pixel is 1 where any pixel of its footprint is object
    (:func:`object_weights`); latent frame 0 covers frame 0, frame ``k >= 1`` covers frames ``4k-3 .. 4k``
    (the causal VAE's grouping)."""
    n, t, h, w, _ = frames_u8.shape
    if (t - 1) % temporal_stride or h % spatial_stride or w % spatial_stride:
        raise ValueError(f"clips of shape {frames_u8.shape} do not tile into latent frames "
                         f"(T = 1 + {temporal_stride}k, H and W multiples of {spatial_stride})")
    mask = object_weights(frames_u8, 1.0)[..., 0] > 1.0  # [N, T, H, W]
    groups = np.concatenate([np.repeat(mask[:, :1], temporal_stride, axis=1), mask[:, 1:]], axis=1)
    groups = groups.reshape(n, -1, temporal_stride, h // spatial_stride, spatial_stride, w // spatial_stride,
                            spatial_stride)
    return groups.any(axis=(2, 4, 6)).astype(np.float32)


def train_images(vae: WanVAE, pool: np.ndarray, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
                 warmup: int = 50, latent_l2: float = 1e-4, seed: int = 0, decoder_only: bool = False,
                 progress: bool = True) -> list[float]:
    """Stage 1a (Wan's image-first curriculum): train ``vae`` in place as an image autoencoder on random
    single frames of ``pool`` (uint8 ``[N, T, H, W, 3]``) through the stream's first-frame path, which
    uses every 2D weight but only the current-frame tap of the causal convs; returns the loss per step.
    Follow with :func:`inflate_to_video` before training on clips. ``decoder_only``: train ``conv2`` and
    the decoder alone (the encoder, hence the DiT's latents, fixed); the zeroed past-frame taps of an
    inflated VAE get no gradient on images and stay zero."""
    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("conv2"))) \
        if decoder_only else nnx.Param
    opt = nnx.Optimizer(vae, _adamw(lr, warmup, steps), wrt=trainable)

    @nnx.jit
    def step(vae, opt, x):
        loss, grads = nnx.value_and_grad(lambda v: _stream_start_loss(v, x, latent_l2),
                                         argnums=nnx.DiffState(0, trainable))(vae)
        opt.update(vae, grads)
        return loss

    rng = np.random.default_rng([seed, 44, int(decoder_only)])
    losses = []
    for _ in tqdm(range(steps), desc="decoder images" if decoder_only else "vae images", disable=not progress):
        frames = pool[rng.integers(0, len(pool), batch_size), rng.integers(0, pool.shape[1], batch_size)]
        losses.append(step(vae, opt, jnp.asarray(frames[:, None].astype(np.float32) / 127.5 - 1.0)))
    return [float(v) for v in jax.device_get(losses)]


def inflate_to_video(vae: WanVAE) -> None:
    """Make an image-trained ``vae`` a video autoencoder that starts as its image path, frame by frame
    (in place): the two past-frame taps of every causal 3x3x3 conv are zeroed, the encoder's temporal
    downsamplings keep the chunk's last frame and the decoder's temporal upsamplings repeat their
    frame. A chunk of 4 frames then encodes as its last frame and decodes as 4 copies of it; video
    training starts from there and learns the motion."""
    from qarvd_jax.models.wan_vae.layers import CausalConv3d, Resample

    for _, m in nnx.iter_graph(vae):
        if isinstance(m, Resample) and m.time_conv is not None:
            k = np.zeros(m.time_conv.kernel[...].shape, np.float32)  # (3, 1, 1, C, C or 2C)
            eye = np.eye(m.dim, dtype=np.float32)
            k[-1, 0, 0] = eye if m.mode == "downsample3d" else np.concatenate([eye, eye], axis=1)
            m.time_conv.kernel[...] = jnp.asarray(k, m.time_conv.kernel[...].dtype)
            m.time_conv.bias[...] = jnp.zeros_like(m.time_conv.bias[...])
    for _, m in nnx.iter_graph(vae):
        if isinstance(m, CausalConv3d) and m.kernel_size[0] == 3 and m.kernel_size[1] > 1:
            m.kernel[...] = m.kernel[...].at[:-1].set(0.0)


def train_vae(vae: WanVAE, pool: np.ndarray, cfg: VAETrainConfig, *, progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``vae`` in place on random ``crop x crop`` windows of ``pool`` (uint8 clips ``[N, T, H, W, 3]``);
    returns the loss per step.

    A step is either a stream start (frames ``0 .. frames-1`` from empty caches) or, with probability
    ``cfg.stream_prob``, a window of ``frames - 1`` frames (whole chunks) after a random prefix of the same
    clips that warms both caches forward without gradients (truncated back-propagation through the stream).
    """
    if (cfg.frames - 1) % 4 or cfg.frames < 5:
        raise ValueError(f"VAETrainConfig.frames must be 1 + 4k with k >= 1, got {cfg.frames}")
    opt = nnx.Optimizer(vae, _adamw(cfg.lr, cfg.warmup, cfg.steps), wrt=nnx.Param)

    @nnx.jit
    def start_step(vae, opt, x, weight):  # x: channels-last (B, frames, H, W, 3) in [-1, 1]
        loss, grads = nnx.value_and_grad(lambda v: _stream_start_loss(v, x, cfg.latent_l2, weight))(vae)
        opt.update(vae, grads)
        return loss

    def advance(vae, x, enc_slots, dec_slots, first: bool):  # forward only: one chunk (or the first frame)
        mu, enc_slots = _encode_stream(vae, x, enc_slots, first=first)
        _, dec_slots = _decode_frames(vae, mu, dec_slots)
        return enc_slots, dec_slots

    advance = nnx.jit(advance, static_argnames="first")

    @nnx.jit
    def window_step(vae, opt, x, weight, enc_slots, dec_slots):
        enc_slots, dec_slots = jax.lax.stop_gradient((enc_slots, dec_slots))

        def loss_fn(vae):
            mu, _ = _encode_stream(vae, x, enc_slots, first=False)
            recon, _ = _decode_frames(vae, mu, dec_slots)
            return _pixel_loss(recon, x, mu, cfg.latent_l2, weight)

        loss, grads = nnx.value_and_grad(loss_fn)(vae)
        opt.update(vae, grads)
        return loss

    rng = np.random.default_rng([cfg.seed, 11])
    n, t_all, h, w, _ = pool.shape
    chunks_total = (t_all - 1) // 4
    win_chunks = (cfg.frames - 1) // 4
    losses = []
    for i in tqdm(range(cfg.steps), desc="vae", disable=not progress):
        idx = rng.integers(0, n, cfg.batch_size)
        y0 = rng.integers(0, h - cfg.crop + 1, cfg.batch_size)
        x0 = rng.integers(0, w - cfg.crop + 1, cfg.batch_size)
        stream = rng.random() < cfg.stream_prob and chunks_total > win_chunks
        if stream:  # window = chunks m .. m + win_chunks - 1 after the first frame and m warm chunks
            m = int(rng.integers(1, chunks_total - win_chunks + 1))
            t0, length = 0, 1 + 4 * (m + win_chunks)
        else:
            t0 = rng.integers(0, t_all - cfg.frames + 1, cfg.batch_size)
            length = cfg.frames
        t0 = np.broadcast_to(t0, (cfg.batch_size,))
        batch = np.stack([pool[j, a:a + length, b:b + cfg.crop, c:c + cfg.crop]
                          for j, a, b, c in zip(idx, t0, y0, x0)])
        if rng.random() < 0.5:
            batch = batch[:, :, :, ::-1]
        x = jnp.asarray(data.to_model_range(batch).transpose(0, 2, 3, 4, 1))  # (B, T, H, W, 3)
        weight = jnp.asarray(object_weights(batch, cfg.object_weight)) if cfg.object_weight else None
        if stream:
            es, ds = advance(vae, x[:, :1], vae.encoder.fresh_cache(), vae.decoder.fresh_cache(), first=True)
            for k in range(m):
                es, ds = advance(vae, x[:, 1 + 4 * k:5 + 4 * k], es, ds, first=False)
            losses.append(window_step(vae, opt, x[:, 1 + 4 * m:], None if weight is None else weight[:, 1 + 4 * m:],
                                      es, ds))
        else:
            losses.append(start_step(vae, opt, x, weight))
        if on_step is not None:
            on_step(i, float(losses[-1]))
    return [float(v) for v in jax.device_get(losses)]


def _decode_stream(vae: WanVAE, mu: jax.Array) -> jax.Array:
    """Un-normalised latents ``(B, T', h, w, z)`` -> pixels ``(B, 3, 1 + 4 (T' - 1), H, W)`` of a new stream
    (the streaming decode, unrolled)."""
    return to_channels_first(_decode_frames(vae, mu, vae.decoder.fresh_cache())[0])


def finetune_decoder(vae: WanVAE, pool: np.ndarray, cfg: DecoderTuneConfig, *, progress: bool = True) -> list[float]:
    """Train ``vae.conv2`` and ``vae.decoder`` in place on whole clips of ``pool`` (uint8 ``[N, T, H, W, 3]``),
    one clip per step, from the frozen encoder's latent means; returns the loss per step."""
    z_dim = vae.config.z_dim
    mus = [np.asarray(m) for m in latent_moments(vae, pool)]  # [N, z, T', h, w], frozen encoder
    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("conv2")))
    opt = nnx.Optimizer(vae, _adamw(cfg.lr, cfg.warmup, cfg.steps), wrt=trainable)

    @nnx.jit
    def step(vae, opt, mu, video):
        def loss_fn(vae):
            err = _decode_stream(vae, mu) - video
            return jnp.mean(err ** 2) + 0.1 * jnp.mean(jnp.abs(err))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(vae)
        opt.update(vae, grads)
        return loss

    rng = np.random.default_rng([cfg.seed, 33])
    losses = []
    for _ in tqdm(range(cfg.steps), desc="decoder", disable=not progress):
        j = int(rng.integers(0, len(pool)))
        mu = jnp.asarray(np.moveaxis(mus[j], 0, -1)[None])  # (1, T', h, w, z)
        losses.append(step(vae, opt, mu[..., :z_dim], jnp.asarray(data.to_model_range(pool[j][None]))))
    return [float(v) for v in jax.device_get(losses)]


def latent_moments(vae: WanVAE, clips_u8: np.ndarray, batch: int = 8) -> np.ndarray:
    """Un-normalised latent means ``[N, 16, T', h, w]`` of uint8 clips ``[N, T, H, W, 3]``."""
    enc = jax.jit(lambda v: vae.encode_moments(v)[:, :vae.config.z_dim])
    out = [np.asarray(enc(jnp.asarray(data.to_model_range(clips_u8[i:i + batch]))))
           for i in range(0, len(clips_u8), batch)]
    return np.concatenate(out)


def encode_dataset(vae: WanVAE, clips_u8: np.ndarray, batch: int = 8) -> np.ndarray:
    """Normalised latents ``[N, T', 16, h, w]`` (the DiT's layout) with ``vae.config``'s statistics."""
    mu = latent_moments(vae, clips_u8, batch)
    mean, std = vae.config.latent_stats()
    return np.swapaxes((mu - mean[:, None, None, None]) / std[:, None, None, None], 1, 2).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 (or [0, 255] float) images, peak 255."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def reconstruct_clips(vae: WanVAE, clips_u8: np.ndarray, chunk_frames: int = 3) -> list[np.ndarray]:
    """Encode -> streaming decode (chunks of ``chunk_frames`` latent frames, as the pipeline decodes) ->
    clamp -> uint8 frames ``[T, H, W, 3]``, one array per clip of ``clips_u8 [N, T, H, W, 3]``."""
    from qarvd_jax.models.wan_vae import decode_chunks

    out = []
    latents = encode_dataset(vae, clips_u8)  # one jitted encoder for every clip
    for lat in latents:
        lat = jnp.asarray(np.swapaxes(lat[None], 1, 2))  # (1, C, T', h, w)
        chunks = [lat[:, :, i:i + chunk_frames] for i in range(0, lat.shape[2], chunk_frames)]
        pixels, _ = decode_chunks(vae, chunks, None)
        x = np.clip(np.asarray(pixels[0], np.float32), -1, 1) * 0.5 + 0.5
        out.append((x * 255.0).astype(np.uint8).transpose(1, 2, 3, 0))
    return out


def vae_psnr(vae: WanVAE, clips_u8: np.ndarray, chunk_frames: int = 3) -> list[float]:
    """Per-clip PSNR of :func:`reconstruct_clips` against the original uint8 clips."""
    return [psnr(recon, clip[:recon.shape[0]])
            for recon, clip in zip(reconstruct_clips(vae, clips_u8, chunk_frames), clips_u8)]


def train_dit(model, latents: np.ndarray, text: np.ndarray, caption_index: np.ndarray, cfg: DiTTrainConfig, *,
              null_text: np.ndarray | None = None, object_mask: np.ndarray | None = None, progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Flow-matching training of ``model`` in place.

    Args:
      latents: normalised clean latents ``[N, F, C, h, w]`` (F a multiple of the chunk size).
      text: prompt embeddings ``[num_captions, text_len, text_dim]``; ``caption_index [N]`` the row of
        each latent's caption.
      null_text: the unconditional embedding ``[text_len, text_dim]`` (zeros: all padding), which replaces
        a video's caption with probability ``cfg.caption_dropout`` (required when that is > 0).
      object_mask: ``[N, F, h, w]`` (:func:`latent_object_mask`), required when ``cfg.object_weight`` > 0.
    """
    if cfg.object_weight and object_mask is None:
        raise ValueError("DiTTrainConfig.object_weight > 0 needs object_mask (latent_object_mask of the clips)")
    if object_mask is not None and (tuple(object_mask.shape) != (latents.shape[0], latents.shape[1],
                                                                 *latents.shape[3:])):
        raise ValueError(f"object_mask has shape {tuple(object_mask.shape)}, expected "
                         f"{(latents.shape[0], latents.shape[1], *latents.shape[3:])} ([N, F, h, w] of the latents)")
    if cfg.caption_dropout and null_text is None:
        raise ValueError("DiTTrainConfig.caption_dropout > 0 needs null_text (the unconditional embedding)")
    if null_text is not None and tuple(null_text.shape) != tuple(text.shape[1:]):
        raise ValueError(f"null_text has shape {tuple(null_text.shape)}, expected {tuple(text.shape[1:])} "
                         "(one caption's embedding)")
    fc = model.config.num_frame_per_block
    n, f = latents.shape[:2]
    chunks = f // fc
    tables = sch.flow_match_tables(cfg.timestep_shift)
    sig_table, t_table = jnp.asarray(tables.sigmas), jnp.asarray(tables.timesteps)
    opt = nnx.Optimizer(model, _adamw(cfg.lr, cfg.warmup, cfg.steps, cfg.weight_decay), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x0, ctx, t_idx, clean, eps, pix_w):
        sigma = jnp.where(clean, 0.0, sig_table[t_idx])  # [B, chunks]
        t = jnp.where(clean, 0.0, t_table[t_idx])
        sigma_f, t_f = jnp.repeat(sigma, fc, axis=1), jnp.repeat(t, fc, axis=1)  # per frame
        xt = (1 - sigma_f)[..., None, None, None] * x0 + sigma_f[..., None, None, None] * eps
        weight = jnp.repeat((~clean).astype(jnp.float32), fc, axis=1)

        def loss_fn(model):
            flow = model(xt, t_f, ctx).astype(jnp.float32)
            err2 = jnp.mean((flow - (eps - x0)) ** 2, axis=2)  # [B, F, h, w]
            per_frame = jnp.mean(err2 * pix_w, axis=(2, 3)) / jnp.mean(pix_w, axis=(2, 3))
            return jnp.sum(per_frame * weight) / jnp.maximum(jnp.sum(weight), 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    ema = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)) if cfg.ema_decay else None

    @jax.jit
    def ema_update(ema, params, decay):
        return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)

    rng = np.random.default_rng([cfg.seed, 22])
    losses = []
    for i in tqdm(range(cfg.steps), desc="dit", disable=not progress):
        idx = rng.integers(0, n, cfg.batch_size)
        t_idx = rng.integers(0, len(tables.sigmas), (cfg.batch_size, chunks))
        clean = rng.random((cfg.batch_size, chunks)) < cfg.clean_prob
        clean[:, -1] = False  # the last chunk always carries loss
        eps = rng.standard_normal((cfg.batch_size, *latents.shape[1:]), dtype=np.float32)
        ctx = text[caption_index[idx]]
        pix_w = (1.0 + cfg.object_weight * object_mask[idx] if cfg.object_weight
                 else np.ones((cfg.batch_size, f, *latents.shape[3:]), np.float32))
        if cfg.caption_dropout:
            ctx = np.where((rng.random(cfg.batch_size) < cfg.caption_dropout)[:, None, None], null_text, ctx)
        losses.append(step(model, opt, jnp.asarray(latents[idx]), jnp.asarray(ctx),
                           jnp.asarray(t_idx), jnp.asarray(clean), jnp.asarray(eps), jnp.asarray(pix_w)))
        if ema is not None:
            ema = ema_update(ema, nnx.state(model, nnx.Param), min(cfg.ema_decay, (1 + i) / (10 + i)))
        if on_step is not None:
            on_step(i, float(losses[-1]))
    if ema is not None:
        nnx.update(model, ema)
    return [float(v) for v in jax.device_get(losses)]
