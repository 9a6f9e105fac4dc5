"""GPTQ: second-order (OBQ-style) weight rounding with the layer Hessian of the calibration inputs.

Per layer, with W [out, in] and calibration inputs X [n, in]: ``H = 2 X^T X / n``; dead inputs
(``H_jj = 0``) get ``H_jj = 1`` and a zero weight column; optional act-order permutes the columns by
decreasing ``diag(H)``; dampening ``H += damp * mean(diag(H)) I`` (damp = 0.01); ``U`` = upper Cholesky
factor of ``H^-1``. Columns are processed left to right in blocks of 128 (lazy batch updates): each
column is quantized with the per-output-channel min-max grid computed once from W (asymmetric,
integer zero point, the RTN grid), its error divided by ``U_jj`` is propagated to the remaining columns
of the block through row j of U, and each block's errors to the later blocks. Activations are
quantized after (static per-tensor min-max, as RTN; ``a_bits=None``: weight only, the paper's setting).
Inputs come from the full-precision model (not sequentially from already-quantized layers).

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323), Algorithm 1. Code: ``IST-DASLab/gptq``
``gptq.py`` ``GPTQ.fasterquant`` (blocksize 128, percdamp .01, actorder); defaults as
``mit-han-lab/deepcompressor`` GPTQ config. Project choice: the grid does not force 0 into the range
(the GPTQ repo's quantizer does), so GPTQ and RTN share one grid and differ only in the rounding.

Integer form: yes (the stored kernel is on the grid: the Q-ARVD :class:`QuantLinear` layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from qarvd_jax.quant.fake_quant import QuantParams, minmax_params
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import CoreSpec, QuantizedLayer

NAME = "gptq"
HAS_INTEGER_FORM = True

__all__ = ["NAME", "Config", "Static", "gptq_quantize", "hessian", "quantize_layer", "apply", "quantize_model",
           "to_quant_linear", "needs_calibration", "weight_bytes"]


@dataclass(frozen=True)
class Config:
    """``damp``: dampening as a fraction of mean(diag H); ``block_size``: lazy-batch block;
    ``act_order``: columns by decreasing diag(H); ``a_bits=None``: weight-only (W4A16)."""

    w_bits: int = 4
    a_bits: int | None = None
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        if self.damp < 0 or self.block_size < 1:
            raise ValueError(f"gptq: damp={self.damp} must be >= 0 and block_size={self.block_size} >= 1")
        base.check_bits(NAME, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Static:
    core: CoreSpec


def needs_calibration(cfg: Config) -> bool:
    return True


def hessian(x: jax.Array) -> jax.Array:
    """H = 2 X^T X / n (float32, highest precision) for x [n, in]."""
    x = jnp.asarray(x, jnp.float32)
    return 2.0 * jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0]


@partial(jax.jit, static_argnames=("qmax",))
def _quant_block(w1, u1, scale, zero, *, qmax):
    """Columns of one block in order. w1 [out, B], u1 [B, B] (upper). Returns (Q1, Err1) [out, B]."""
    nb = w1.shape[1]

    def col(i, carry):
        w1, q1, e1 = carry
        w = w1[:, i]
        d = u1[i, i]
        q = (jnp.clip(jnp.round(w / scale) + zero, 0, qmax) - zero) * scale
        err = (w - q) / d
        row = jnp.where(jnp.arange(nb) >= i, u1[i], 0.0)
        w1 = w1 - err[:, None] * row[None, :]
        return w1, q1.at[:, i].set(q), e1.at[:, i].set(err)

    _, q1, e1 = jax.lax.fori_loop(0, nb, col, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1)))
    return q1, e1


def gptq_quantize(w: jax.Array, h: jax.Array, params: QuantParams, bits: int, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> jax.Array:
    """GPTQ-rounded dequantized weights [out, in] (float32) on the grid ``params`` (per output
    channel, asymmetric, ``bits``). ``w`` [out, in], ``h`` [in, in]."""
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k = w.shape[1]
    dead = jnp.diag(h) == 0
    h = h.at[jnp.arange(k), jnp.arange(k)].set(jnp.where(dead, 1.0, jnp.diag(h)))
    w = jnp.where(dead[None, :], 0.0, w)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    hinv = jnp.linalg.inv(jnp.linalg.cholesky(h))           # L^-1, H^-1 = L^-T L^-1
    u = jnp.linalg.cholesky(hinv.T @ hinv).T                 # upper Cholesky factor of H^-1
    scale, zero = params.scale, params.zero_point
    qmax = 2 ** bits - 1
    qs = []
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        q1, e1 = _quant_block(w[:, i1:i2], u[i1:i2, i1:i2], scale, zero, qmax=qmax)
        qs.append(q1)
        if i2 < k:
            w = w.at[:, i2:].add(-jnp.matmul(e1, u[i1:i2, i2:], precision=jax.lax.Precision.HIGHEST))
    q = jnp.concatenate(qs, axis=1)
    return q[:, jnp.argsort(perm)]


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in]."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=True, name=NAME)
    a = base.act_spec(config.a_bits, dynamic=False) if config.a_bits else None
    core = CoreSpec(base.weight_spec(config.w_bits), a)
    w = kernel.T
    p = minmax_params(w, core.w_spec)
    wq = gptq_quantize(w, hessian(x), p, config.w_bits, damp=config.damp, block_size=config.block_size,
                       act_order=config.act_order)
    state = base.core_calibrate(w, x, core)  # the same grid p, plus the activation range
    return QuantizedLayer(NAME, wq.T, bias, state, Static(core))


apply = base.core_linear_apply


def to_quant_linear(layer: QuantizedLayer):
    return base.core_to_quant_linear(layer.state, layer.static.core)


weight_bytes = base.core_weight_bytes


quantize_model = base.rules_quantizer(NAME)
