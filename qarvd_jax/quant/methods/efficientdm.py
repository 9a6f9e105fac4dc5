"""EfficientDM: LoRA on the fake-quantized weights plus timestep-aware LSQ activation steps, merged at the end.

Layer (``quantizer_variants.md`` §6), kernel [in, out], x [..., in]::

    y = Q_a^(g)(x) Q_w(W + (lora_down lora_up)ᵀ)ᵀ + b       (lora_down [in, r], lora_up [r, out])

* QALoRA: the LoRA is added *before* the weight quantizer; rank ``lora_rank`` (32), ``lora_down`` (Aᵀ)
  Kaiming-uniform (bound 1/sqrt(in), seeded per layer shape), ``lora_up`` (Bᵀ) zero, so training starts at
  the plain quantized model. The latent weights stay frozen (parameter-efficient).
* Q_w: per-output-channel asymmetric with a learnable step ``w_scale`` [out]; the zero point ``w_zero`` is
  the rounded MSE-grid value and stays fixed (integer), as EfficientDM's weight quantizer.
* Q_a^(g) (TALSQ): static per-tensor asymmetric LSQ with a learnable step and offset for each step group g
  (g = denoising-pass index mod ``step_groups``; Self-Forcing: 4 passes + the context pass), initialised by
  the grid search on the calibration activations and copied to every group.
* Export (:func:`finalize_layer`): ``W <- W + (lora_down lora_up)ᵀ``, LoRA dropped: the merged layer's output
  equals the training-time forward (same float32 sum, same quantizer).

Training (:mod:`qarvd_jax.train.method_qat`): EfficientDM distils along the teacher's sampling trajectory
(data-free), which is what the per-call objective does on the KV-cache path; learning rates ``lr_lora``,
``lr_quant`` (weight step; the code's 1e-6) and ``lr_act`` (activation step/offset, 5e-4). Deviation: one
LoRA learning rate instead of the code's per-layer mean(Δ_w)/2500.

Paper: He, Liu, Wu, Zhou, Zhuang, "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit
Diffusion Models", ICLR 2024. Code: ``ThisisBillhe/EfficientDM``.

Integer form: yes, after the merge (as ``lsq``, one activation (step, offset) per step group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from qarvd_jax.quant import lsq_quant as lq
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import QuantizedLayer

NAME = "efficientdm"
HAS_INTEGER_FORM = True
QAT = True

__all__ = ["NAME", "Config", "quantize_layer", "apply", "quantize_model", "needs_calibration", "weight_bytes",
           "finalize_layer", "param_group", "learning_rates", "export_integer_layer", "integer_module"]


@dataclass(frozen=True)
class Config:
    """``lora_rank`` (0: no LoRA), ``step_groups`` activation (step, offset) pairs, ``seed`` of the LoRA init,
    learning rates ``lr_lora``, ``lr_quant``, ``lr_act``."""

    w_bits: int = 4
    a_bits: int | None = 4
    lora_rank: int = 32
    step_groups: int = 8
    mse_power: float = 2.4
    seed: int = 0
    lr_lora: float = 1e-4
    lr_quant: float = 1e-6
    lr_act: float = 5e-4
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        base.check_bits(NAME, self.w_bits, self.a_bits)
        if self.lora_rank < 0 or self.step_groups < 1:
            raise ValueError(f"efficientdm: lora_rank={self.lora_rank} must be >= 0 and step_groups="
                             f"{self.step_groups} >= 1")
        if min(self.lr_lora, self.lr_quant, self.lr_act) < 0:
            raise ValueError("efficientdm: learning rates must be >= 0")


def needs_calibration(cfg: Config) -> bool:
    return cfg.a_bits is not None


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """The layer at initialisation (LoRA up = 0). kernel [in, out], bias [out] | None, calib_inputs [n, in]."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=needs_calibration(config),
                                              name=NAME)
    k_in, k_out = kernel.shape
    scale, zero = lq.mse_grid_init(kernel.T, config.w_bits, config.mse_power)
    state = {"w_scale": scale, "w_zero": jnp.clip(jnp.round(zero), 0, 2 ** config.w_bits - 1)}
    if config.a_bits is not None:
        state["a_scale"], state["a_offset"] = lq.static_act_init(x, config.a_bits, config.step_groups)
    r = min(config.lora_rank, k_in, k_out)
    if r:
        key = jax.random.fold_in(jax.random.key(config.seed), k_in * 100003 + k_out)
        bound = 1.0 / jnp.sqrt(k_in)
        state["lora_down"] = jax.random.uniform(key, (k_in, r), jnp.float32, -bound, bound)
        state["lora_up"] = jnp.zeros((r, k_out), jnp.float32)
    static = lq.PlainStatic(config.w_bits, config.a_bits, "static", config.step_groups, 0, r)
    return QuantizedLayer(NAME, kernel, bias, state, static)


def finalize_layer(layer: QuantizedLayer) -> QuantizedLayer:
    """Merge the LoRA into the latent weights (W + (down up)ᵀ) and drop it."""
    if not layer.static.lora:
        return layer
    kernel = jnp.asarray(layer.kernel, jnp.float32) + layer.state["lora_down"] @ layer.state["lora_up"]
    state = {k: v for k, v in layer.state.items() if k not in ("lora_down", "lora_up")}
    return QuantizedLayer(layer.method, kernel, layer.bias, state, dataclasses.replace(layer.static, lora=0))


def param_group(name: str) -> str | None:
    return {"lora_down": "lora", "lora_up": "lora", "w_scale": "quant", "a_scale": "act", "a_offset": "act"}.get(name)


def learning_rates(config: Config) -> dict[str, float]:
    return {"weight": 0.0, "lora": config.lr_lora, "quant": config.lr_quant, "act": config.lr_act}


apply = lq.plain_apply
weight_bytes = lq.plain_weight_bytes
quantize_model = base.rules_quantizer(NAME)
export_integer_layer = lq.export_integer_layer
integer_module = lq.integer_module
