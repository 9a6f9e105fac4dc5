#!/usr/bin/env python
"""Streaming generation benchmark: per-chunk latency, frames per second and peak device memory.

Random weights, real geometry by default (Self-Forcing 1.3B DiT + Wan2.1 VAE in bf16, 21 latent frames
of 60x104 -> 81 frames of 480x832, 4 denoising steps + context pass per chunk, streaming VAE decode).
Prompt embeddings are random (the text encoder runs once per prompt, before the DiT; not timed).
A first video compiles everything; the timed videos reuse the compiled functions.

    python scripts/bench_generate.py                              # needs a GPU/TPU to be quick
    python scripts/bench_generate.py --preset tiny --num-frames 6 --height 64 --width 64 --videos 1
    python scripts/bench_generate.py --quantized RUN/quantized     # fake-quant model from `qarvd quantize`
    python scripts/bench_generate.py --quantized RUN_INT --backend pallas   # integer export on the kernels

The anchor (issue 3): the original PyTorch Self-Forcing reaches ~17 FPS on one H100.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.utils.bench import device_header, peak_device_memory

from qarvd_jax.models.wan.config import PRESETS
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.models.wan_vae import WanVAE, WanVAEConfig, decode_chunks
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig


def build_dit(args):
    if args.quantized and args.backend != "fake":
        from qarvd_jax.quant.integer import load_integer_model

        return load_integer_model(args.quantized, args.backend, dtype=args.dtype)
    if args.quantized:
        from qarvd_jax.quant.checkpoint import load_quantized_model

        model, _ = load_quantized_model(args.quantized, dtype=args.dtype)
        return model
    cfg = PRESETS[args.preset](param_dtype=args.dtype, dtype=args.dtype,
                              **({"attention": args.attention} if args.attention else {}))
    return CausalWanModel(cfg, rngs=nnx.Rngs(0))


def one_video(pipe, vae, noise, emb, seed, decode: bool):
    """Generate (and decode) one video; returns per-chunk (dit_s, vae_s) with device syncs per chunk."""
    times = []
    cache = None
    t0 = time.perf_counter()
    for rec in pipe.stream(noise, emb, seed=seed):
        rec.output.block_until_ready()
        t1 = time.perf_counter()
        if decode:
            pixels, cache = decode_chunks(vae, [jnp.swapaxes(rec.output, 1, 2)], cache)
            pixels.block_until_ready()
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
        t0 = time.perf_counter()
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="selfforcing_1_3b", choices=sorted(PRESETS))
    ap.add_argument("--quantized", help="quantized checkpoint (`qarvd quantize`) or integer export (`qarvd export`) "
                    "instead of a random FP DiT")
    ap.add_argument("--backend", choices=["fake", "xla", "pallas"], default="fake",
                    help="fake-quant model, or the integer model on XLA / Pallas kernels (needs an export)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", help="attention implementation (default: the preset's; reference, blockwise, xla)")
    ap.add_argument("--kv-cache", default="bf16", choices=["bf16", "int8", "fp8", "int4"],
                    help="self-attention KV-cache format (default bf16: the float cache)")
    ap.add_argument("--num-frames", type=int, default=21, help="latent frames")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--videos", type=int, default=2, help="timed videos after the warm-up video")
    ap.add_argument("--no-vae", action="store_true", help="DiT only")
    args = ap.parse_args(argv)

    dit = build_dit(args)
    cfg = dit.config
    tiny = cfg.dim != PRESETS["selfforcing_1_3b"]().dim  # the real VAE goes with the real DiT
    vae_cfg = (WanVAEConfig.tiny() if tiny else WanVAEConfig.wan21()).replace(param_dtype=args.dtype, dtype=args.dtype)
    vae = WanVAE(vae_cfg, rngs=nnx.Rngs(1))
    pipe = CausalInferencePipeline(dit, InferenceConfig(kv_cache=args.kv_cache))
    h, w = args.height // vae_cfg.space_stride, args.width // vae_cfg.space_stride
    dt = jnp.dtype(args.dtype)
    noise = jax.random.normal(jax.random.key(0), (1, args.num_frames, cfg.in_dim, h, w), dt)
    emb = jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim), dt)
    decode = not args.no_vae
    t0 = time.perf_counter()
    one_video(pipe, vae, noise, emb, 0, decode)
    warm = time.perf_counter() - t0
    runs = [one_video(pipe, vae, noise, emb, i + 1, decode) for i in range(args.videos)]
    per_chunk = np.array(runs)  # [videos, chunks, 2]
    dit_ms = 1e3 * per_chunk[..., 0].mean(0)
    vae_ms = 1e3 * per_chunk[..., 1].mean(0)
    frames = 1 + vae_cfg.time_stride * (args.num_frames - 1)
    total_s = per_chunk.sum(axis=(1, 2)).mean()
    print(device_header())
    print(f"DiT {'quantized ' + args.quantized if args.quantized else args.preset} {args.dtype}; "
          f"{args.num_frames} latent frames {h}x{w} -> {frames} frames {args.height}x{args.width}; "
          f"{pipe.num_denoising_steps} steps + context pass per chunk; KV cache {args.kv_cache}; "
          f"VAE {'on' if decode else 'off'}")
    print(f"warm-up video (compile + run): {warm:.1f} s; timed videos: {args.videos}")
    print("| chunk | DiT ms | VAE ms |\n|---|---|---|")
    for i, (a, b) in enumerate(zip(dit_ms, vae_ms)):
        print(f"| {i} | {a:.1f} | {b:.1f} |")
    print(f"| total per video | {1e3 * per_chunk[..., 0].sum(1).mean():.0f} | {1e3 * per_chunk[..., 1].sum(1).mean():.0f} |")
    print(f"frames per second: {frames / total_s:.2f}  (video frames / (DiT + VAE) time per video)")
    print(f"peak device memory: {peak_device_memory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
