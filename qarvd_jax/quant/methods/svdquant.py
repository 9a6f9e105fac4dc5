"""SVDQuant: smoothing, a rank-32 full-precision low-rank branch, and a W4A4 residual.

``X' = X diag(l)^-1``, ``W' = W diag(l)`` (K axis), ``W' = L1 L2 + R``; the layer computes
``y = X' (L1 L2)^T + Q(X') Q(R)^T + b`` (``quantizer_variants.md`` §8): the branch acts on the smoothed,
unquantized input; R is symmetric INT4 per group of 64 along K; activations symmetric 4-bit per token
and group of 64, dynamic. ``l_j = max|X_j|^alpha / max|W_j|^beta`` with (alpha, beta) chosen per layer
among ``{(0, 0)} u {(k/20, 0)} u {(k/20, 1 - k/20)}``, k = 1..19, by the lowest layer-output error on
the calibration rows (with the rank-r SVD branch and quantized residual). Low rank: start from the
top-r SVD of W', then iterate ``L1 L2 <- SVD_r(W' - Q(W' - L1 L2))`` up to ``lowrank_iters`` times,
keeping the best by output error and stopping when it gets worse. The branch is stored as
``lr_down`` [in, r] and ``lr_up`` [r, out] (16-bit in a deployment; float here).

Paper: Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models",
ICLR 2025 (arXiv 2411.05007). Code: ``mit-han-lab/deepcompressor`` (smooth search grid, low-rank
calibration with early stop, INT4 group 64) and ``mit-han-lab/nunchaku`` (fused inference). Not
ported: the optional GPTQ on the residual and the NVFP4 variant.

Integer form: none here (the Nunchaku W4A4 kernel with the fused low-rank branch is not in
``kernels_pallas``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import CoreSpec, QuantizedLayer

NAME = "svdquant"
HAS_INTEGER_FORM = False

__all__ = ["NAME", "Config", "Static", "smooth_candidates", "lowrank", "quantize_layer", "apply", "quantize_model",
           "needs_calibration", "weight_bytes"]


@dataclass(frozen=True)
class Config:
    """``rank``: low-rank branch rank (clipped to min(in, out)); ``group_size``: INT4 group along K
    for weights and activations; ``smooth_search``: the (alpha, beta) grid (else ``alpha`` with
    beta = 1 - alpha); ``lowrank_iters``: refinement iterations; ``search_rows``: calibration rows
    used by the searches (random subset)."""

    w_bits: int = 4
    a_bits: int | None = 4
    rank: int = 32
    group_size: int = 64
    smooth_search: bool = True
    alpha: float = 0.5
    lowrank_iters: int = 100
    search_rows: int = 1024
    seed: int = 0
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        if self.rank < 0 or self.group_size < 1 or self.lowrank_iters < 0:
            raise ValueError("svdquant: rank >= 0, group_size >= 1 and lowrank_iters >= 0 are required")
        base.check_bits(NAME, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Static:
    core: CoreSpec
    rank: int
    alpha: float
    beta: float


def needs_calibration(cfg: Config) -> bool:
    return True


def smooth_candidates() -> list[tuple[float, float]]:
    """The deepcompressor grid: (0, 0), (k/20, 0), (k/20, 1 - k/20) for k = 1..19 (39 pairs)."""
    ks = [k / 20 for k in range(1, 20)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in ks] + [(a, 1.0 - a) for a in ks]


def lowrank(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-r factors of W [out, in] (Eckart-Young): (down [in, r], up [r, out]) with
    ``down @ up = (U_r S_r V_r^T)^T``."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False)
    return (vt[:rank].T * s[:rank]), u[:, :rank].T


def _core(cfg: Config) -> CoreSpec:
    w = base.weight_spec(cfg.w_bits, symmetric=True, group_size=cfg.group_size)
    a = base.act_spec(cfg.a_bits, dynamic=True, symmetric=True, group_size=cfg.group_size) if cfg.a_bits else None
    return CoreSpec(w, a, a_dynamic=True)


def _layer(kernel_s, bias, lam, down, up, core, rank, ab) -> QuantizedLayer:
    """A layer from the smoothed kernel [in, out] and the branch; residual quantizers by min-max."""
    resid = kernel_s - down @ up
    state = base.core_calibrate(resid.T, None, core)
    state.update(smooth=lam, lr_down=down, lr_up=up)
    return QuantizedLayer(NAME, resid, bias, state, Static(core, rank, *ab))


def _err(layer: QuantizedLayer, x, y0) -> float:
    return float(jnp.mean((layer(x) - y0) ** 2))


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in] (``in`` a multiple of group_size)."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=True, name=NAME)
    k_in, k_out = kernel.shape
    if k_in % config.group_size:
        raise ValueError(f"svdquant: in_features={k_in} is not a multiple of group_size={config.group_size}")
    if x.shape[0] > config.search_rows:
        rows = np.sort(np.random.default_rng(config.seed).choice(x.shape[0], config.search_rows, replace=False))
        x = x[rows]
    rank = min(config.rank, k_in, k_out)
    core = _core(config)
    y0 = jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)
    x_abs, w_abs = jnp.max(jnp.abs(x), axis=0), jnp.max(jnp.abs(kernel), axis=1)
    cands = smooth_candidates() if config.smooth_search else [(config.alpha, 1.0 - config.alpha)]
    best = None
    for ab in cands:
        lam = base.smoothing_scales(x_abs, w_abs, *ab)
        ks = kernel * lam[:, None]
        layer = _layer(ks, None, lam, *lowrank(ks.T, rank), core, rank, ab)
        e = _err(layer, x, y0)
        if best is None or e < best[0]:
            best = (e, ab, lam, ks, layer)
    err, ab, lam, ks, layer = best
    w_s = ks.T  # [out, in]
    for _ in range(config.lowrank_iters if rank else 0):
        down, up = layer.state["lr_down"], layer.state["lr_up"]
        resid_q = base.quant_weight((ks - down @ up).T, layer.state, core)
        cand = _layer(ks, None, lam, *lowrank(w_s - resid_q, rank), core, rank, ab)
        e = _err(cand, x, y0)
        if e >= err:
            break
        err, layer = e, cand
    return QuantizedLayer(NAME, layer.kernel, bias, layer.state, layer.static)


def apply(kernel, bias, state, x, static: Static, step, chunk, precision=None):
    """y = x' down up + Q(x') Q(R)^T + b with x' = x / l; ``kernel`` is the residual R [in, out]."""
    xs = (x.astype(jnp.float32) / state["smooth"]).astype(x.dtype)
    y = base.core_apply(xs, kernel.T, state, static.core, precision)
    if static.rank:
        y = y + (xs @ state["lr_down"].astype(x.dtype)) @ state["lr_up"].astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


weight_bytes = base.core_weight_bytes


quantize_model = base.rules_quantizer(NAME)
