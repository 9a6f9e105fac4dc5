#!/usr/bin/env python
"""One chunk forward of the causal DiT (random weights, jit, warm): ms per chunk, tokens/s, memory.

Default: the real Self-Forcing 1.3B geometry in bf16 (3 latent frames of 60x104 -> 4680 new tokens,
KV cache of 21 frames = 32760 tokens, 512 text tokens), attending a cache filled up to the last chunk.

    python scripts/bench_dit.py                      # 1.3B, bf16 (needs a GPU/TPU to be quick)
    python scripts/bench_dit.py --preset tiny --height 8 --width 8 --frames 6   # CPU smoke run
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="selfforcing_1_3b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--frames", type=int, default=21, help="latent frames of the video (KV cache size)")
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attention", help="attention implementation (default: the preset's; reference, blockwise, xla)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)

    cfg = PRESETS[args.preset](param_dtype=args.dtype, dtype=args.dtype,
                              **({"attention": args.attention} if args.attention else {}))
    model = CausalWanModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    fc = cfg.num_frame_per_block
    fsl = cfg.frame_seq_length(args.height, args.width)
    dt = jnp.dtype(args.dtype)
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, fc, cfg.in_dim, args.height, args.width), dt)
    t = jnp.full((args.batch, fc), 937.5, jnp.float32)
    ctx = jax.random.normal(key, (args.batch, cfg.text_len, cfg.text_dim), dt)
    cross = jax.jit(lambda p, c: nnx.merge(graphdef, p).cross_kv(c))(params, ctx)
    cache = model.init_cache(args.batch, args.frames, fsl, dtype=dt)
    last_chunk_start = (args.frames // fc - 1) * fc * fsl
    cache = cache.replace(global_end=jnp.int32(last_chunk_start), local_end=jnp.int32(last_chunk_start))
    del model

    @jax.jit
    def chunk(p, x, t, cross, cache, start):
        return nnx.merge(graphdef, p).forward_chunk(x, t, cross, cache, start)

    start = jnp.int32(last_chunk_start)
    t0 = time.perf_counter()
    out, _ = chunk(params, x, t, cross, cache, start)
    out.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out, _ = chunk(params, x, t, cross, cache, start)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    tokens = args.batch * fc * fsl
    print(device_header())
    print(f"preset {args.preset}  dtype {args.dtype}  attention {cfg.attention}  batch {args.batch}  "
          f"chunk {fc}x{args.height}x{args.width} latents = {tokens} tokens  cache {cache.cache_len} tokens")
    print("| metric | value |\n|---|---|")
    print(f"| first call (compile + run) | {compile_s:.1f} s |")
    print(f"| ms per chunk forward (median of {args.iters}) | {ms:.2f} |")
    print(f"| tokens/s | {tokens / (ms / 1e3):,.0f} |")
    print(f"| peak device memory | {peak_device_memory()} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
