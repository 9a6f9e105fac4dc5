"""ViDiT-Q: per-token dynamic activations, timestep-aware channel balancing, optional mixed precision.

Forward of one layer at denoising pass ``t`` (``quantizer_variants.md`` §7):
``y = Q_tok(X diag(l_t)^-1) Q_w(W diag(l_t))^T + b`` with ``l_t,j = max|X_j|_t^alpha / max|W_j|^(1-alpha)``
from the calibration rows of pass t (timestep-aware balancing; ``timestep_aware=false``: one l over
all passes); activations per-token dynamic asymmetric min-max; weights per output channel asymmetric
min-max of the balanced weight of each pass (static, precomputed: ``w_scale``/``w_zero`` [P, out]).
The pass index comes explicitly from the pipeline (``step`` 0..S, S = the context pass; clipped to the
calibrated passes); nothing counts calls. Optional metric-decided mixed precision (model level,
``mixed_precision=true``): every layer's relative output error on its calibration rows at each bit
width of ``mp_bits`` is the metric; starting from the lowest width, the layers with the largest error
are raised one width at a time while the average weight bits stay within ``mp_avg_bits``.

Paper: Zhao et al., "ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for Image
and Video Generation", ICLR 2025 (arXiv 2406.02540). Code: ``thu-nics/ViDiT-Q`` (channel balancing
with alpha per timestep range, released W4A8 config alpha = 0.11; per-token dynamic activation
quantizer; mixed precision via ``mixed_precision`` configs). Deviations (recorded): the rotation of the
paper is not in the released code and not here; the channel maximum is the plain max over a pass's
rows (the code keeps a 0.95-momentum running max over batches); the mixed-precision metric is the
layer output MSE (the paper uses CLIPScore / DOVER / FlowScore per layer group).

Integer form: none here (dynamic per-token activations and per-pass balancing need kernels this
toolkit does not have).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from qarvd_jax.quant.fake_quant import QuantParams, QuantSpec, fake_quant, minmax_params
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import CoreSpec, QuantizedLayer

NAME = "vidit-q"
HAS_INTEGER_FORM = False

__all__ = ["NAME", "Config", "Static", "balance_scales", "quantize_layer", "apply", "quantize_model",
           "needs_calibration", "weight_bytes", "assign_mixed_precision"]


@dataclass(frozen=True)
class Config:
    """``alpha``: balancing strength; ``timestep_aware``: one balance per denoising pass;
    ``mixed_precision``/``mp_bits``/``mp_avg_bits``: the optional bit search (model level)."""

    w_bits: int = 8
    a_bits: int | None = 8
    alpha: float = 0.11
    timestep_aware: bool = True
    mixed_precision: bool = False
    mp_bits: tuple[int, ...] = (4, 6, 8)
    mp_avg_bits: float = 6.0
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        object.__setattr__(self, "mp_bits", tuple(sorted(int(b) for b in self.mp_bits)))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"vidit-q: alpha={self.alpha} must be in [0, 1]")
        base.check_bits(NAME, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Static:
    w_spec: QuantSpec
    a_spec: QuantSpec | None
    num_steps: int


def needs_calibration(cfg: Config) -> bool:
    return True


def balance_scales(kernel, x, steps, alpha: float, num_steps: int):
    """l [P, in]: per-pass balance from the rows of each pass (passes without rows: all rows)."""
    w_abs = jnp.max(jnp.abs(kernel), axis=1)
    x = np.asarray(x, np.float32)
    steps = np.asarray(steps)
    overall = np.abs(x).max(axis=0)
    rows = [np.abs(x[steps == s]).max(axis=0) if np.any(steps == s) else overall for s in range(num_steps)]
    return jnp.stack([base.smoothing_scales(r, w_abs, alpha) for r in rows])


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in], steps [n] pass index (None: all 0)."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=True, name=NAME)
    steps = np.zeros((x.shape[0],), np.int32) if steps is None or not config.timestep_aware else np.asarray(steps)
    if steps.shape != (x.shape[0],):
        raise ValueError(f"vidit-q: steps must be [n]={x.shape[0]}, got {steps.shape}")
    p = int(steps.max()) + 1
    lam = balance_scales(kernel, x, steps, config.alpha, p)
    w_spec = base.weight_spec(config.w_bits)
    a_spec = base.act_spec(config.a_bits, dynamic=True) if config.a_bits else None
    ws, wz = [], []
    for t in range(p):
        q = minmax_params(kernel.T * lam[t][None, :], w_spec)
        ws.append(q.scale)
        wz.append(q.zero_point)
    state = {"smooth": lam, "w_scale": jnp.stack(ws), "w_zero": jnp.stack(wz)}
    return QuantizedLayer(NAME, kernel, bias, state, Static(w_spec, a_spec, p))


def apply(kernel, bias, state, x, static: Static, step, chunk, precision=None):
    """y = Q_tok(x / l_t) Q_w(W diag(l_t))^T + b with t = clip(step, 0, P-1)."""
    t = jnp.clip(step, 0, static.num_steps - 1)
    lam = state["smooth"][t]
    xs = (x.astype(jnp.float32) / lam).astype(x.dtype)
    core = CoreSpec(None, static.a_spec, a_dynamic=True)
    xq = base.quant_act(xs, state, core)
    w = jnp.asarray(kernel, jnp.float32).T * lam[None, :]
    wq = fake_quant(w, QuantParams(state["w_scale"][t], state["w_zero"][t]), static.w_spec)
    y = jnp.einsum("...i,oi->...o", xq, wq.astype(x.dtype), precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


weight_bytes = base.core_weight_bytes


def _relative_error(layer: QuantizedLayer, x, steps, y0) -> float:
    """||y - y0||^2 / ||y0||^2 over the rows, each pass's rows run at its own step."""
    err = 0.0
    for t in np.unique(steps):
        rows = steps == t
        y = np.asarray(layer(jnp.asarray(x[rows]), int(t)))
        err += float(np.sum((y - y0[rows]) ** 2))
    return err / max(float(np.sum(y0 ** 2)), 1e-12)


def assign_mixed_precision(errors: dict[str, dict[int, float]], sizes: dict[str, int], bits: tuple[int, ...],
                           avg_bits: float) -> dict[str, int]:
    """Greedy bit assignment: all layers at ``bits[0]``; repeatedly raise the layer with the largest
    current error to its next width while the size-weighted average stays <= ``avg_bits``."""
    chosen = {n: bits[0] for n in errors}
    total = float(sum(sizes.values()))

    def avg(c):
        return sum(c[n] * sizes[n] for n in c) / total

    while True:
        cands = sorted((n for n in chosen if chosen[n] != bits[-1]), key=lambda n: -errors[n][chosen[n]])
        for n in cands:
            nxt = dict(chosen, **{n: bits[bits.index(chosen[n]) + 1]})
            if avg(nxt) <= avg_bits + 1e-9:
                chosen = nxt
                break
        else:
            return chosen


def quantize_model(model, calibration, config: Config, rules=None) -> dict:
    """By rules; with ``mixed_precision`` the per-layer weight bits are chosen first (see module doc)."""
    import dataclasses

    from qarvd_jax.quant.methods.model import (MethodRule, collect_layer_inputs, default_rules,
                                               quantize_model_with_rules, resolve_rules)

    if not config.mixed_precision:
        return quantize_model_with_rules(model, calibration, config, rules, NAME)
    rules = tuple(rules) if rules is not None else default_rules(config)
    plan = {n: v for n, v in resolve_rules(model, rules, NAME, config).items() if v[2] == NAME}
    inputs = collect_layer_inputs(model, list(plan), calibration)
    errors, sizes = {}, {}
    for name, (_, lin, _, cfg) in plan.items():
        x, steps = inputs[name]
        k = lin.kernel[...]
        y0 = np.asarray(x @ np.asarray(k, np.float32))
        errors[name] = {}
        for b in config.mp_bits:
            layer = quantize_layer(k, None, x, dataclasses.replace(cfg, w_bits=b), steps=steps)
            errors[name][b] = _relative_error(layer, x, steps, y0)
        sizes[name] = int(np.prod(k.shape))
    bits = assign_mixed_precision(errors, sizes, config.mp_bits, config.mp_avg_bits)
    mp_rules = tuple(MethodRule.make(n, NAME, w_bits=b) for n, b in bits.items()) + tuple(rules)
    out = quantize_model_with_rules(model, inputs, config, mp_rules, NAME)
    out["mixed_precision"] = {"bits": bits, "errors": errors}
    return out
