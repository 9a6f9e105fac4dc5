"""``qarvd export CKPT OUT``: a `qarvd quantize` checkpoint -> packed integer weights + scales (Orbax)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export a quantized checkpoint to integer weights for the Pallas/XLA kernels",
                       description="Integer codes (int4 packed two per byte along K for W4, int8 for W8), outlier "
                       "input channels permuted to the front (permutation stored), weight scales/zero points, "
                       "column sums, static activation scales/zero points and biases per quantized layer; the "
                       "other params in --dtype. Prints the real byte sizes. Run the result with "
                       "`qarvd generate --quantized OUT --backend xla|pallas`.")
    p.add_argument("checkpoint", metavar="CKPT", help="Orbax folder from `qarvd quantize` (or its run folder)")
    p.add_argument("out", metavar="OUT", help="export folder (written atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="dtype of the non-quantized params and biases (default: the checkpoint's param dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing integer export at OUT (never "
                   "another folder, never CKPT or a folder holding it)")
    p.add_argument("--allow-nonfinite", action="store_true", help="export even if weights or quantizer scales "
                   "hold NaN/inf (they are reported either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from qarvd_jax.quant.integer.export import export_checkpoint, format_bytes_report

    meta = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite,
                             allow_nonfinite=args.allow_nonfinite, progress=not args.no_progress)
    print(format_bytes_report(meta))
    print(f"integer export -> {args.out}\ngenerate with: qarvd generate --quantized {args.out} --backend xla "
          "--prompts FILE --out DIR")
    return 0
