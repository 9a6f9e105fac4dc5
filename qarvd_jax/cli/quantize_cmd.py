"""``qarvd quantize --method {qarvd,qat} --out DIR``: step 2, quantize the DiT (Orbax checkpoint).

* ``--method qarvd`` (default): the Q-ARVD post-training recipe.
* ``--method qat``: quantization-aware training distilled from the full-precision model
  (:mod:`qarvd_jax.train`): sharded over a device mesh, multi-host capable, resumable.
* ``--method qvgen|lsq|efficientdm`` (QAT methods of :mod:`qarvd_jax.quant.methods`): the same trainer
  (:mod:`qarvd_jax.train.method_qat`); KEY=VALUE are the method's Config fields or QATConfig fields.
"""

from __future__ import annotations

from qarvd_jax.cli._common import add_model_args, add_qarvd_config_args, add_sensitivity_args
from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("quantize", help="step 2: quantize the DiT (Q-ARVD post-training recipe or QAT)",
                       description="--method qarvd: outlier-aware dual-scale split, percentile-MSE weight init, "
                       "chunk-weighted activation calibration, layer-wise AdaRound + learned activation step on "
                       "full-precision inputs, hard-rounding merge; --config/KEY=VALUE are QARVDConfig fields. "
                       "--method qat: the same initial quantizers, then end-to-end training of the quantizer steps "
                       "(and optionally the weights) to reproduce the full-precision model's flows on its own "
                       "generations; --config/KEY=VALUE are QATConfig fields (configs/qat_tiny.yaml). Rerunning a "
                       "qat command resumes from OUT/checkpoints. Writes OUT/quantized (Orbax) and a summary json.")
    add_model_args(p)
    from qarvd_jax.quant.methods import available

    p.add_argument("--method", choices=[*available(), "qat"], default="qarvd",
                   help="a post-training method of qarvd_jax.quant.methods (--config/KEY=VALUE: its Config "
                   "fields, configs/methods/NAME.yaml) or qat")
    p.add_argument("--out", required=True, help="run folder (the checkpoint goes to OUT/quantized)")
    add_sensitivity_args(p)
    p.add_argument("--calib-prompts", type=positive_int, help="calibration videos (Q-ARVD: 1, the first prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/quantized (qarvd; qat always "
                   "rewrites it at the end of a run)")
    g = p.add_argument_group("quantization-aware training (--method qat)")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; unnamed axes 1; "
                   "product = device count; default: all devices on data)")
    g.add_argument("--steps", type=int, help="train until this global step (resumes below it)")
    g.add_argument("--tfds", help="TFDS dataset name or prepared directory holding the prompts (instead of --prompts; "
                   "needs the tfds extra)")
    g.add_argument("--tfds-split", default="train", help="TFDS split (default train)")
    g.add_argument("--tfds-key", default="caption", help="TFDS text feature (default caption)")
    g.add_argument("--tfds-data-dir", help="TFDS data_dir of a registered dataset")
    g.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first "
                   "(also with QARVD_DISTRIBUTED=1)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 where JAX cannot detect the cluster (with "
                   "--num-processes and --process-id; implies --distributed)")
    g.add_argument("--num-processes", type=positive_int, help="number of processes (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's index in [0, --num-processes)")
    g.add_argument("--profile", help="write a jax.profiler trace of steps --profile-steps to this folder")
    g.add_argument("--profile-steps", default="2:4", help="step range START:STOP of the trace (default 2:4)")
    add_qarvd_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qarvd_jax.train.method_qat import is_qat_method

    if args.method == "qat" or is_qat_method(args.method):
        return run_qat_command(args)
    import os

    from qarvd_jax.cli._common import generate_config, prompts, qarvd_config, sensitivity
    from qarvd_jax.quant.methods import load_method_config
    from qarvd_jax.workflow import build_stack, run_quantize_method

    cfg = qarvd_config(args) if args.method == "qarvd" else load_method_config(args.method, args.config,
                                                                                 args.overrides)
    if os.path.exists(os.path.join(args.out, "quantized")) and not args.overwrite:
        raise FileExistsError(f"{args.out}/quantized already exists (use --overwrite)")
    sens = sensitivity(args)  # its length is checked against the video's chunks by the recipe
    from qarvd_jax.quant.methods import get

    data_free = args.method != "qarvd" and not get(args.method).needs_calibration(cfg)  # e.g. dvd-quant
    calib = [] if data_free else prompts(args)[: args.calib_prompts or 1]  # data-free: no prompts read
    stack = build_stack(generate_config(args), args.out)
    ckpt = run_quantize_method(stack, args.method, cfg, calib, seed=args.seed, out_dir=args.out, sensitivity=sens)
    print(f"quantized checkpoint -> {ckpt}\ngenerate with: qarvd generate --quantized {ckpt} --prompts FILE --out DIR")
    return 0


def qat_config(args, overrides=None):
    """QATConfig from --config / KEY=VALUE, then the flags --steps, --mesh, --distributed, --calib-prompts."""
    from qarvd_jax.train.config import load_qat_config

    cfg = load_qat_config(args.config, args.overrides if overrides is None else overrides)
    flags = {"steps": args.steps, "mesh": args.mesh, "calib_prompts": args.calib_prompts,
             "distributed": True if args.distributed else None}
    return cfg.replace(**{k: v for k, v in flags.items() if v is not None})


def run_qat_command(args) -> int:
    from qarvd_jax.cli._common import builtin_prompts, generate_config, require_prompts_with_checkpoint, sensitivity
    from qarvd_jax.train.data import PromptSource
    from qarvd_jax.train.qat import initialize_distributed, run_qat
    from qarvd_jax.train.sharding import make_mesh
    from qarvd_jax.workflow import build_stack

    method = None
    if args.method != "qat":  # a QAT method: its Config fields from KEY=VALUE, the rest QATConfig
        from qarvd_jax.quant.methods import load_method_config
        from qarvd_jax.train.method_qat import split_overrides

        mine, rest = split_overrides(args.method, args.overrides)
        method = (args.method, load_method_config(args.method, None, mine))
        cfg = qat_config(args, rest)
    else:
        cfg = qat_config(args)
    gen = generate_config(args)  # unknown --preset, bad sizes: errors before any work
    sens = sensitivity(args)
    require_prompts_with_checkpoint(args)
    if args.tfds and args.prompts:
        raise ValueError("give either --prompts or --tfds, not both")
    initialize_distributed(cfg.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)  # before any other JAX work
    mesh = make_mesh(cfg.mesh)  # fail fast on a bad --mesh
    if args.tfds:
        source = PromptSource(tfds=args.tfds, tfds_split=args.tfds_split, tfds_key=args.tfds_key,
                              tfds_data_dir=args.tfds_data_dir, max_prompts=cfg.max_prompts)
    elif args.prompts:
        source = PromptSource(prompts_file=args.prompts, max_prompts=cfg.max_prompts)
    else:
        source = PromptSource(prompts=builtin_prompts(args.preset), max_prompts=cfg.max_prompts)
    stack = build_stack(gen, args.out)
    profile = None
    if args.profile:
        a, _, b = args.profile_steps.partition(":")
        if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
            raise ValueError(f"--profile-steps {args.profile_steps!r} must be START:STOP with START < STOP")
        profile = (args.profile, int(a), int(b))
    res = run_qat(stack, cfg, source, out_dir=args.out, sensitivity=sens, mesh=mesh, profile=profile, method=method)
    import jax

    if jax.process_index() == 0:
        first = res.history[0]["loss"] if res.history else float("nan")
        last = res.history[-1]["loss"] if res.history else float("nan")
        where = f"resumed from step {res.resumed_from}" if res.resumed_from is not None else "from scratch"
        print(f"QAT {where} -> step {res.step} (loss {first:.5g} -> {last:.5g}; log {args.out}/train_log.jsonl)\n"
              f"quantized checkpoint -> {res.quantized}\n"
              f"generate with: qarvd generate --quantized {args.out} --prompts FILE --out DIR")
    return 0
