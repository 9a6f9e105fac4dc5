"""Arguments shared by the workflow subcommands (model stack, geometry, prompts, Q-ARVD config)."""

from __future__ import annotations

from qarvd_jax.cli._types import positive_int


def add_model_args(p) -> None:
    g = p.add_argument_group("models (omit all for the built-in tiny model)")
    g.add_argument("--checkpoint", help="DiT checkpoint (.pt/.pth/.safetensors or Orbax folder)")
    g.add_argument("--preset", help="DiT config preset for --checkpoint (default selfforcing_1_3b); 'testbed': the "
                   "built-in trained mini model (no checkpoint needed; 21 latent frames at 32 x 32)")
    g.add_argument("--t5", help="models_t5_umt5-xxl-enc-bf16.pth")
    g.add_argument("--tokenizer", help="tokenizer.json of google/umt5-xxl")
    g.add_argument("--vae", help="Wan2.1_VAE.pth")
    g.add_argument("--dtype", choices=["float32", "bfloat16"])
    g.add_argument("--num-frames", type=positive_int, help="latent frames (default 21; tiny 6)")
    g.add_argument("--height", type=positive_int, help="pixels (default 480; tiny 64)")
    g.add_argument("--width", type=positive_int, help="pixels (default 832; tiny 64)")
    g.add_argument("--embed-cache", help="prompt-embedding cache folder")
    p.add_argument("--prompts", help="prompt file, one per line; required with --checkpoint (the original "
                   "calibrates on MovieGenVideoBench_extended.txt, see the README); default for the built-in "
                   "tiny model: 8 demo prompts; for --preset testbed: the 60 held-out captions of its grammar")
    p.add_argument("--seed", type=int, default=0)


def add_qarvd_config_args(p) -> None:
    p.add_argument("--config", help="Q-ARVD YAML config (configs/qarvd_w4a8.yaml); fields as QARVDConfig")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. w_bits=8 iters=500")


def generate_config(args):
    from qarvd_jax.pipeline.text_to_video import GenerateConfig

    return GenerateConfig(seed=args.seed, num_frames=args.num_frames, height=args.height, width=args.width,
                          dtype=args.dtype, checkpoint=args.checkpoint, preset=args.preset, t5=args.t5,
                          tokenizer=args.tokenizer, vae=args.vae, embed_cache_dir=args.embed_cache)


def prompts(args) -> list[str]:
    """``--prompts`` file, or the demo prompts for the built-in model. With a real ``--checkpoint`` a prompt
    file is required: calibrating a real model on 8 demo prompts would silently change the method."""
    from qarvd_jax.pipeline.text_to_video import read_prompts

    if args.prompts:
        return read_prompts(args.prompts)
    require_prompts_with_checkpoint(args)
    return builtin_prompts(getattr(args, "preset", None))


def builtin_prompts(preset: str | None) -> list[str]:
    """The default prompts of a built-in model: the testbed's held-out captions, else the demo prompts."""
    from qarvd_jax.workflow import DEMO_PROMPTS

    if preset == "testbed":
        from qarvd_jax.testbed.config import held_out_prompts

        return held_out_prompts()
    return list(DEMO_PROMPTS)


def require_prompts_with_checkpoint(args) -> None:
    if (getattr(args, "checkpoint", None) and getattr(args, "preset", None) != "testbed"
            and not getattr(args, "prompts", None) and not getattr(args, "tfds", None)):
        raise ValueError(f"qarvd {args.command} with --checkpoint needs --prompts FILE (calibration prompts; the "
                         "original uses MovieGenVideoBench_extended.txt from the Self-Forcing repository, see the "
                         "README); the built-in demo prompts are only for the built-in tiny model")


def add_sensitivity_args(p) -> None:
    p.add_argument("--sensitivity", help="sensitivity.json from step 1 (chunk weights); omit for uniform weights")
    p.add_argument("--sensitivity-values", metavar="S0,S1,...", help="the chunk sensitivities inline, e.g. a "
                   "published vector 0.546,0.167,0.119,0.079,0.053,0.026,0.010 (one per chunk; any positive "
                   "scale); instead of --sensitivity")


def sensitivity(args, num_chunks: int | None = None):
    """The checked sensitivity vector of ``--sensitivity`` / ``--sensitivity-values`` (None: uniform)."""
    from qarvd_jax.quant.sensitivity import load_sensitivity

    return load_sensitivity(args.sensitivity, args.sensitivity_values, num_chunks)


def qarvd_config(args):
    from qarvd_jax.config import load_config
    from qarvd_jax.quant.recipe import QARVDConfig

    return load_config(QARVDConfig, args.config, args.overrides)
