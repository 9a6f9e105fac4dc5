"""Training of the testbed (library side of ``scripts/train_testbed.py``).

1. :func:`train_vae`: the Wan causal VAE as a deterministic autoencoder on random crops of procedural
   clips (MSE + L1 on pixels in [-1, 1], a small L2 on the latent mean), through the same causal
   encoder/decoder as inference: the first frame alone, then chunks of 4 frames with the feature cache
   (the chunk loop is unrolled: XLA:CPU differentiates an unrolled loop ~10x faster than ``lax.scan``).
2. :func:`encode_dataset`: training clips -> normalised latents ``[N, 21, 16, 8, 8]`` with the trained
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

__all__ = ["VAETrainConfig", "DecoderTuneConfig", "DiTTrainConfig", "autoencode", "render_pool", "train_vae",
           "finetune_decoder", "latent_moments",
           "encode_dataset", "train_dit", "vae_psnr", "psnr"]


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1400
    batch_size: int = 8
    crop: int = 32
    frames: int = 9  # 1 + 4k: the first-frame path and two cached chunks
    lr: float = 2e-4  # 1e-3 and above collapse to a constant output within ~100 steps (Adam, width 8 and 16)
    warmup: int = 50
    latent_l2: float = 1e-4
    pool_size: int = 192
    seed: int = 0


@dataclass(frozen=True)
class DecoderTuneConfig:
    """Stage 1b: the decoder alone on whole 81-frame clips at full size (the encoder frozen). Trained on
    9-frame crops only, the decoder's causal cache drifts after ~3 latent frames (PSNR falls from ~30 to
    ~9 dB over a 21-latent stream); this stage trains the steady state the pipeline decodes."""

    steps: int = 150
    lr: float = 2e-4
    warmup: int = 10
    pool_size: int = 48
    seed: int = 0


@dataclass(frozen=True)
class DiTTrainConfig:
    steps: int = 2500
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    clean_prob: float = 0.25
    timestep_shift: float = 3.0
    seed: int = 0


def _adamw(lr: float, warmup: int, steps: int, weight_decay: float = 0.0):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def autoencode(vae: WanVAE, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``video (B, 3, T, H, W)`` in [-1, 1], ``T = 1 + 4k`` -> ``(reconstruction (B, 3, T, H, W), mu
    (B, T', h, w, z))`` through the causal encoder and decoder (un-normalised latents, no clamp)."""
    z_dim = vae.config.z_dim
    x = to_channels_last(video).astype(vae.config.dtype)
    out, slots = vae.encoder(x[:, :1], vae.encoder.fresh_cache())
    outs = [out]
    for i in range(1, x.shape[1], 4):
        y, slots = vae.encoder(x[:, i:i + 4], slots)
        outs.append(y)
    mu = vae.conv1(jnp.concatenate(outs, axis=1))[0][..., :z_dim]
    return _decode_stream(vae, mu), mu


def render_pool(captions: list[data.Caption], count: int, data_seed: int, **geometry) -> tuple[np.ndarray, list]:
    """``count`` clips as uint8 ``[count, T, H, W, 3]`` and their ``(caption, seed)``."""
    frames, meta = [], []
    for cap, seed, f in tqdm(data.clips(captions, count, data_seed, **geometry), total=count, desc="render",
                             leave=False):
        frames.append(f)
        meta.append((cap, seed))
    return np.stack(frames), meta


def train_vae(vae: WanVAE, pool: np.ndarray, cfg: VAETrainConfig, *, progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``vae`` in place on random ``crop x crop x frames`` windows of ``pool`` (uint8 clips);
    returns the loss per step."""
    opt = nnx.Optimizer(vae, _adamw(cfg.lr, cfg.warmup, cfg.steps), wrt=nnx.Param)

    @nnx.jit
    def step(vae, opt, video):
        def loss_fn(vae):
            recon, mu = autoencode(vae, video)
            err = recon - video
            return jnp.mean(err ** 2) + 0.1 * jnp.mean(jnp.abs(err)) + cfg.latent_l2 * jnp.mean(mu ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(vae)
        opt.update(vae, grads)
        return loss

    rng = np.random.default_rng([cfg.seed, 11])
    n, t_all, h, w, _ = pool.shape
    losses = []
    for i in tqdm(range(cfg.steps), desc="vae", disable=not progress):
        idx = rng.integers(0, n, cfg.batch_size)
        t0 = rng.integers(0, t_all - cfg.frames + 1, cfg.batch_size)
        y0 = rng.integers(0, h - cfg.crop + 1, cfg.batch_size)
        x0 = rng.integers(0, w - cfg.crop + 1, cfg.batch_size)
        batch = np.stack([pool[j, a:a + cfg.frames, b:b + cfg.crop, c:c + cfg.crop]
                          for j, a, b, c in zip(idx, t0, y0, x0)])
        if rng.random() < 0.5:
            batch = batch[:, :, :, ::-1]
        losses.append(step(vae, opt, jnp.asarray(data.to_model_range(batch))))
        if on_step is not None:
            on_step(i, float(losses[-1]))
    return [float(v) for v in jax.device_get(losses)]


def _decode_stream(vae: WanVAE, mu: jax.Array) -> jax.Array:
    """Un-normalised latents ``(B, T', h, w, z)`` -> pixels ``(B, 3, 1 + 4 (T' - 1), H, W)``, frame by frame
    through the decoder's causal cache (the streaming decode, unrolled)."""
    z = vae.conv2(mu)[0]
    y, slots = vae.decoder(z[:, :1], vae.decoder.fresh_cache())
    ys = [y]
    for i in range(1, z.shape[1]):
        y, slots = vae.decoder(z[:, i:i + 1], slots)
        ys.append(y)
    return to_channels_first(jnp.concatenate(ys, axis=1))


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


def vae_psnr(vae: WanVAE, clips_u8: np.ndarray, chunk_frames: int = 3) -> list[float]:
    """Per-clip PSNR of encode -> streaming decode (chunks of ``chunk_frames`` latent frames, as the
    pipeline decodes) -> clamp -> uint8, against the original uint8 clips."""
    from qarvd_jax.models.wan_vae import decode_chunks

    out = []
    latents = encode_dataset(vae, clips_u8)  # one jitted encoder for every clip
    for clip, lat in zip(clips_u8, latents):
        lat = jnp.asarray(np.swapaxes(lat[None], 1, 2))  # (1, C, T', h, w)
        chunks = [lat[:, :, i:i + chunk_frames] for i in range(0, lat.shape[2], chunk_frames)]
        pixels, _ = decode_chunks(vae, chunks, None)
        x = np.clip(np.asarray(pixels[0], np.float32), -1, 1) * 0.5 + 0.5
        recon = (x * 255.0).astype(np.uint8).transpose(1, 2, 3, 0)
        out.append(psnr(recon, clip[:recon.shape[0]]))
    return out


def train_dit(model, latents: np.ndarray, text: np.ndarray, caption_index: np.ndarray, cfg: DiTTrainConfig, *,
              progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Flow-matching training of ``model`` in place.

    Args:
      latents: normalised clean latents ``[N, F, C, h, w]`` (F a multiple of the chunk size).
      text: prompt embeddings ``[num_captions, text_len, text_dim]``; ``caption_index [N]`` the row of
        each latent's caption.
    """
    fc = model.config.num_frame_per_block
    n, f = latents.shape[:2]
    chunks = f // fc
    tables = sch.flow_match_tables(cfg.timestep_shift)
    sig_table, t_table = jnp.asarray(tables.sigmas), jnp.asarray(tables.timesteps)
    opt = nnx.Optimizer(model, _adamw(cfg.lr, cfg.warmup, cfg.steps, cfg.weight_decay), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x0, ctx, t_idx, clean, eps):
        sigma = jnp.where(clean, 0.0, sig_table[t_idx])  # [B, chunks]
        t = jnp.where(clean, 0.0, t_table[t_idx])
        sigma_f, t_f = jnp.repeat(sigma, fc, axis=1), jnp.repeat(t, fc, axis=1)  # per frame
        xt = (1 - sigma_f)[..., None, None, None] * x0 + sigma_f[..., None, None, None] * eps
        weight = jnp.repeat((~clean).astype(jnp.float32), fc, axis=1)

        def loss_fn(model):
            flow = model(xt, t_f, ctx).astype(jnp.float32)
            per_frame = jnp.mean((flow - (eps - x0)) ** 2, axis=(2, 3, 4))
            return jnp.sum(per_frame * weight) / jnp.maximum(jnp.sum(weight), 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng([cfg.seed, 22])
    losses = []
    for i in tqdm(range(cfg.steps), desc="dit", disable=not progress):
        idx = rng.integers(0, n, cfg.batch_size)
        t_idx = rng.integers(0, len(tables.sigmas), (cfg.batch_size, chunks))
        clean = rng.random((cfg.batch_size, chunks)) < cfg.clean_prob
        clean[:, -1] = False  # the last chunk always carries loss
        eps = rng.standard_normal((cfg.batch_size, *latents.shape[1:]), dtype=np.float32)
        losses.append(step(model, opt, jnp.asarray(latents[idx]), jnp.asarray(text[caption_index[idx]]),
                           jnp.asarray(t_idx), jnp.asarray(clean), jnp.asarray(eps)))
        if on_step is not None:
            on_step(i, float(losses[-1]))
    return [float(v) for v in jax.device_get(losses)]
