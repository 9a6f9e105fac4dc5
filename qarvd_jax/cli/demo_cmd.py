"""``qarvd demo --out DIR``: sensitivity -> quantize -> generate -> evaluate on a built-in model (tiny or testbed)."""

from __future__ import annotations

from qarvd_jax.cli._types import nonnegative_int, positive_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the four-step workflow on a built-in model (CPU, minutes)",
                       description="Step 1 chunk sensitivity, step 2 Q-ARVD post-training quantization (and a few "
                       "QAT steps), step 3 full-precision and quantized videos with the same seeds, step 4 "
                       "evaluation. Writes OUT/report.json (sensitivity + metrics), reports and plots.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["tiny", "testbed"], default=None,
                   help="built-in model: testbed (the trained mini ARVD, the default when its weights are in the "
                   "package or $QARVD_TESTBED_WEIGHTS) or tiny (random weights; the default otherwise)")
    p.add_argument("--num-prompts", type=positive_int, default=4,
                   help="videos generated and evaluated per model")
    p.add_argument("--recon-iters", type=nonnegative_int, default=200,
                   help="AdaRound iterations per layer (Q-ARVD: 2000)")
    p.add_argument("--qat-steps", type=nonnegative_int, default=4)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from qarvd_jax.demo import DemoConfig, run_demo
    from qarvd_jax.testbed.config import weights_available

    preset = args.preset or ("testbed" if weights_available() else "tiny")
    print(f"demo on the {preset} model" + ("" if args.preset else " (pick another with --preset)"))
    cfg = DemoConfig(preset=preset, seed=args.seed, num_prompts=args.num_prompts, recon_iters=args.recon_iters,
                     qat_steps=args.qat_steps)
    report = run_demo(args.out, cfg)
    print("sensitivity per chunk:", ", ".join(f"{s:.3f}" for s in report["sensitivity"]))
    for name, m in report["metrics"].items():
        print(f"{name}: " + json.dumps({k: v for k, v in m.items() if not isinstance(v, (list, dict))}))
    print(f"report: {args.out}/report.json; per-variant reports: "
          + ", ".join(report["reports"].values()))
    return 0
