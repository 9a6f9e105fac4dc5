"""Weight outlier input channels for dual-scale quantization (Q-ARVD spec §4). Host numpy, float64.

Statistic: ``n_j = ||W[:, j]||_2``, the L2 norm of input-channel column j of W[out, in] (PyTorch
layout, ``in_axis=1``; pass ``in_axis=0`` for a Flax kernel [in, out]).

* MAD z-score rule (default): ``m = median(n)``, ``MAD = median(|n - m|)``; MAD < 1e-8 means no
  outliers; channel j is flagged iff ``0.6745·(n_j - m)/MAD > 3.5`` and ``n_j > 1.2·m``. Reported
  threshold: ``max(m + 3.5·MAD/0.6745, 1.2·m)``.
* IQR rule: threshold ``max(Q3 + 1.5·IQR, 1.2·m)`` (linear-interpolated quartiles), flagged iff
  ``n_j > threshold``.
* The flagged count K (if > 0) is rounded up to a multiple of ``align`` (32) and capped at
  ``floor(in/2)``; the outlier set is the top-K channels by norm (ties: lower index first), returned
  sorted by channel index. K = 0 means the layer stays single-scale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "OutlierMethod",
    "OutlierResult",
    "column_norms",
    "count_outliers",
    "align_count",
    "top_k_channels",
    "detect_outliers",
    "layer_type",
    "outlier_report",
    "plot_outliers",
]

OutlierMethod = Literal["mad_zscore", "iqr"]
_MAD_Z_FACTOR = 0.6745
_MAD_EPS = 1e-8


@dataclass(frozen=True)
class OutlierResult:
    """Detection outcome for one weight.

    count: K after rounding up to ``align`` and the 50 % cap (0: single-scale).
    n_flagged: channels that passed the rule before rounding.
    threshold: the effective norm threshold, ``None`` when MAD < 1e-8 (rule not applicable).
    channels: int64 ``[K]`` outlier channel indices (top-K by norm), ascending.
    in_features: number of input channels.
    """

    count: int
    n_flagged: int
    threshold: float | None
    channels: np.ndarray
    in_features: int


def column_norms(w, in_axis: int = 1) -> np.ndarray:
    """float64 ``[in]`` L2 norms of the input-channel columns of a 2-D weight."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"outlier detection needs a 2-D weight, got shape {w.shape}")
    if in_axis not in (0, 1, -1, -2):
        raise ValueError(f"in_axis must be 0 or 1 for a 2-D weight, got {in_axis}")
    w = w.astype(np.float64)
    return np.sqrt(np.sum(w * w, axis=1 - (in_axis % 2)))


def count_outliers(norms, method: OutlierMethod = "mad_zscore", *, mad_threshold: float = 3.5,
                   min_ratio_vs_median: float = 1.2, iqr_k: float = 1.5) -> tuple[int, float | None]:
    """``(n_flagged, threshold)`` of the MAD z-score or IQR rule on a 1-D norm vector."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1 or norms.size == 0:
        raise ValueError(f"norms must be a non-empty 1-D array, got shape {norms.shape}")
    median = float(np.median(norms))
    floor = min_ratio_vs_median * median
    if method == "mad_zscore":
        mad = float(np.median(np.abs(norms - median)))
        if mad < _MAD_EPS:
            return 0, None
        z = _MAD_Z_FACTOR * (norms - median) / mad
        n_flagged = int(np.sum((z > mad_threshold) & (norms > floor)))
        return n_flagged, max(median + mad_threshold * mad / _MAD_Z_FACTOR, floor)
    if method == "iqr":
        q1, q3 = np.percentile(norms, [25.0, 75.0])
        threshold = max(float(q3 + iqr_k * (q3 - q1)), floor)
        return int(np.sum(norms > threshold)), threshold
    raise ValueError(f"unknown outlier method {method!r}; use 'mad_zscore' or 'iqr'")


def align_count(n_flagged: int, in_features: int, align: int = 32) -> int:
    """Round a positive count up to a multiple of ``align``, then cap at ``floor(in_features/2)``."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if n_flagged <= 0:
        return 0
    return min(-(-n_flagged // align) * align, in_features // 2)


def top_k_channels(norms, k: int) -> np.ndarray:
    """Indices (int64, ascending) of the ``k`` largest norms; ties go to the lower index."""
    norms = np.asarray(norms, dtype=np.float64)
    if not 0 <= k <= norms.size:
        raise ValueError(f"k={k} must lie in [0, {norms.size}]")
    return np.sort(np.argsort(-norms, kind="stable")[:k]).astype(np.int64)


def detect_outliers(w, method: OutlierMethod = "mad_zscore", *, align: int = 32, in_axis: int = 1,
                    mad_threshold: float = 3.5, min_ratio_vs_median: float = 1.2,
                    iqr_k: float = 1.5) -> OutlierResult:
    """Outlier input channels of a weight (W[out, in] by default; ``in_axis=0`` for [in, out])."""
    norms = column_norms(w, in_axis)
    n_flagged, threshold = count_outliers(norms, method, mad_threshold=mad_threshold,
                                          min_ratio_vs_median=min_ratio_vs_median, iqr_k=iqr_k)
    count = align_count(n_flagged, norms.size, align)
    return OutlierResult(count, n_flagged, threshold, top_k_channels(norms, count), int(norms.size))


def _split_block(name: str) -> tuple[str, int | None]:
    """``(layer type, block index)``: the first purely numeric dotted component that is not the last
    one is the block index; it and everything before it are dropped."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[i + 1:]), int(part)
    return name, None


def layer_type(name: str) -> str:
    """Layer type = name without its block prefix: ``"blocks.3.self_attn.q" -> "self_attn.q"``,
    ``"blocks.0.ffn.2" -> "ffn.2"``; names without a block index are returned unchanged."""
    return _split_block(name)[0]


def outlier_report(weights: Mapping[str, np.ndarray], method: OutlierMethod = "mad_zscore", align: int = 32, *,
                   name_filter: Sequence[str] | None = ("block",), in_axis: int = 1, progress: bool = False,
                   **detect_kwargs) -> dict:
    """Run :func:`detect_outliers` on every weight whose name contains one of ``name_filter``
    (Q-ARVD: ``["block"]``; ``None`` = all) and summarise per layer type.

    Returns a JSON-serialisable dict::

        {"method", "align",
         "layers": {name: {"n_outlier", "n_flagged", "in_features", "ratio", "threshold", "channels"}},
         "layer_types": {type: {"n_layers", "n_dual_scale", "share", "mean_outlier_ratio"}},
         "overall": {"n_layers", "n_dual_scale", "share"},
         "skipped": [names outside the filter]}

    ``share`` is the fraction of layers of that type that become dual-scale (K > 0). ``progress``
    shows a tqdm bar over the layers.
    """
    from tqdm.auto import tqdm

    layers: dict[str, dict] = {}
    skipped: list[str] = []
    for name, w in tqdm(weights.items(), total=len(weights), desc="outliers", unit="layer", disable=not progress):
        if name_filter is not None and not any(f in name for f in name_filter):
            skipped.append(name)
            continue
        res = detect_outliers(w, method, align=align, in_axis=in_axis, **detect_kwargs)
        layers[name] = {
            "n_outlier": res.count,
            "n_flagged": res.n_flagged,
            "in_features": res.in_features,
            "ratio": res.count / res.in_features,
            "threshold": res.threshold,
            "channels": [int(c) for c in res.channels],
        }
    by_type: dict[str, list[dict]] = {}
    for name, rec in layers.items():
        by_type.setdefault(layer_type(name), []).append(rec)
    types = {
        t: {
            "n_layers": len(recs),
            "n_dual_scale": sum(r["n_outlier"] > 0 for r in recs),
            "share": sum(r["n_outlier"] > 0 for r in recs) / len(recs),
            "mean_outlier_ratio": float(np.mean([r["ratio"] for r in recs])),
        }
        for t, recs in by_type.items()
    }
    n_dual = sum(r["n_outlier"] > 0 for r in layers.values())
    overall = {"n_layers": len(layers), "n_dual_scale": n_dual, "share": n_dual / len(layers) if layers else 0.0}
    return {"method": method, "align": align, "layers": layers, "layer_types": types, "overall": overall,
            "skipped": skipped}


def plot_outliers(weights: Mapping[str, np.ndarray], report: dict, png_path, *, in_axis: int = 1,
                  n_cols: int = 4, dpi: int = 110) -> str:
    """Save a grid with one panel per layer type: each layer's column norms sorted in decreasing
    order (x = channel rank / in_features, y = norm / median norm, log scale), coloured by block
    depth, with its outlier channels marked in red. Uses the Agg canvas (no pyplot state).

    ``weights`` and ``report`` are those of :func:`outlier_report`. Returns the path as a string.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[str]] = {}
    for name in report["layers"]:
        groups.setdefault(layer_type(name), []).append(name)
    if not groups:
        raise ValueError("the report has no layers to plot")
    n_cols = max(1, min(n_cols, len(groups)))
    n_rows = -(-len(groups) // n_cols)
    fig = Figure(figsize=(3.6 * n_cols, 2.9 * n_rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    depths = [d for n in report["layers"] if (d := _split_block(n)[1]) is not None]
    max_depth = max(depths) if depths else 0
    cmap = colormaps["viridis"]
    for k, (ltype, names) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        for name in names:
            norms = column_norms(weights[name], in_axis)
            order = np.argsort(-norms, kind="stable")
            rel = norms[order] / max(float(np.median(norms)), 1e-30)
            rank = np.arange(norms.size) / norms.size
            depth = _split_block(name)[1] or 0
            ax.plot(rank, rel, lw=0.7, color=cmap(depth / max(max_depth, 1)), alpha=0.8)
            chans = set(report["layers"][name]["channels"])
            is_out = np.fromiter((c in chans for c in order), bool, norms.size)
            if is_out.any():
                ax.plot(rank[is_out], rel[is_out], ".", ms=2.0, color="#d62728")
        info = report["layer_types"][ltype]
        ax.set_title(f"{ltype}: {info['n_dual_scale']}/{info['n_layers']} dual-scale", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("channel rank / in_features", fontsize=7)
        ax.set_ylabel("column L2 norm / median", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
    fig.suptitle(f"Input-channel norms (method={report['method']}, align={report['align']}; "
                 f"red = outlier channels, colour = block depth)", fontsize=9)
    fig.savefig(str(png_path), dpi=dpi)
    return str(png_path)
