#!/usr/bin/env python
"""KV-cache bytes and peak memory of streaming generation per cache format, from compiled programs (no data).

For each ``--kv`` format: the exact bytes of the self-attention cache (every leaf: codes, scales,
indices) and ``memory_analysis()`` of the compiled chunk function of
:class:`~qarvd_jax.pipeline.causal_inference.CausalInferencePipeline` (4 denoising passes + the
context pass of one chunk, cache donated) at a model geometry, lowered from ``jax.ShapeDtypeStruct``
inputs with an ``nnx.eval_shape`` model, as ``scripts/plan_memory.py`` does. Peak = arguments + temp +
outputs - aliased (the donated cache is both an argument and an output).

    python scripts/kv_cache_memory.py --json kv_memory.json                   # 1.3B, 21 x 60 x 104 latents
    python scripts/kv_cache_memory.py --preset tiny --latent 6,8,8 --kv bf16,int8

Figures are XLA:CPU's buffer assignment (another backend assigns buffers differently).
"""

from __future__ import annotations

import argparse
import json
import time

GIB = 1024 ** 3


def measure(preset: str, latent: tuple[int, int, int], kv: str, dtype: str = "bfloat16", attention: str | None = None,
            layers: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qarvd_jax.models.wan import kv_cache as kvc
    from qarvd_jax.models.wan.config import PRESETS
    from qarvd_jax.models.wan.kv_quant import kv_bytes
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig

    over = {"param_dtype": dtype, "dtype": dtype, **({"attention": attention} if attention else {}),
            **({"num_layers": layers} if layers else {})}
    cfg = PRESETS[preset](**over)
    model = nnx.eval_shape(lambda: CausalWanModel(cfg, rngs=nnx.Rngs(0)))
    pipe = CausalInferencePipeline(model, InferenceConfig(kv_cache=kv))
    f, h, w = latent
    fsl = cfg.frame_seq_length(h, w)
    fc = cfg.num_frame_per_block
    dt = jnp.dtype(dtype)
    sds = jax.ShapeDtypeStruct
    noise = sds((1, fc, cfg.in_dim, h, w), dt)
    renoise = sds((pipe.num_denoising_steps - 1, 1, fc, cfg.in_dim, h, w), dt)
    ctx = sds((1, cfg.text_len, cfg.text_dim), dt)
    cross = jax.eval_shape(lambda p, c: pipe._cross_impl(pipe.graphdef, p, c)[0], pipe.params, ctx)
    cache = jax.eval_shape(lambda: kvc.new_cache(cfg, 1, f, fsl, dt, kv_cache=kv))
    i32 = sds((), jnp.int32)
    t0 = time.perf_counter()
    compiled = pipe._chunk_fn.lower(pipe.graphdef, pipe.params, noise, renoise, cross, cache, i32, i32,
                                    bit_switch=None).compile()
    ma = compiled.memory_analysis()
    a, t, o, al = (int(x) for x in (ma.argument_size_in_bytes, ma.temp_size_in_bytes, ma.output_size_in_bytes,
                                    ma.alias_size_in_bytes))
    return {"kv_cache": kv, "cache_bytes": kv_bytes(cache), "arguments": a, "temp": t, "output": o, "alias": al,
            "peak": a + t + o - al, "compile_s": round(time.perf_counter() - t0, 1), "preset": preset,
            "layers": cfg.num_layers, "latent": list(latent), "attention": cfg.attention, "dtype": dtype,
            "backend": jax.default_backend(), "jax": jax.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="selfforcing_1_3b")
    p.add_argument("--latent", default="21,60,104", help="latent frames,height,width (default 480x832 px, 81 frames)")
    p.add_argument("--kv", default="bf16,int8,fp8,int4", help="comma-separated cache formats")
    p.add_argument("--attention", help="attention implementation (default: the preset's)")
    p.add_argument("--layers", type=int, help="override the number of blocks (quick checks only)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    latent = tuple(int(v) for v in args.latent.split(","))
    rows = []
    print("| KV cache | cache GiB | x bf16 | peak GiB | arguments GiB | temp GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for kv in [s.strip() for s in args.kv.split(",") if s.strip()]:
        r = measure(args.preset, latent, kv, attention=args.attention, layers=args.layers)
        rows.append(r)
        base = rows[0]["cache_bytes"]
        print(f"| {kv} | {r['cache_bytes'] / GIB:.3f} | {r['cache_bytes'] / base:.4f} | {r['peak'] / GIB:.2f} | "
              f"{r['arguments'] / GIB:.2f} | {r['temp'] / GIB:.2f} | {r['compile_s']} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
