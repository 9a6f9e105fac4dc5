"""``qarvd compare --methods rtn,gptq,... --bits w8a8,w4a8,w4a4 --out DIR``: quantizer variants side by side."""

from __future__ import annotations

from qarvd_jax.cli._common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("compare", help="quantize with several methods and bit settings, generate, evaluate vs FP",
                       description="Per method and bit setting: quantize a copy of the DiT on the same calibration "
                       "prompts and seeds, generate every prompt with the same seeds, evaluate against the "
                       "full-precision videos. Writes DIR/compare.json, DIR/compare.md (table sorted by quality), "
                       "DIR/quality.png and DIR/error_per_chunk.png. A failing run is reported in its row. "
                       "Overrides: METHOD.KEY=VALUE (one method) or KEY=VALUE (every method with that field).")
    add_model_args(p)
    p.add_argument("--methods", default="rtn,smoothquant,gptq,vidit-q,svdquant,qarvd,dvd-quant",
                   help="comma-separated method names (qarvd_jax.quant.methods.available())")
    p.add_argument("--bits", default="w8a8,w4a8,w4a4", help="comma-separated wNaM settings (a16: FP activations)")
    p.add_argument("--kv", "--kv-cache", default="bf16", help="comma-separated KV-cache formats (bf16, int8, fp8, "
                   "int4): every method and bit setting runs with each, each quantized format also alone (fp "
                   "weights); all against FP weights with the bf16 cache (KV cache column)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib-prompts", type=int, default=1, help="calibration videos (the first prompts; default 1)")
    p.add_argument("--num-prompts", type=int, help="evaluate on the first N prompts (default all)")
    p.add_argument("--steps", type=int, default=20, help="training steps of every QAT method (qvgen, lsq, "
                   "efficientdm: the same budget for each; default 20)")
    p.add_argument("--qat-config", help="QATConfig YAML for the QAT methods' trainer (batch, dtype, mesh, ...)")
    p.add_argument("--sensitivity", help="sensitivity.json from `qarvd sensitivity` (Q-ARVD chunk weights)")
    p.add_argument("--config", action="append", default=[], metavar="METHOD=FILE",
                   help="YAML config of one method (repeatable), e.g. gptq=configs/methods/gptq.yaml")
    p.add_argument("overrides", nargs="*", metavar="[METHOD.]KEY=VALUE", help="config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from qarvd_jax.cli._common import generate_config, prompts
    from qarvd_jax.compare import parse_bits, parse_method_overrides, run_compare
    from qarvd_jax.quant.methods import get
    from qarvd_jax.workflow import build_stack

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names:
        raise ValueError("--methods is empty")
    for n in names:
        get(n)  # unknown names fail before any work, listing the available ones
    bits = parse_bits(args.bits)
    from qarvd_jax.models.wan.kv_quant import check_kv_format

    kv = [check_kv_format(f.strip(), "--kv") for f in args.kv.split(",") if f.strip()]
    overrides = parse_method_overrides(args.overrides, names)
    files = {}
    for item in args.config:
        if "=" not in item:
            raise ValueError(f"--config {item!r} is not METHOD=FILE")
        m, f = item.split("=", 1)
        files[m.strip()] = f
    sens = None
    if args.sensitivity:
        with open(args.sensitivity) as fh:
            sens = json.load(fh)["sensitivity"]
    all_prompts = prompts(args)
    eval_prompts = all_prompts[: args.num_prompts] if args.num_prompts else all_prompts
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    qat_cfg = None
    if args.qat_config:
        from qarvd_jax.train.config import load_qat_config

        qat_cfg = load_qat_config(args.qat_config)
    stack = build_stack(generate_config(args), args.out)
    report = run_compare(stack, names, bits, eval_prompts, all_prompts[: args.calib_prompts], seed=args.seed,
                         out_dir=args.out, overrides=overrides, config_files=files, sensitivity=sens,
                         kv_formats=kv, steps=args.steps, qat_config=qat_cfg)
    failed = [r for r in report["results"] if r["error"]]
    print(open(f"{args.out}/compare.md").read())
    print(f"compare -> {args.out}/compare.json, compare.md, quality.png, error_per_chunk.png"
          + (f" ({len(failed)} of {len(report['results'])} runs failed, see the error column)" if failed else ""))
    return 0
