"""``qarvd outliers CKPT --json OUT``: outlier input channels of every block linear (weights only)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("outliers", help="detect outlier input channels of every block linear (no model run)")
    p.add_argument("checkpoint", help="PyTorch-format (.pt/.pth/.safetensors) or Orbax DiT checkpoint")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--method", choices=["mad", "iqr"], default="mad", help="MAD z-score (default) or IQR rule")
    p.add_argument("--align", type=int, default=32, help="round counts up to a multiple of this (default 32)")
    p.add_argument("--plot", help="PNG of the per-layer sorted column norms with outliers marked")
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
    from convert.state_dict_io import atomic_output
    from qarvd_jax.quant.outliers import outlier_report, plot_outliers

    weights = block_linear_weights(args.checkpoint)
    if not weights:
        raise ValueError(f"{args.checkpoint}: no block linear weights found")
    method = "mad_zscore" if args.method == "mad" else "iqr"
    report = outlier_report(weights, method, args.align)
    with atomic_output(args.json, overwrite=True) as tmp:
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=2)
    print(f"{len(report['layers'])} layers -> {args.json}")
    print("share of layers with outliers, per layer type:")
    for typ, rec in sorted(report["layer_types"].items()):
        print(f"  {typ:18s} {100 * rec['share']:5.1f}%  ({rec['n_dual_scale']}/{rec['n_layers']} layers, "
              f"mean outlier ratio {100 * rec['mean_outlier_ratio']:.1f}%)")
    ov = report["overall"]
    print(f"  {'all':18s} {100 * ov['share']:5.1f}%  ({ov['n_dual_scale']}/{ov['n_layers']} layers)")
    if args.plot:
        plot_outliers(weights, report, args.plot)
        print(f"plot -> {args.plot}")
    return 0
