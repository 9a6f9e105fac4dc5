"""``qarvd outliers CKPT --json OUT``: outlier input channels of every block linear (weights only)."""

from __future__ import annotations

import json
import os

from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("outliers", help="detect outlier input channels of every block linear (no model run)")
    p.add_argument("checkpoint", help="PyTorch-format (.pt/.pth/.safetensors) or Orbax DiT checkpoint")
    p.add_argument("--json", required=True, help="output JSON (a file; never the checkpoint)")
    p.add_argument("--method", choices=["mad", "iqr"], default="mad", help="MAD z-score (default) or IQR rule")
    p.add_argument("--align", type=positive_int, default=32, help="round counts up to a multiple of this (default 32)")
    p.add_argument("--plot", help="PNG of the per-layer sorted column norms with outliers marked")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    p.add_argument("--allow-nonfinite", action="store_true", help="analyse even if weights hold NaN/inf (they are "
                   "reported either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def block_linear_weights(path: str) -> dict:
    """``{pytorch name: W [out, in]}`` of every linear inside the blocks (host numpy, lazily read)."""
    from convert.wan_dit import is_orbax_checkpoint, load_orbax, read_dit_checkpoint
    from qarvd_jax.models.wan import params as wan_params

    if is_orbax_checkpoint(path):
        params, cfg, _ = load_orbax(path)
        state = wan_params.flax_to_torch(params, cfg)
    else:
        state, _ = read_dit_checkpoint(path)
    return {k[: -len(".weight")]: v for k, v in state.items()
            if k.startswith("blocks.") and k.endswith(".weight") and getattr(v, "ndim", 0) == 2}


def run(args) -> int:
    from tqdm.auto import tqdm

    from convert.state_dict_io import FiniteCheck, atomic_output, check_destination
    from qarvd_jax.errors import OutputError
    from qarvd_jax.quant.outliers import outlier_report, plot_outliers

    outputs = [p for p in (args.json, args.plot) if p]
    if args.plot and os.path.abspath(args.plot) == os.path.abspath(args.json):
        raise OutputError(f"--json and --plot are the same file: {args.json}")
    for path in outputs:  # before the (minutes of) reading
        check_destination(path, kind="file", overwrite=args.overwrite, sources=[args.checkpoint])
    weights = block_linear_weights(args.checkpoint)
    if not weights:
        raise ValueError(f"{args.checkpoint}: no block linear weights found")
    finite = FiniteCheck(args.checkpoint, args.allow_nonfinite)
    finite.add_all(tqdm(weights.items(), total=len(weights), desc="read weights", unit="layer",
                        disable=args.no_progress)).finish()
    method = "mad_zscore" if args.method == "mad" else "iqr"
    report = outlier_report(weights, method, args.align, progress=not args.no_progress)
    text = json.dumps(report, indent=2)
    with atomic_output(args.json, overwrite=args.overwrite, sources=[args.checkpoint]) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
    print(f"{len(report['layers'])} layers -> {args.json}")
    print("share of layers with outliers, per layer type:")
    for typ, rec in sorted(report["layer_types"].items()):
        print(f"  {typ:18s} {100 * rec['share']:5.1f}%  ({rec['n_dual_scale']}/{rec['n_layers']} layers, "
              f"mean outlier ratio {100 * rec['mean_outlier_ratio']:.1f}%)")
    ov = report["overall"]
    print(f"  {'all':18s} {100 * ov['share']:5.1f}%  ({ov['n_dual_scale']}/{ov['n_layers']} layers)")
    if args.plot:
        with atomic_output(args.plot, overwrite=args.overwrite, sources=[args.checkpoint]) as tmp:
            plot_outliers(weights, report, tmp)
        print(f"plot -> {args.plot}")
    return 0
