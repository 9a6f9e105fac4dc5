#!/usr/bin/env python
"""Train the testbed (VAE, then DiT) on procedural clips and write its shipped weights.

    python scripts/train_testbed.py                      # everything, into qarvd_jax/testbed/weights
    python scripts/train_testbed.py --out runs/testbed   # elsewhere (then copy the four files)
    python scripts/train_testbed.py --reuse-vae          # keep OUT/vae.safetensors, train the DiT only

Writes ``OUT/{dit,vae,umt5}.safetensors`` (PyTorch key layouts), ``OUT/testbed.json`` (configs, sampler,
latent statistics, recipe, measured figures, reference latents) and ``OUT/train/`` (loss curves as
``losses.json`` and ``losses.png``, held-out samples as mp4). Reproducible from ``--seed``; uses an
accelerator when JAX has one. Figures: ``docs/testbed.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from convert.state_dict_io import write_state_dict  # noqa: E402
from convert.wan_dit import export_torch  # noqa: E402
from qarvd_jax.config import load_config  # noqa: E402
from qarvd_jax.models import umt5 as umt5_lib  # noqa: E402
from qarvd_jax.models.wan.loading import model_params  # noqa: E402
from qarvd_jax.models.wan.model import CausalWanModel  # noqa: E402
from qarvd_jax.models.wan_vae import WanVAE, load_wan_vae, to_torch_state_dict  # noqa: E402
from qarvd_jax.pipeline.causal_inference import SAMPLERS  # noqa: E402
from qarvd_jax.testbed import config as tb  # noqa: E402
from qarvd_jax.testbed import data, train  # noqa: E402
from qarvd_jax.testbed.score import score_video  # noqa: E402


def _plot(losses: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.5))
    for ax, (name, vals) in zip(np.atleast_1d(axes), losses.items()):
        v = np.asarray(vals)
        k = max(1, len(v) // 50)
        ax.plot(v, alpha=0.3, lw=0.8)
        ax.plot(np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set(title=f"{name} loss", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _encoder(t5):
    return umt5_lib.make_prompt_encoder(t5, umt5_lib.ToyTokenizer(t5.config.vocab_size, tb.TEXT_LEN))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=tb.WEIGHTS_DIR)
    p.add_argument("--seed", type=int, default=0, help="model init and batch order")
    p.add_argument("--data-seed", type=int, default=2026, help="seed of the procedural clips")
    p.add_argument("--vae-steps", type=int, default=train.VAETrainConfig.steps)
    p.add_argument("--decoder-steps", type=int, default=train.DecoderTuneConfig.steps,
                   help="stage 1b: the decoder on whole 81-frame clips")
    p.add_argument("--dit-steps", type=int, default=train.DiTTrainConfig.steps)
    p.add_argument("--dit-clips", type=int, default=960, help="training clips encoded for the DiT")
    p.add_argument("--height", type=int, default=tb.HEIGHT, help="pixels per frame (multiple of 16)")
    p.add_argument("--width", type=int, default=tb.WIDTH, help="pixels per frame (multiple of 16)")
    p.add_argument("--eval-videos", type=int, default=12)
    p.add_argument("--sampler", choices=SAMPLERS, default="euler",
                   help="sampler recorded in testbed.json (euler: the flow ODE; self_forcing: fresh re-noising)")
    p.add_argument("--sampling-steps", type=int, default=8, help="denoising steps of the recorded sampler")
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance of the recorded sampler (needs dit.caption_dropout > 0)")
    p.add_argument("--reuse-vae", action="store_true", help="keep OUT/vae.safetensors and its statistics")
    p.add_argument("--reuse-dit", action="store_true", help="keep OUT/dit.safetensors (with --reuse-vae: evaluate "
                   "and rewrite testbed.json only)")
    p.add_argument("overrides", nargs="*", metavar="STAGE.FIELD=VALUE",
                   help="recipe overrides, e.g. vae.lr=3e-4 dit.ema_decay=0.999 (stages: vae, decoder, dit)")
    args = p.parse_args(argv)
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        p.error(f"--height/--width must be multiples of 16 (VAE stride 4, DiT patch 2, 2 x 2 tokens at least), "
                f"got {args.height} x {args.width}")
    geo = dict(height=args.height, width=args.width)
    os.makedirs(os.path.join(args.out, "train"), exist_ok=True)
    log_path = os.path.join(args.out, "train", "losses.json")
    t_start = time.perf_counter()
    timings, figures = {}, {}
    print(f"[testbed] backend {jax.default_backend()}, devices {jax.device_count()}")
    train_caps, held_caps = data.split_captions()
    stages = {"vae": [f"steps={args.vae_steps}", f"seed={args.seed}"],
              "decoder": [f"steps={args.decoder_steps}", f"seed={args.seed}"],
              "dit": [f"steps={args.dit_steps}", f"seed={args.seed}"]}
    for item in args.overrides:
        stage, _, rest = item.partition(".")
        if stage not in stages or "=" not in rest:
            p.error(f"override {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(stages)}")
        stages[stage].append(rest)
    vae_cfg = load_config(train.VAETrainConfig, None, stages["vae"])
    dec_cfg = load_config(train.DecoderTuneConfig, None, stages["decoder"])
    dit_cfg = load_config(train.DiTTrainConfig, None, stages["dit"])
    losses = json.load(open(log_path)) if args.reuse_vae and os.path.exists(log_path) else {}

    # ---- 1. VAE
    vae_path = os.path.join(args.out, "vae.safetensors")
    stats_path = os.path.join(args.out, "train", "latent_stats.json")
    if args.reuse_vae:
        stats = json.load(open(stats_path))
        vae = load_wan_vae(vae_path, tb.vae_config(**stats))
    else:
        t0 = time.perf_counter()
        pool, _ = train.render_pool(train_caps, vae_cfg.pool_size, args.data_seed, **geo)
        vae = WanVAE(tb.vae_config(), rngs=nnx.Rngs(args.seed))
        losses["vae_images"] = train.train_images(vae, pool, steps=vae_cfg.image_steps,
                                                  batch_size=vae_cfg.image_batch_size, lr=vae_cfg.image_lr,
                                                  latent_l2=vae_cfg.latent_l2, seed=vae_cfg.seed)
        train.inflate_to_video(vae)
        if vae_cfg.steps:
            losses["vae"] = train.train_vae(vae, pool, vae_cfg)
        if vae_cfg.decoder_image_steps:
            losses["decoder_images"] = train.train_images(vae, pool, steps=vae_cfg.decoder_image_steps,
                                                          batch_size=vae_cfg.image_batch_size,
                                                          lr=vae_cfg.decoder_image_lr, latent_l2=vae_cfg.latent_l2,
                                                          seed=vae_cfg.seed, decoder_only=True)
        mu = train.latent_moments(vae, pool[:64])
        stats = {"latent_mean": [float(v) for v in mu.mean(axis=(0, 2, 3, 4))],
                 "latent_std": [float(v) for v in mu.std(axis=(0, 2, 3, 4))]}
        vae = load_wan_vae(_save_vae(vae, vae_path), tb.vae_config(**stats))
        if dec_cfg.steps:
            t1 = time.perf_counter()
            long_pool, _ = train.render_pool(train_caps, dec_cfg.pool_size, args.data_seed + 3, **geo)
            losses["decoder"] = train.finetune_decoder(vae, long_pool, dec_cfg)
            vae = load_wan_vae(_save_vae(vae, vae_path), tb.vae_config(**stats))
            del long_pool
            timings["decoder_tune_s"] = round(time.perf_counter() - t1, 1)
        json.dump(stats, open(stats_path, "w"))
        json.dump(losses, open(log_path, "w"))
        timings["vae_train_s"] = round(time.perf_counter() - t0, 1)
        last = losses.get("vae") or losses.get("decoder_images") or losses["vae_images"]
        print(f"[testbed] VAE trained in {timings['vae_train_s']} s, final loss {np.mean(last[-50:]):.5f}")
    held_clips, _ = train.render_pool(held_caps, 8, args.data_seed + 1, **geo)
    psnrs = train.vae_psnr(vae, held_clips)
    figures["vae_psnr_db"] = round(float(np.mean(psnrs)), 2)
    figures["vae_psnr_min_db"] = round(float(np.min(psnrs)), 2)
    print(f"[testbed] VAE held-out PSNR {figures['vae_psnr_db']} dB (min {figures['vae_psnr_min_db']})")

    # ---- 2. text + latents (the DiT's training data; depends on the encoder only)
    t0 = time.perf_counter()
    t5 = umt5_lib.UMT5Encoder(tb.umt5_config(), rngs=nnx.Rngs(0))
    write_state_dict(umt5_lib.to_torch_state_dict(t5), os.path.join(args.out, "umt5.safetensors"), overwrite=True)
    all_caps = data.all_captions()
    text = _encoder(t5)([c.text for c in all_caps]).astype(np.float32)
    info_extra = {"umt5_sha256": _sha256(os.path.join(args.out, "umt5.safetensors"))}
    row = {c: i for i, c in enumerate(all_caps)}
    if not args.reuse_dit:
        clips, meta = train.render_pool(train_caps, args.dit_clips, args.data_seed + 2, **geo)
        latents = train.encode_dataset(vae, clips)
        object_mask = train.latent_object_mask(clips, clips.shape[2] // latents.shape[-2])
        cap_index = np.asarray([row[c] for c, _ in meta])
        del clips
        timings["encode_s"] = round(time.perf_counter() - t0, 1)
        print(f"[testbed] {len(latents)} clips encoded in {timings['encode_s']} s, latent std {latents.std():.3f}")

    # ---- 3. DiT
    if not args.reuse_dit:
        t0 = time.perf_counter()
        dit = CausalWanModel(tb.dit_config(), rngs=nnx.Rngs(args.seed))
        null_text = np.zeros_like(text[0])  # unconditional = all padding, as the guided sampler's second branch
        losses["dit"] = train.train_dit(dit, latents, text, cap_index, dit_cfg, null_text=null_text,
                                        object_mask=object_mask)
        timings["dit_train_s"] = round(time.perf_counter() - t0, 1)
        json.dump(losses, open(log_path, "w"))
        export_torch(model_params(dit), dit.config, os.path.join(args.out, "dit.safetensors"), overwrite=True)
        print(f"[testbed] DiT trained in {timings['dit_train_s']} s, final loss {np.mean(losses['dit'][-50:]):.4f}")
    _plot(losses, os.path.join(args.out, "train", "losses.png"))

    # ---- 4. held-out evaluation through the shipped files
    sampler = tb.default_sampler(args.sampler, args.sampling_steps, args.guidance_scale)
    spec = tb.TestbedSpec(dit=tb.dit_config(), vae=tb.vae_config(**stats), sampler=sampler, umt5_seed=0,
                          **geo)
    json.dump(spec.to_json(), open(os.path.join(args.out, "testbed.json"), "w"), indent=2)
    spec, dit, vae, t5 = tb.load_models(weights_dir=args.out)
    figures.update(evaluate(spec, dit, vae, t5, args.eval_videos, os.path.join(args.out, "train")))
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    info = {"data_seed": args.data_seed, "seed": args.seed, "recipe": {"vae": dataclasses.asdict(vae_cfg),
            "decoder": dataclasses.asdict(dec_cfg),
            "dit": dataclasses.asdict(dit_cfg), "dit_clips": args.dit_clips}, "figures": figures,
            "timings": timings, "backend": jax.default_backend(), "jax": jax.__version__, **info_extra}
    spec = dataclasses.replace(spec, info={**info, "reference": reference_latents(spec, dit, vae, t5)})
    json.dump(spec.to_json(), open(os.path.join(args.out, "testbed.json"), "w"), indent=2)
    print(json.dumps({"figures": figures, "timings": timings}, indent=2))
    return 0


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _save_vae(vae, path: str) -> str:
    write_state_dict(to_torch_state_dict(vae), path, overwrite=True)
    return path


def _t2v(spec, dit, vae, t5):
    from qarvd_jax.pipeline.text_to_video import TextToVideo

    return TextToVideo(dit, vae, _encoder(t5), spec.sampler, vae_config=spec.vae)


def evaluate(spec, dit, vae, t5, n: int, out_dir: str) -> dict:
    """FP task score on ``n`` held-out captions (seeds 0..n-1); writes the videos to ``out_dir``."""
    from qarvd_jax.pipeline.text_to_video import write_video

    t2v = _t2v(spec, dit, vae, t5)
    prompts = tb.held_out_prompts(n)
    emb = t2v.encode_prompts(prompts)
    shape = t2v.latent_shape(spec.num_frames, spec.height, spec.width)
    scores = []
    for i, prompt in enumerate(prompts):
        _, frames = t2v.generate_one(emb[i], i, shape, chunk_bar=False)
        scores.append(score_video(frames, prompt))
        write_video(os.path.join(out_dir, f"heldout-{i}.mp4"), frames)
        print(f"  {prompt}: {scores[-1]['task_score']:.2f} {scores[-1]['detected']}")
    parts = {k: round(float(np.mean([s[k] for s in scores])), 3) for k in ("task_score", "colour", "shape",
                                                                           "direction", "presence")}
    return {"fp_" + k: v for k, v in parts.items()}


def reference_latents(spec, dit, vae, t5) -> dict:
    """Statistics of the latents of the first held-out caption at seed 0 (the load test compares them)."""
    t2v = _t2v(spec, dit, vae, t5)
    prompt = tb.held_out_prompts(1)[0]
    lat, _ = t2v.generate_one(t2v.encode_prompts([prompt])[0], 0,
                              t2v.latent_shape(spec.num_frames, spec.height, spec.width), decode=False,
                              chunk_bar=False)
    fc = spec.dit.num_frame_per_block
    return {"prompt": prompt, "seed": 0,
            "chunk_mean": [float(lat[i:i + fc].mean()) for i in range(0, len(lat), fc)],
            "chunk_std": [float(lat[i:i + fc].std()) for i in range(0, len(lat), fc)]}


if __name__ == "__main__":
    raise SystemExit(main())
