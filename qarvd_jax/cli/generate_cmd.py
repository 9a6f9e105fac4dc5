"""``qarvd generate --prompts FILE --out DIR``: text -> latents -> mp4 with the streaming pipeline."""

from __future__ import annotations

from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate videos from prompts (built-in tiny model without checkpoints)",
                       description="One mp4 per prompt (16 fps, VBench naming <prompt>-<i>.mp4), latents .npz and "
                       "generation.json. Without --checkpoint/--t5/--vae/--tokenizer the built-in tiny model runs "
                       "on CPU with random weights.")
    p.add_argument("--prompts", help="text file, one prompt per line (required, except with --preset testbed: "
                   "then the held-out captions of its grammar)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="DiT checkpoint (.pt/.pth/.safetensors or Orbax folder)")
    p.add_argument("--preset", help="DiT config preset for --checkpoint (default selfforcing_1_3b); 'testbed': the "
                   "built-in trained mini model (no checkpoint needed)")
    p.add_argument("--t5", help="models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", help="tokenizer.json of google/umt5-xxl (local path)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth")
    p.add_argument("--quantized", help="quantized Orbax checkpoint from `qarvd quantize` (--backend fake), or an "
                   "integer export from `qarvd export` (--backend xla|pallas); replaces --checkpoint")
    p.add_argument("--backend", choices=["fake", "xla", "pallas"], default="fake",
                   help="with --quantized: fake-quant float math (default), or the integer kernels via XLA or "
                   "Pallas (TPU / Hopper GPU)")
    p.add_argument("--kv-cache", default="bf16", choices=["bf16", "int8", "fp8", "int4"],
                   help="self-attention KV-cache format: bf16 (float, the compute dtype; default), int8, fp8 (e4m3) "
                   "or int4 (packed); K scales per channel per frame, V per token (composes with --quantized)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt i is seed + i")
    p.add_argument("--num-frames", type=positive_int, help="latent frames (21 -> 81 video frames; tiny default 6)")
    p.add_argument("--height", type=positive_int, help="pixels (default 480, tiny 64)")
    p.add_argument("--width", type=positive_int, help="pixels (default 832, tiny 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default bfloat16 (tiny: float32)")
    p.add_argument("--embed-cache", help="prompt-embedding cache folder (default OUT/prompt_embeds_cache)")
    p.add_argument("--skip-existing", action="store_true", help="keep videos already in OUT whose recorded "
                   "settings (model, geometry, sampler, seed, prompt) match this run; regenerate the others")
    p.set_defaults(func=run)


def run(args) -> int:
    from qarvd_jax.pipeline.causal_inference import InferenceConfig
    from qarvd_jax.pipeline.text_to_video import GenerateConfig, build_text_to_video, read_prompts

    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.preset == "testbed":
        from qarvd_jax.cli._common import builtin_prompts

        prompts = builtin_prompts("testbed")
    else:
        raise ValueError("qarvd generate needs --prompts FILE (only --preset testbed has default prompts)")
    cfg = GenerateConfig(seed=args.seed, num_frames=args.num_frames, height=args.height, width=args.width,
                         dtype=args.dtype, checkpoint=args.checkpoint, preset=args.preset, t5=args.t5,
                         tokenizer=args.tokenizer, vae=args.vae, embed_cache_dir=args.embed_cache,
                         skip_existing=args.skip_existing, sampler=InferenceConfig(kv_cache=args.kv_cache))
    dit = None
    if args.backend != "fake" and not args.quantized:
        raise ValueError(f"--backend {args.backend} needs --quantized EXPORT (from `qarvd export`)")
    if args.quantized and args.backend == "fake":
        from qarvd_jax.quant.checkpoint import load_quantized_model
        from qarvd_jax.quant.integer.export import is_integer_export, resolve_quantized_checkpoint

        if is_integer_export(args.quantized):
            raise ValueError(f"{args.quantized} is an integer export: run it with --backend xla or pallas")
        dit, _ = load_quantized_model(resolve_quantized_checkpoint(args.quantized), dtype=args.dtype)
    elif args.quantized:
        from qarvd_jax.quant.integer.int_linear import load_integer_model

        dit = load_integer_model(args.quantized, backend=args.backend, dtype=args.dtype)
    t2v, cfg = build_text_to_video(cfg, args.out, dit=dit)
    manifest = t2v.run(prompts, args.out, seed=cfg.seed, num_frames=cfg.num_frames, height=cfg.height,
                       width=cfg.width, skip_existing=cfg.skip_existing,
                       settings={"checkpoint": cfg.checkpoint or f"builtin-{cfg.preset or 'tiny'}", "quantized": args.quantized,
                                 "backend": args.backend if args.quantized else None})
    print(f"wrote {len(manifest['videos'])} videos to {args.out}/videos (latents in {args.out}/latents)")
    return 0
