"""``qarvd sensitivity --out DIR``: step 1, chunk-wise sensitivity (JSON + bar plot)."""

from __future__ import annotations

from qarvd_jax.cli._common import add_model_args, add_qarvd_config_args
from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="step 1: chunk-wise sensitivity of the quantized model",
                       description="Quantize only chunk k (W and A, every pass of the chunk), measure the MSE of the "
                       "final latents against full precision with the same noise over N prompts, normalise to sum "
                       "1. The first prompt calibrates the activation ranges (uniform chunk weights).")
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder for sensitivity.json and sensitivity.png")
    p.add_argument("--num-prompts", type=positive_int, default=100,
                   help="prompts measured (default 100, as the original)")
    add_qarvd_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qarvd_jax.cli._common import generate_config, prompts, qarvd_config
    from qarvd_jax.workflow import build_stack, run_sensitivity

    cfg = qarvd_config(args)
    prompt_list = prompts(args)
    stack = build_stack(generate_config(args), args.out)
    result = run_sensitivity(stack, cfg, prompt_list, num_prompts=args.num_prompts, seed=args.seed,
                             out_dir=args.out)
    s = ", ".join(f"{v:.4f}" for v in result["sensitivity"])
    print(f"sensitivity per chunk: [{s}] -> {args.out}/sensitivity.json, {args.out}/sensitivity.png")
    return 0
