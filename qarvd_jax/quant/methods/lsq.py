"""LSQ / LSQ+ QAT baseline: learnable steps (and offsets) for weights and activations, on the sharded trainer.

Layer (``quantizer_variants.md`` §4), kernel [in, out], x [..., in]: ``y = Q_a(x) Q_w(W)ᵀ + b`` with

* Q_w: per-output-channel LSQ+ (learnable step ``w_scale`` [out] and real zero point ``w_zero`` [out],
  gradient scale 1/sqrt(K qmax)), initialised by the MSE grid search (p = 2.4) as QVGen's baseline;
* Q_a: static per-tensor LSQ+ (learnable step ``a_scale`` and offset ``a_offset``, gradient scale
  1/sqrt(K qmax); ``act_groups`` copies indexed by the denoising pass, 1 = plain LSQ+), initialised by the
  same grid search on the calibration activations (full-precision model, every pass).

Training (:mod:`qarvd_jax.train.method_qat`): the same per-call distillation from the full-precision
teacher as ``qvgen`` (KV-cache path, chunk weights), latent weights trainable when ``train_weights``
(default, as QVGen's LSQ baseline), AdamW with ``lr_weight`` / ``lr_quant`` (weight step and zero point) /
``lr_act`` (activation step and offset). It is QVGen without Φ and with static activations.

Paper: Esser et al., "Learned Step Size Quantization", ICLR 2020; Bhalgat et al., "LSQ+", CVPR-W 2020.
Code: QVGen's LSQ baseline (``ModelTC/QVGen`` 198e761, ``training/quant/quant.py``).

Integer form: yes (static activation codes, int8 x int8 -> int32 dot, real zero point and offset in the
epilogue; :func:`qarvd_jax.quant.lsq_quant.integer_apply`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_jax.quant import lsq_quant as lq
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import QuantizedLayer

NAME = "lsq"
HAS_INTEGER_FORM = True
QAT = True

__all__ = ["NAME", "Config", "quantize_layer", "apply", "quantize_model", "needs_calibration", "weight_bytes",
           "param_group", "learning_rates", "export_integer_layer", "integer_module"]


@dataclass(frozen=True)
class Config:
    """``act_groups`` activation (step, offset) copies by denoising pass; ``train_weights`` full fine-tune;
    learning rates ``lr_weight``, ``lr_quant``, ``lr_act``."""

    w_bits: int = 4
    a_bits: int | None = 4
    act_groups: int = 1
    mse_power: float = 2.4
    train_weights: bool = True
    lr_weight: float = 3e-5
    lr_quant: float = 3e-5
    lr_act: float = 1e-3
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        base.check_bits(NAME, self.w_bits, self.a_bits)
        if self.act_groups < 1:
            raise ValueError(f"lsq: act_groups={self.act_groups} must be >= 1")
        if min(self.lr_weight, self.lr_quant, self.lr_act) < 0:
            raise ValueError("lsq: learning rates must be >= 0")


def needs_calibration(cfg: Config) -> bool:
    return cfg.a_bits is not None


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """The layer at initialisation. kernel [in, out], bias [out] | None, calib_inputs [n, in] (with a_bits)."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=needs_calibration(config),
                                              name=NAME)
    scale, zero = lq.mse_grid_init(kernel.T, config.w_bits, config.mse_power)
    state = {"w_scale": scale, "w_zero": zero}
    if config.a_bits is not None:
        state["a_scale"], state["a_offset"] = lq.static_act_init(x, config.a_bits, config.act_groups)
    static = lq.PlainStatic(config.w_bits, config.a_bits, "static", config.act_groups, 0, 0)
    return QuantizedLayer(NAME, kernel, bias, state, static)


def param_group(name: str) -> str | None:
    return {"w_scale": "quant", "w_zero": "quant", "a_scale": "act", "a_offset": "act"}.get(name)


def learning_rates(config: Config) -> dict[str, float]:
    return {"weight": config.lr_weight, "quant": config.lr_quant, "act": config.lr_act}


apply = lq.plain_apply
weight_bytes = lq.plain_weight_bytes
quantize_model = base.rules_quantizer(NAME)
export_integer_layer = lq.export_integer_layer
integer_module = lq.integer_module
