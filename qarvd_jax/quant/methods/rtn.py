"""RTN: round-to-nearest min-max quantization, the baseline every other method is compared against.

Weights: per output channel, asymmetric, min-max range (``quantizer_variants.md`` §1), integer zero
point. Activations: per tensor, asymmetric, static min-max over the calibration inputs; optionally
per-token dynamic (``act_dynamic=true``, min-max of every token at run time, data-free).

Provenance: the "MinMax" baseline of Q-Diffusion / PTQ4DiT / ViDiT-Q / DVD-Quant tables (e.g.
DVD-Quant arXiv 2505.18663 Table 1); code as ``thu-nics/ViDiT-Q`` ``quant_utils`` min-max observers.

Integer form: the static variant is exactly the Q-ARVD :class:`QuantLinear` layout (one group), so
``qarvd export`` and the W8A8 / W4A8 kernels run it; the dynamic variant has no export.
"""

from __future__ import annotations

from dataclasses import dataclass

from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import CoreSpec, QuantizedLayer

NAME = "rtn"
HAS_INTEGER_FORM = True  # static activations, w_bits in {4, 8}, a_bits 8

__all__ = ["NAME", "Config", "Static", "quantize_layer", "apply", "quantize_model", "to_quant_linear",
           "needs_calibration", "weight_bytes"]


@dataclass(frozen=True)
class Config:
    """``w_bits``: weight bits; ``a_bits``: activation bits (None: FP activations);
    ``act_dynamic``: per-token dynamic activations instead of static per-tensor;
    ``layers``: module-path patterns quantized by :func:`quantize_model`."""

    w_bits: int = 8
    a_bits: int | None = 8
    act_dynamic: bool = False
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        base.check_bits(NAME, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Static:
    core: CoreSpec


def core_spec(cfg: Config) -> CoreSpec:
    a = base.act_spec(cfg.a_bits, dynamic=cfg.act_dynamic) if cfg.a_bits else None
    return CoreSpec(base.weight_spec(cfg.w_bits), a, a_dynamic=cfg.act_dynamic)


def needs_calibration(cfg: Config) -> bool:
    return cfg.a_bits is not None and not cfg.act_dynamic


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None, calib_inputs [n, in] (None when data-free)."""
    kernel, bias, x = base.check_layer_inputs(kernel, bias, calib_inputs, needs_data=needs_calibration(config),
                                              name=NAME)
    core = core_spec(config)
    state = base.core_calibrate(kernel.T, x, core)
    return QuantizedLayer(NAME, kernel, bias, state, Static(core))


apply = base.core_linear_apply


def to_quant_linear(layer: QuantizedLayer):
    """(LayerQuantConfig, QuantLinear state) for static activations, else None."""
    return base.core_to_quant_linear(layer.state, layer.static.core)


weight_bytes = base.core_weight_bytes


quantize_model = base.rules_quantizer(NAME)
