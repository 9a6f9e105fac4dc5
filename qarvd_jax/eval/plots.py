"""Plots of a ``qarvd evaluate`` report dict (matplotlib Agg, no pyplot global state)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["pixel_chunk_starts", "plot_error_per_chunk", "plot_psnr_ssim_per_frame"]

_VAE_TIME_STRIDE = 4  # Wan VAE: latent frame 0 -> 1 frame, every later latent frame -> 4 frames


def pixel_chunk_starts(num_frames: int, num_latent_frames: int, chunk_frames: int) -> list[int]:
    """First video frame of every chunk after the first, for the Wan VAE's causal time stride 4.

    Latent frames ``[k*cf, (k+1)*cf)`` decode to video frames ``[4*k*cf - 3, 4*(k+1)*cf - 3)`` (the first
    chunk starts at 0). Returns ``[]`` when ``num_frames != 1 + 4 * (num_latent_frames - 1)``.
    """
    if num_frames != 1 + _VAE_TIME_STRIDE * (num_latent_frames - 1) or chunk_frames < 1:
        return []
    return [_VAE_TIME_STRIDE * k * chunk_frames - 3 for k in range(1, num_latent_frames // chunk_frames)]


def _curves(ax, report: dict, key: str, title: str, ylabel: str, xlabel: str) -> None:
    curves = [v[key] for v in report["per_video"].values() if key in v]
    mean = report["aggregate"].get(key)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if not curves:
        ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        return
    for c in curves:
        ax.plot(range(len(c)), c, color="0.7", lw=0.8)
    ax.plot(range(len(mean)), mean, color="C0", lw=2, marker="o" if len(mean) <= 30 else None,
            label=f"mean of {len(curves)} video(s)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_error_per_chunk(report: dict, path: str) -> None:
    """Latent MSE and latent PSNR per chunk (grey: each video, blue: mean) -> ``path`` (png)."""
    fig = Figure(figsize=(10, 4))
    ax_mse, ax_psnr = fig.subplots(1, 2)
    _curves(ax_mse, report, "latent_mse_per_chunk", "latent MSE per chunk", "MSE", "chunk")
    _curves(ax_psnr, report, "latent_psnr_per_chunk", "latent PSNR per chunk", "PSNR (dB)", "chunk")
    _save(fig, path)


def plot_psnr_ssim_per_frame(report: dict, path: str) -> None:
    """Pixel PSNR and SSIM per frame (grey: each video, blue: mean), dotted lines at chunk starts."""
    fig = Figure(figsize=(10, 4))
    ax_psnr, ax_ssim = fig.subplots(1, 2)
    _curves(ax_psnr, report, "psnr_per_frame", "PSNR per frame", "PSNR (dB)", "frame")
    _curves(ax_ssim, report, "ssim_per_frame", "SSIM per frame", "SSIM", "frame")
    first = next((v for v in report["per_video"].values() if "num_frames" in v and "chunk_frames" in v), None)
    if first is not None:
        for x in pixel_chunk_starts(first["num_frames"], first["num_latent_frames"], first["chunk_frames"]):
            for ax in (ax_psnr, ax_ssim):
                ax.axvline(x - 0.5, color="0.4", ls=":", lw=0.8)
    _save(fig, path)
