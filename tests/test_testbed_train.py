"""The testbed's training helpers (``qarvd_jax.testbed.train``) on a width-4 VAE of the testbed layout.

The truncated back-propagation of ``train_vae`` is only right if a window decoded after a warm prefix is
exactly the same stretch of the whole stream decoded at once (the caches carry everything). Planted bugs
this catches: the prefix one chunk short or long, the window re-entering the first-frame path, the
decoder cache not threaded between latent frames.

``inflate_to_video`` must turn an image autoencoder into a video one that starts as the image path frame by
frame: a static clip then reconstructs, every frame, exactly as its single frame does. Planted bugs this
catches: the past-frame taps left in place, the temporal upsampling not repeating (one half zero).
"""

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from extended import extended
from qarvd_jax.models.wan_vae import WanVAE
from qarvd_jax.testbed import config as tb
from qarvd_jax.testbed import train


@pytest.fixture(scope="module")
def vae():
    return WanVAE(tb.vae_config(dim=4), rngs=nnx.Rngs(0))


def test_window_after_a_warm_prefix_equals_the_whole_stream(vae):
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 25, 16, 16, 3)).astype(np.float32))
    mu, _ = train._encode_stream(vae, x, vae.encoder.fresh_cache(), first=True)
    whole, _ = train._decode_frames(vae, mu, vae.decoder.fresh_cache())
    assert mu.shape[1] == 7 and whole.shape == x.shape
    es, ds = vae.encoder.fresh_cache(), vae.decoder.fresh_cache()
    m0, es = train._encode_stream(vae, x[:, :1], es, first=True)
    _, ds = train._decode_frames(vae, m0, ds)
    for k in range(2):  # two warm chunks: frames 1-8
        m, es = train._encode_stream(vae, x[:, 1 + 4 * k:5 + 4 * k], es, first=False)
        _, ds = train._decode_frames(vae, m, ds)
    mw, _ = train._encode_stream(vae, x[:, 9:], es, first=False)
    win, _ = train._decode_frames(vae, mw, ds)
    scale = float(jnp.abs(whole).max())
    np.testing.assert_allclose(np.asarray(mw), np.asarray(mu[:, 3:]), atol=1e-5 * float(jnp.abs(mu).max()))
    np.testing.assert_allclose(np.asarray(win), np.asarray(whole[:, 9:]), atol=1e-5 * scale)
    # the same window after a prefix one chunk short is a different function (the test sees a wrong prefix)
    es, ds = vae.encoder.fresh_cache(), vae.decoder.fresh_cache()
    m0, es = train._encode_stream(vae, x[:, :1], es, first=True)
    _, ds = train._decode_frames(vae, m0, ds)
    m1, es = train._encode_stream(vae, x[:, 1:5], es, first=False)
    _, ds = train._decode_frames(vae, m1, ds)
    short, _ = train._encode_stream(vae, x[:, 9:], es, first=False)
    assert float(jnp.abs(short - mu[:, 3:]).max()) > 1e-3 * float(jnp.abs(mu).max())


def test_inflated_vae_reconstructs_a_static_clip_as_its_image_path():
    vae = WanVAE(tb.vae_config(dim=4), rngs=nnx.Rngs(3))
    frame = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 1, 16, 16, 3)).astype(np.float32))
    img_mu, _ = train._encode_stream(vae, frame, vae.encoder.fresh_cache(), first=True)
    img, _ = train._decode_frames(vae, img_mu, vae.decoder.fresh_cache())
    clip = jnp.repeat(frame, 13, axis=1)
    before, _ = train._decode_frames(vae, train._encode_stream(vae, clip, vae.encoder.fresh_cache(), True)[0],
                                     vae.decoder.fresh_cache())
    assert float(jnp.abs(before - img).max()) > 1e-2 * float(jnp.abs(img).max())  # random taps: not yet
    train.inflate_to_video(vae)
    mu, _ = train._encode_stream(vae, clip, vae.encoder.fresh_cache(), first=True)
    rec, _ = train._decode_frames(vae, mu, vae.decoder.fresh_cache())
    assert mu.shape[1] == 4 and rec.shape == clip.shape
    scale = float(jnp.abs(img).max())
    np.testing.assert_allclose(np.asarray(mu), np.broadcast_to(np.asarray(img_mu), mu.shape),
                               atol=1e-5 * float(jnp.abs(img_mu).max()))
    np.testing.assert_allclose(np.asarray(rec), np.broadcast_to(np.asarray(img), rec.shape), atol=1e-5 * scale)


@extended("train_vae's start and stream steps compile 4 programs (~2 min on one core); the shipped recipe "
          "skips this stage (VAETrainConfig.steps = 0)")
def test_train_vae_takes_start_and_stream_steps_and_learns(vae):
    pool = np.stack([f for _, _, f in train.data.clips(train.data.split_captions()[0], 4, 5, height=32, width=32,
                                                      num_frames=25)])
    model = WanVAE(tb.vae_config(dim=4), rngs=nnx.Rngs(1))
    cfg = train.VAETrainConfig(steps=12, batch_size=2, crop=32, frames=9, lr=3e-3, warmup=2, pool_size=4,
                               stream_prob=0.5)
    losses = train.train_vae(model, pool, cfg, progress=False)
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        train.train_vae(model, pool, train.VAETrainConfig(steps=1, frames=8), progress=False)


def _dit_run(text, caption_dropout, steps=3):
    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel

    model = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    latents = np.random.default_rng(0).standard_normal((4, 6, 16, 4, 4)).astype(np.float32)
    cfg = train.DiTTrainConfig(steps=steps, batch_size=2, warmup=1, caption_dropout=caption_dropout, ema_decay=0.0,
                               object_weight=0.0)
    losses = train.train_dit(model, latents, text, np.asarray([0, 1, 2, 3]), cfg,
                             null_text=np.zeros(text.shape[1:], np.float32), progress=False)
    return losses, jnp.concatenate([x.ravel() for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param))])


def test_caption_dropout_replaces_the_caption_by_the_null_text():
    """Dropout 1: the captions never reach the model (two different text tables train the same weights);
    dropout 0: they do. Planted bug caught: the mask drawn but the caption kept."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((4, 5, 32)).astype(np.float32) for _ in range(2))
    la, wa = _dit_run(a, 1.0)
    lb, wb = _dit_run(b, 1.0)
    assert np.all(np.isfinite(la)) and len(la) == 3
    np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb))
    _, wa0 = _dit_run(a, 0.0)
    _, wb0 = _dit_run(b, 0.0)
    assert float(jnp.abs(wa0 - wb0).max()) > 1e-6


def test_caption_dropout_needs_a_null_text_of_one_caption_shape():
    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel

    model = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    lat, text, idx = np.zeros((1, 6, 16, 4, 4), np.float32), np.zeros((1, 5, 32), np.float32), np.zeros(1, int)
    with pytest.raises(ValueError, match="caption_dropout > 0 needs null_text"):
        train.train_dit(model, lat, text, idx, train.DiTTrainConfig(steps=1, caption_dropout=0.1, object_weight=0.0),
                        progress=False)
    with pytest.raises(ValueError, match=r"null_text has shape \(5, 16\), expected \(5, 32\)"):
        train.train_dit(model, lat, text, idx, train.DiTTrainConfig(steps=1, object_weight=0.0), null_text=np.zeros((5, 16)),
                        progress=False)


def test_reconstruct_clips_is_the_whole_stream_autoencoder_and_vae_psnr_scores_it(vae):
    """``reconstruct_clips`` (encode, then the pipeline's chunked streaming decode, as uint8) equals the
    whole-stream autoencoder within 1.5 grey levels (uint8 truncation); ``vae_psnr`` is the PSNR of exactly those frames. Planted
    bugs this catches: a chunk dropped or repeated in the streaming decode, channels and time swapped."""
    clips = np.random.default_rng(2).integers(0, 256, (2, 13, 16, 16, 3), dtype=np.uint8)
    recon = train.reconstruct_clips(vae, clips)
    whole, _ = train.autoencode(vae, jnp.asarray(train.data.to_model_range(clips)))
    ref = (np.clip(np.asarray(whole, np.float32), -1, 1) * 0.5 + 0.5) * 255.0
    ref = np.moveaxis(ref, 1, -1)  # (B, T, H, W, 3)
    assert [r.shape for r in recon] == [c.shape for c in clips] and recon[0].dtype == np.uint8
    assert max(float(np.abs(r.astype(np.float32) - f).max()) for r, f in zip(recon, ref)) < 1.5  # uint8 truncation
    assert train.vae_psnr(vae, clips) == [train.psnr(r, c) for r, c in zip(recon, clips)]


def test_latent_object_mask_marks_each_latent_pixels_footprint():
    """A loop reference of the causal VAE's grouping (latent frame 0 <- frame 0, frame k <- frames 4k-3..4k)
    and the spatial stride. Planted bugs caught: groups off by one frame, the spatial pool a stride too coarse."""
    clips = np.zeros((2, 9, 8, 8, 3), np.uint8)
    clips[0, 0, 1, 1] = 200      # frame 0 -> latent frame 0, latent pixel (0, 0)
    clips[0, 4, 6, 2] = 200      # frame 4 -> latent frame 1, pixel (1, 0)
    clips[1, 5, 3, 7] = 200      # frame 5 -> latent frame 2, pixel (0, 1)
    mask = train.latent_object_mask(clips, spatial_stride=4)
    assert mask.shape == (2, 3, 2, 2) and mask.dtype == np.float32
    pix = train.object_weights(clips, 1.0)[..., 0] > 1
    ref = np.zeros_like(mask)
    for n in range(2):
        for k in range(3):
            frames = [0] if k == 0 else range(4 * k - 3, 4 * k + 1)
            for i in range(2):
                for j in range(2):
                    ref[n, k, i, j] = any(pix[n, f, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any() for f in frames)
    np.testing.assert_array_equal(mask, ref)
    assert mask.sum() == 3
    with pytest.raises(ValueError, match="do not tile"):
        train.latent_object_mask(clips[:, :8], spatial_stride=4)


def test_object_weight_reweights_the_flow_loss_by_the_mask():
    """Weight 0 ignores the mask (bit-identical training); a non-uniform mask with weight > 0 changes what is
    learnt. Planted bugs caught: the mask never applied, the mask applied with weight 0, no shape check."""
    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4, 6, 16, 4, 4)).astype(np.float32)
    text, idx = rng.standard_normal((4, 5, 32)).astype(np.float32), np.arange(4)
    mask = (rng.random((4, 6, 4, 4)) < 0.3).astype(np.float32)

    def run(weight, mask):
        model = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
        cfg = train.DiTTrainConfig(steps=2, batch_size=2, warmup=1, caption_dropout=0.0, ema_decay=0.0,
                                   object_weight=weight)
        train.train_dit(model, latents, text, idx, cfg, object_mask=mask, progress=False)
        return np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param))])

    plain = run(0.0, None)
    np.testing.assert_array_equal(run(0.0, mask), plain)
    assert np.abs(run(4.0, mask) - plain).max() > 1e-6
    with pytest.raises(ValueError, match="object_weight > 0 needs object_mask"):
        run(4.0, None)
    with pytest.raises(ValueError, match=r"object_mask has shape \(4, 6, 2, 2\)"):
        run(4.0, mask[:, :, :2, :2])
