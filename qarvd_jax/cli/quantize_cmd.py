"""``qarvd quantize --method qarvd --out DIR``: step 2, post-training quantization (Orbax checkpoint)."""

from __future__ import annotations

import json

from qarvd_jax.cli._common import add_model_args, add_qarvd_config_args


def register(sub) -> None:
    p = sub.add_parser("quantize", help="step 2: quantize the DiT (Q-ARVD post-training recipe)",
                       description="Q-ARVD: outlier-aware dual-scale split, percentile-MSE weight init, chunk-weighted "
                       "activation calibration, layer-wise AdaRound + learned activation step on full-precision "
                       "inputs, hard-rounding merge. Writes OUT/quantized (Orbax) and OUT/quantize.json.")
    add_model_args(p)
    p.add_argument("--method", choices=["qarvd"], default="qarvd")
    p.add_argument("--out", required=True, help="run folder (the checkpoint goes to OUT/quantized)")
    p.add_argument("--sensitivity", help="sensitivity.json from step 1 (chunk weights); omit for uniform weights")
    p.add_argument("--calib-prompts", type=int, default=1, help="calibration videos (Q-ARVD: 1, the first prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/quantized")
    add_qarvd_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from qarvd_jax.cli._common import generate_config, prompts, qarvd_config
    from qarvd_jax.workflow import build_stack, run_quantize_qarvd

    cfg = qarvd_config(args)
    if os.path.exists(os.path.join(args.out, "quantized")) and not args.overwrite:
        raise FileExistsError(f"{args.out}/quantized already exists (use --overwrite)")
    sens = None
    if args.sensitivity:
        with open(args.sensitivity) as fh:
            sens = json.load(fh)["sensitivity"]
    stack = build_stack(generate_config(args), args.out)
    ckpt = run_quantize_qarvd(stack, cfg, prompts(args)[: args.calib_prompts], seed=args.seed, out_dir=args.out,
                              sensitivity=sens)
    print(f"quantized checkpoint -> {ckpt}\ngenerate with: qarvd generate --quantized {ckpt} --prompts FILE --out DIR")
    return 0
