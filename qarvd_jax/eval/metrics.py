"""Video-quality metrics as Q-ARVD computes them (``common_metrics_on_video_quality``), plus latent errors.

Layouts and ranges used throughout this package:

* a **video** is a channels-last float array ``[T, H, W, C]`` with values in ``[0, 1]`` (C = 3, RGB);
* **latents** are ``[F, C, h, w]`` float32 as ``qarvd generate`` saves them, F = num_chunks * chunk_frames;
* **features** for the Fréchet distance are ``[N, D]`` (one row per video).

Pixel PSNR and SSIM reproduce ``calculate_psnr.py`` / ``calculate_ssim.py`` (same formulas, windows,
constants and valid-region crop; float64 arithmetic). The resize in :func:`fvd_preprocess` reproduces
``F.interpolate(..., mode='bilinear', align_corners=False)`` (no antialiasing) including PyTorch's
float32 source-index arithmetic. Everything here is plain numpy (no scipy at run time) except the resize,
which returns a ``jax.Array`` so it can feed the I3D network directly.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

__all__ = [
    "PSNR_CAP",
    "bilinear_indices",
    "feature_stats",
    "frame_psnr",
    "frame_ssim",
    "frechet_distance",
    "fvd_preprocess",
    "fvd_resize_geometry",
    "gaussian_kernel_1d",
    "latent_mse_per_chunk",
    "latent_psnr_per_chunk",
    "resize_bilinear",
]

PSNR_CAP = 100.0  # value reported for (near-)identical inputs, as calculate_psnr.py
_MSE_EPS = 1e-10
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2


def _same_shape(ref: np.ndarray, test: np.ndarray, what: str) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"{what}: reference shape {tuple(ref.shape)} != test shape {tuple(test.shape)}")


# ------------------------------------------------------------------------------------------- latents

def _chunked_sq_err(ref: np.ndarray, test: np.ndarray, chunk_frames: int) -> np.ndarray:
    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    _same_shape(ref, test, "latents")
    if ref.ndim != 4:
        raise ValueError(f"latents must be [F, C, h, w], got shape {ref.shape}")
    if chunk_frames < 1 or ref.shape[0] % chunk_frames:
        raise ValueError(f"{ref.shape[0]} latent frames are not a whole number of chunks of {chunk_frames}")
    err = (ref - test) ** 2
    return err.reshape(ref.shape[0] // chunk_frames, -1).mean(axis=1)


def latent_mse_per_chunk(ref: np.ndarray, test: np.ndarray, chunk_frames: int) -> np.ndarray:
    """Mean squared error per chunk of latent frames.

    Args:
      ref, test: latents ``[F, C, h, w]`` (any float dtype), F a multiple of ``chunk_frames``.
      chunk_frames: latent frames per autoregressive chunk (3 for Self-Forcing).

    Returns:
      float64 ``[F // chunk_frames]``: the MSE over each chunk's ``chunk_frames * C * h * w`` values.
    """
    return _chunked_sq_err(ref, test, chunk_frames)


def latent_psnr_per_chunk(ref: np.ndarray, test: np.ndarray, chunk_frames: int,
                          data_range: float | None = None) -> np.ndarray:
    """PSNR per chunk of latent frames, ``10 log10(data_range**2 / MSE_chunk)`` in dB.

    Latents are unbounded, so the peak is a choice: by default ``data_range`` is the **peak-to-peak of
    the whole reference latent** (``ref.max() - ref.min()`` over all frames), one scale per video, so
    the per-chunk PSNRs of a video are a monotone transform of its per-chunk MSEs and comparable
    across chunks. A chunk whose MSE is below ``1e-10 * data_range**2`` gets :data:`PSNR_CAP` (100),
    the pixel metric's rule for identical inputs.

    Returns:
      float64 ``[F // chunk_frames]``.
    """
    mse = _chunked_sq_err(ref, test, chunk_frames)
    if data_range is None:
        r = np.asarray(ref, np.float64)
        data_range = float(r.max() - r.min())
    if not data_range > 0:
        raise ValueError(f"latent PSNR needs a positive data range, got {data_range} (constant reference?)")
    peak = data_range ** 2
    out = np.full(mse.shape, PSNR_CAP)
    ok = mse >= _MSE_EPS * peak
    out[ok] = 10.0 * np.log10(peak / mse[ok])
    return out


# ------------------------------------------------------------------------------------- PSNR / SSIM

def frame_psnr(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR as ``calculate_psnr.img_psnr``, data range 1.

    Args:
      ref, test: frames ``[T, ...]`` (any per-frame layout, e.g. ``[T, H, W, C]``) in ``[0, 1]``.

    Returns:
      float64 ``[T]``: ``20 log10(1 / sqrt(MSE))`` over each frame's values, or 100 when MSE < 1e-10.
      The original reports the mean of these values (not a PSNR of the pooled MSE).
    """
    ref = np.asarray(ref)
    test = np.asarray(test)
    _same_shape(ref, test, "frames")
    diff = ref.astype(np.float64) - test.astype(np.float64)
    mse = (diff ** 2).reshape(diff.shape[0], -1).mean(axis=1)
    out = np.full(mse.shape, PSNR_CAP)
    ok = mse >= _MSE_EPS
    out[ok] = 20.0 * np.log10(1.0 / np.sqrt(mse[ok]))
    return out


def gaussian_kernel_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """``cv2.getGaussianKernel(size, sigma)`` for sigma > 0: float64 ``[size]``, sums to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) * 0.5
    g = np.exp(-0.5 / (sigma * sigma) * x * x)
    return g / g.sum()


def _correlate_valid(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Valid correlation of ``x`` with a symmetric odd kernel ``k`` along ``axis`` (length n -> n - len(k) + 1).

    Uses the symmetry (``k[i] == k[-1 - i]``): ``k[c] x[c:] + sum_i k[i] (x[i:] + x[n-1-i:])``, in place.
    """
    n, c = len(k), len(k) // 2
    length = x.shape[axis] - n + 1

    def win(i):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(i, i + length)
        return x[tuple(idx)]

    acc = win(c) * k[c]
    tmp = np.empty_like(acc)
    for i in range(c):
        np.add(win(i), win(n - 1 - i), out=tmp)
        tmp *= k[i]
        acc += tmp
    return acc


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Correlate the last two axes with ``outer(k, k)``, keeping only the valid region.

    ``[..., H, W] -> [..., H - n + 1, W - n + 1]``; equals ``cv2.filter2D(x, -1, outer(k, k))``
    cropped by ``n // 2`` on each side (the crop makes the border mode irrelevant), up to float64
    summation order.
    """
    return _correlate_valid(_correlate_valid(x, k, x.ndim - 1), k, x.ndim - 2)


def frame_ssim(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame SSIM as ``calculate_ssim.calculate_ssim_function``, data range 1.

    Per frame and channel, in float64: 11x11 Gaussian window (sigma 1.5), C1 = 0.01**2, C2 = 0.03**2,
    local statistics on the valid region only; the SSIM map is averaged, then the channels.

    Args:
      ref, test: videos ``[T, H, W, C]`` in ``[0, 1]``, H and W at least 11.

    Returns:
      float64 ``[T]``.
    """
    ref = np.asarray(ref)
    test = np.asarray(test)
    _same_shape(ref, test, "frames")
    if ref.ndim != 4 or min(ref.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames [T, H, W, C] with H, W >= {SSIM_WINDOW}, got {ref.shape}")
    k = gaussian_kernel_1d()
    return np.array([_ssim_frame(np.moveaxis(fa, -1, 0), np.moveaxis(fb, -1, 0), k) for fa, fb in zip(ref, test)])


def _ssim_frame(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> float:
    """SSIM of one frame ``[C, H, W]``, averaged over channels (one frame at a time stays in cache)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    mu1, mu2 = _filter_valid(a, k), _filter_valid(b, k)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = _filter_valid(a * a, k) - mu1_sq
    sigma2_sq = _filter_valid(b * b, k) - mu2_sq
    sigma12 = _filter_valid(a * b, k) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
        (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2))
    return float(ssim_map.mean(axis=(1, 2)).mean())


# ----------------------------------------------------------------------------------- Fréchet distance

def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (N - 1 normalisation, ``np.cov(rowvar=False)``) of ``[N, D]``."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise ValueError(f"features must be [N >= 1, D], got shape {feats.shape}")
    sigma = np.cov(feats, rowvar=False) if feats.shape[0] > 1 else np.zeros((feats.shape[1],) * 2)
    return feats.mean(axis=0), np.atleast_2d(sigma)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_test: np.ndarray, feats_ref: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N1, D]`` and ``[N2, D]``.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))``. ``Tr sqrtm(S1 S2)`` is computed as the trace of
    ``sqrtm(A S2 A)`` with ``A = S1^(1/2)`` (symmetric eigendecompositions; same eigenvalues as
    ``S1 S2``), which is what ``scipy.linalg.sqrtm(...).real`` approximates, without its complex
    round-off on rank-deficient covariances. With a single sample in either set only the mean term is
    used (the original's rule for one video).
    """
    mu1, s1 = feature_stats(feats_test)
    mu2, s2 = feature_stats(feats_ref)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    if min(np.shape(feats_test)[0], np.shape(feats_ref)[0]) < 2:
        return mean_term
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) * 0.5), 0.0, None))))
    return mean_term + float(np.trace(s1) + np.trace(s2)) - 2.0 * tr_sqrt


# ----------------------------------------------------------------------------- resize / FVD inputs

def bilinear_indices(in_size: int, out_size: int, scale: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear resize with ``align_corners=False``.

    Args:
      in_size, out_size: lengths of the axis before and after.
      scale: the ``scale_factor`` the caller passed to torch (then torch uses ``1 / scale``);
        ``None`` when a target ``size`` was passed (then torch uses ``in_size / out_size``).

    Returns:
      ``(i0, i1, w0, w1)``, each ``[out_size]``: ``out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]]``.
      The source coordinate is computed in float32 like ATen's CPU kernel,
      ``max((j + 0.5) * s - 0.5, 0)``.
    """
    s = np.float32(1.0 / scale) if scale is not None and scale > 0 else np.float32(in_size) / np.float32(out_size)
    src = s * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1) - w1), w1


def _resize_axis(x, axis: int, out_size: int, scale: float | None):
    i0, i1, w0, w1 = bilinear_indices(x.shape[axis], out_size, scale)
    shape = [1] * x.ndim
    shape[axis] = out_size
    return (jnp.take(x, i0, axis=axis) * w0.reshape(shape) + jnp.take(x, i1, axis=axis) * w1.reshape(shape))


def resize_bilinear(x, out_hw: tuple[int, int], *, scale_hw: tuple[float, float] | None = None,
                    axes: tuple[int, int] = (-3, -2)):
    """Bilinear resize (``align_corners=False``, no antialiasing) of two axes of ``x``.

    Args:
      x: array with the image axes at ``axes`` (default ``[..., H, W, C]``).
      out_hw: output size.
      scale_hw: torch ``scale_factor`` per axis if the original passed one (LPIPS' upsample), else None.

    Returns:
      ``jax.Array`` float32. The width is interpolated first, then the height, which is the order of
      ATen's arithmetic ``h0 * (w0 x00 + w1 x01) + h1 * (w0 x10 + w1 x11)``.
    """
    sh, sw = scale_hw if scale_hw is not None else (None, None)
    x = jnp.asarray(x, jnp.float32)
    ah, aw = (a % x.ndim for a in axes)
    return _resize_axis(_resize_axis(x, aw, out_hw[1], sw), ah, out_hw[0], sh)


def fvd_resize_geometry(h: int, w: int, resolution: int = 224) -> tuple[int, int, int, int]:
    """``(resized_h, resized_w, crop_top, crop_left)`` of ``styleganv/fvd.py: preprocess_single``.

    The shorter side becomes ``resolution``, the other ``ceil(side * resolution / short)``; then a
    centre crop. 480x832 -> 224x389, crop offset (0, 82).
    """
    scale = resolution / min(h, w)
    th, tw = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    return th, tw, (th - resolution) // 2, (tw - resolution) // 2


def fvd_preprocess(video, resolution: int = 224):
    """Video ``[T, H, W, C]`` in [0, 1] -> I3D input ``[T, res, res, C]`` float32 in [-1, 1].

    Bilinear resize of each frame (shorter side to ``resolution``), centre crop, ``(x - 0.5) * 2``;
    all frames kept (no temporal subsampling), as Q-ARVD's FVD.
    """
    if np.ndim(video) != 4:
        raise ValueError(f"video must be [T, H, W, C], got shape {np.shape(video)}")
    _, h, w, _ = np.shape(video)
    th, tw, top, left = fvd_resize_geometry(h, w, resolution)
    x = resize_bilinear(video, (th, tw))
    x = x[:, top:top + resolution, left:left + resolution, :]
    return (x - 0.5) * 2.0
