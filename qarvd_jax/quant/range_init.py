"""Range initialisation: MSE search over percentile clipping candidates (Q-ARVD spec §2).

Candidates come only from the percentile set (default ``(0.999, 0.9999, 0.99999)``) with
``lo = quantile_{1-p}``, ``hi = quantile_p``; min/max is never a candidate. Each candidate becomes
(Δ, z) through :func:`~qarvd_jax.quant.fake_quant.params_from_range`; the lowest score wins (ties:
the earlier candidate, as the PyTorch ``score < best`` loop).

* :func:`percentile_mse_init` (weights): exact linear-interpolated quantiles per quantization group
  (per output row for the Q-ARVD weight spec), score = mean squared error over the group, choice
  independent per group.
* :func:`histogram_percentile_mse_init` (activations, per-tensor): quantiles from one 32768-bin
  histogram over all samples (bin centres), score = chunk-weighted MSE
  ``(1/N) Σ_i ω_i · mean_elements((x_i - x̂_i)²)``. The histogram is unweighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .fake_quant import QuantParams, QuantSpec, fake_quant, group_layout, group_reduce, group_rows, params_from_range

__all__ = [
    "DEFAULT_PERCENTILES",
    "HISTOGRAM_BINS",
    "RangeSearchResult",
    "stack_samples",
    "histogram_quantiles",
    "exact_quantiles",
    "candidate_scores",
    "percentile_mse_init",
    "histogram_percentile_mse_init",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
HISTOGRAM_BINS = 32768
_INT32_MAX = 2**31 - 1


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RangeSearchResult:
    """Outcome of a percentile search (a pytree).

    params: chosen :class:`QuantParams` (compact parameter shape).
    index: int32, compact parameter shape: the chosen candidate per group (index into percentiles).
    scores: float32 ``[P, *param_shape]``, the objective of every candidate.
    lo, hi: float32 ``[P, *param_shape]``, every candidate's clipping range.
    """

    params: QuantParams
    index: jax.Array
    scores: jax.Array
    lo: jax.Array
    hi: jax.Array


def _check_percentiles(percentiles) -> tuple[float, ...]:
    ps = tuple(float(p) for p in percentiles)
    if not ps:
        raise ValueError("percentiles must not be empty")
    for p in ps:
        if not 0.5 < p <= 1.0:
            raise ValueError(f"each percentile must lie in (0.5, 1], got {p}")
    return ps


def _quantile_levels(ps: tuple[float, ...]) -> list[float]:
    """``[1-p_0, ..., 1-p_{P-1}, p_0, ..., p_{P-1}]`` as Python floats (float64)."""
    return [1.0 - p for p in ps] + list(ps)


def exact_quantiles(rows: jax.Array, levels: Sequence[float]) -> jax.Array:
    """Linear-interpolated quantiles (numpy/torch ``linear`` method) of each row of ``rows`` [G, M].

    The positions ``(M - 1)·q`` and interpolation fractions are formed in float64 on the host (M is
    static), so the result is exact up to one float32 interpolation step; ``jnp.quantile`` forms them
    in float32, which moves extreme quantiles of long rows noticeably. Returns float32 ``[L, G]``.
    """
    rows = jnp.asarray(rows, jnp.float32)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"exact_quantiles needs non-empty rows [G, M], got shape {rows.shape}")
    m = rows.shape[1]
    srt = jnp.sort(rows, axis=1)
    out = []
    for q in levels:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile level {q} is outside [0, 1]")
        pos = (m - 1) * float(q)
        i = min(int(pos), m - 1)
        j = min(i + 1, m - 1)
        t = pos - i
        a, b = srt[:, i], srt[:, j]
        # numpy's _lerp: a + (b - a)·t, evaluated from the nearer end for t >= 0.5
        out.append(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)
    return jnp.stack(out)


def stack_samples(samples) -> jax.Array:
    """A ``[N, ...]`` array from an array with a leading sample axis or a sequence of equal-shape
    arrays (an error names the first mismatching shape)."""
    if isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
        if len(samples) == 0:
            raise ValueError("need at least one calibration sample")
        shapes = [tuple(jnp.shape(s)) for s in samples]
        for i, s in enumerate(shapes):
            if s != shapes[0]:
                raise ValueError(f"calibration samples must share one shape: sample 0 has {shapes[0]}, "
                                 f"sample {i} has {s}")
        return jnp.stack([jnp.asarray(s) for s in samples])
    samples = jnp.asarray(samples)
    if samples.ndim < 1 or samples.shape[0] == 0:
        raise ValueError(f"samples must have a non-empty leading sample axis, got shape {samples.shape}")
    return samples


def histogram_quantiles(samples, levels, bins: int = HISTOGRAM_BINS) -> jax.Array:
    """Histogram quantiles of all elements of ``samples`` (shape ``[N, ...]``), as Q-ARVD computes them.

    One histogram with ``bins`` equal bins over ``[min, max]`` of everything (``torch.histc``
    binning: ``floor((x - min)/(max - min)·bins)``, the max falls in the last bin), CDF = cumsum /
    total (float32); for each level q the first bin with ``CDF >= q`` (``searchsorted`` left); the
    returned value is that bin's centre ``min + (idx + 0.5)·(max - min)/bins``. Counts are exact for any
    element count: int32 on device per block of samples (< 2^31 elements each), summed on the host in int64
    (the 1.3B's ``ffn.2`` holds 1.47e9 elements per calibration prompt).

    Returns float32 of shape ``levels.shape``.
    """
    samples = stack_samples(samples)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    levels = jnp.asarray(levels, jnp.float32)
    per_sample = int(np.prod(samples.shape[1:], dtype=np.int64))
    if per_sample > _INT32_MAX:
        raise ValueError(f"one calibration sample holds {per_sample} elements; per-sample histogram counts are "
                         "int32 (< 2^31): subsample tokens (calib_tokens)")
    x_min, x_max = _min_max(samples)
    if isinstance(samples, jax.core.Tracer):  # traced by a caller's jit: one on-device int32 block
        if samples.size > _INT32_MAX:
            raise ValueError(f"a traced histogram over {samples.size} elements would overflow int32 counts; "
                             "call it outside jit (host int64 accumulation)")
        cum = jnp.cumsum(_block_counts(samples, x_min, x_max, bins)).astype(jnp.float32)
        return _quantiles_from_counts(cum, levels, x_min, x_max)
    block = max(1, _INT32_MAX // max(per_sample, 1))
    counts = np.zeros((bins,), np.int64)
    for start in range(0, samples.shape[0], block):
        counts += np.asarray(_block_counts(samples[start:start + block], x_min, x_max, bins), np.int64)
    return _quantiles_from_counts(jnp.asarray(np.cumsum(counts), jnp.float32), levels, x_min, x_max)


@jax.jit
def _min_max(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    # exact in any float dtype
    return jnp.min(samples).astype(jnp.float32), jnp.max(samples).astype(jnp.float32)


@partial(jax.jit, static_argnames=("bins",))
def _block_counts(samples: jax.Array, x_min: jax.Array, x_max: jax.Array, bins: int) -> jax.Array:
    """int32 [bins] counts of a block of samples (cast to float32 one sample at a time: memory)."""
    span = x_max - x_min
    safe_span = jnp.where(span > 0, span, 1.0)

    def add_sample(counts, xi):
        idx = jnp.floor((xi.astype(jnp.float32) - x_min) / safe_span * bins).astype(jnp.int32)
        idx = jnp.clip(idx, 0, bins - 1)
        return counts + jnp.bincount(idx.ravel(), length=bins).astype(jnp.int32), None

    counts, _ = jax.lax.scan(add_sample, jnp.zeros((bins,), jnp.int32), samples)
    return counts


@jax.jit
def _quantiles_from_counts(cum: jax.Array, levels: jax.Array, x_min: jax.Array, x_max: jax.Array) -> jax.Array:
    """Bin centres at ``levels`` from the cumulative counts (float32, as torch compares CDF and levels)."""
    bins = cum.shape[0]
    cdf = cum / cum[-1]
    idx = jnp.clip(jnp.searchsorted(cdf, levels, side="left"), 0, bins - 1)
    return x_min + (idx.astype(jnp.float32) + 0.5) * ((x_max - x_min) / bins)


def candidate_scores(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> jax.Array:
    """Per-group MSE ``mean((x - x̂_p)²)`` for each candidate range ``(lo[p], hi[p])``.

    ``lo``/``hi``: ``[P, *param_shape]``. Returns float32 ``[P, *param_shape]``.
    """
    x = jnp.asarray(x, jnp.float32)
    cands = params_from_range(lo, hi, spec)
    out = []
    for p in range(lo.shape[0]):
        zp = None if cands.zero_point is None else cands.zero_point[p]
        err = x - fake_quant(x, QuantParams(cands.scale[p], zp), spec)
        out.append(group_reduce(jnp.square(err), spec, jnp.mean))
    return jnp.stack(out)


def _select(lo: jax.Array, hi: jax.Array, scores: jax.Array, spec: QuantSpec) -> RangeSearchResult:
    index = jnp.argmin(scores, axis=0).astype(jnp.int32)
    lo_s = jnp.take_along_axis(lo, index[None], axis=0)[0]
    hi_s = jnp.take_along_axis(hi, index[None], axis=0)[0]
    return RangeSearchResult(params_from_range(lo_s, hi_s, spec), index, scores, lo, hi)


def percentile_mse_init(x: jax.Array, spec: QuantSpec,
                        percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> RangeSearchResult:
    """Data-free percentile/MSE init with exact quantiles, independently per quantization group.

    ``x``: the tensor itself (e.g. W[out, in] with ``QuantSpec.qarvd_weight(b)``: one choice per
    output row). Quantiles are linear-interpolated (numpy/torch default) over each group's elements.
    """
    ps = _check_percentiles(percentiles)
    group_layout(jnp.shape(x), spec)  # shape errors before tracing
    return _percentile_mse_init(jnp.asarray(x), spec, ps)


@partial(jax.jit, static_argnames=("spec", "ps"))
def _percentile_mse_init(x: jax.Array, spec: QuantSpec, ps: tuple[float, ...]) -> RangeSearchResult:
    x = x.astype(jnp.float32)
    lay = group_layout(x.shape, spec)
    qs = exact_quantiles(group_rows(x, spec), _quantile_levels(ps))  # [2P, G]
    qs = jnp.reshape(qs, (2 * len(ps),) + lay.param_shape)
    lo, hi = qs[: len(ps)], qs[len(ps):]
    return _select(lo, hi, candidate_scores(x, lo, hi, spec), spec)


def histogram_percentile_mse_init(samples, spec: QuantSpec, *, sample_weights: jax.Array | None = None,
                                  percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                                  bins: int = HISTOGRAM_BINS, quantiles: str = "histogram") -> RangeSearchResult:
    """Per-tensor activation init over N calibration samples with chunk-weighted scoring.

    samples: ``[N, ...]`` array or a sequence of N equal-shape arrays (e.g. N=35 inputs [1, T, C]).
    sample_weights: ``[N]`` per-sample weights ω_{c(i)} (see ``objective.chunk_sample_weights``);
      ``None`` means all ones (dual-scale layers, no sensitivity).
    quantiles: "histogram" (Q-ARVD: :func:`histogram_quantiles` with ``bins``) or "exact" (linear
      interpolation over all elements; allowed by spec §9 as incidental).
    Score: ``(1/N) Σ_i ω_i · mean_elements((x_i - x̂_i)²)``, computed sample by sample.
    """
    if spec.granularity != "per_tensor":
        raise ValueError(f"histogram_percentile_mse_init needs a per_tensor spec, got {spec.granularity!r}")
    if quantiles not in ("histogram", "exact"):
        raise ValueError(f"quantiles must be 'histogram' or 'exact', got {quantiles!r}")
    ps = _check_percentiles(percentiles)
    samples = stack_samples(samples)
    n = samples.shape[0]
    levels = _quantile_levels(ps)
    if quantiles == "histogram":
        qs = histogram_quantiles(samples, levels, bins)
    else:
        qs = _exact_quantiles_all(samples, tuple(levels))
    if sample_weights is None:
        weights = jnp.ones((n,), jnp.float32)
    else:
        weights = jnp.asarray(sample_weights, jnp.float32)
        if weights.shape != (n,):
            raise ValueError(f"sample_weights must have shape ({n},) (one per sample), got {weights.shape}")
    return _score_candidates(samples, weights, qs, spec, len(ps))


@partial(jax.jit, static_argnames=("levels",))
def _exact_quantiles_all(samples: jax.Array, levels: tuple[float, ...]) -> jax.Array:
    return exact_quantiles(samples.reshape(1, -1), list(levels))[:, 0]


@partial(jax.jit, static_argnames=("spec", "num_p"))
def _score_candidates(samples, weights, qs, spec: QuantSpec, num_p: int) -> RangeSearchResult:
    lo, hi = qs[:num_p], qs[num_p:]
    per_sample = jax.lax.map(lambda xi: candidate_scores(xi, lo, hi, spec), samples)  # [N, P]
    scores = jnp.mean(weights[:, None] * per_sample, axis=0)
    return _select(lo, hi, scores, spec)
