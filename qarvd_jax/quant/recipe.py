"""Quantization recipes: rules that match module paths to quantizer settings (the Qwix way).

Module paths use the PyTorch dotted names (``blocks.3.ffn.0``, ``text_embedding.2``), so rules read
like the checkpoint. The first rule whose pattern (``fnmatch``: ``*`` also crosses dots) matches a
linear layer decides its settings; unmatched layers stay in full precision.

:class:`QARVDConfig` holds every hyperparameter of the Q-ARVD recipe (spec defaults), so ablations
are config overrides (``w_bits=8``, ``outlier_method=iqr``, ``dual_scale=false``, ...).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from qarvd_jax.quant.adaround import AdaRoundConfig
from qarvd_jax.quant.fake_quant import QuantSpec

__all__ = ["QuantRule", "LayerQuantConfig", "QARVDConfig", "match_rule"]


@dataclass(frozen=True)
class QuantRule:
    """Settings for the linears whose name matches ``pattern``.

    ``w_bits``/``a_bits``: None keeps that operand in full precision. ``dual_scale``: outlier
    detection may split this layer. ``reconstruct``: AdaRound + learned activation step (else RTN).
    ``act_samples``: how many calls calibrate the activation range (None: every call; 1 for layers that
    run once per video, as cross-attention k/v).
    """

    pattern: str
    w_bits: int | None = 4
    a_bits: int | None = 8
    dual_scale: bool = True
    reconstruct: bool = True
    act_samples: int | None = None


@dataclass(frozen=True)
class LayerQuantConfig:
    """Static (hashable) quantization settings of one layer, resolved from a rule.

    ``n_outlier``: K, the number of outlier input channels of a dual-scale layer (gathered by its
    ``outlier_idx`` / ``normal_idx`` state), 0 otherwise. ``group_mask``: the *mask form* of a dual-scale
    layer used only while training (:mod:`qarvd_jax.quant.stackable`): two groups chosen per input channel
    by a ``group_mask`` [in] state leaf, ``n_outlier`` 0 (there are no gathered channels) and K in the
    mask, so layers of different K share one config. Never saved (``to_dict`` refuses it).
    """

    name: str
    w_spec: QuantSpec | None
    a_spec: QuantSpec | None
    n_outlier: int = 0
    reconstruct: bool = True
    chunk_weighting: bool = True
    act_samples: int | None = None
    group_mask: bool = False

    @property
    def groups(self) -> int:
        """1 (single scale) or 2 (outlier group first, then normal; gathered or by mask)."""
        return 2 if self.n_outlier or self.group_mask else 1

    def to_dict(self) -> dict[str, Any]:
        if self.group_mask:
            raise ValueError(f"{self.name}: a mask-form (training) layer config is not saved; convert the model "
                             f"back with qarvd_jax.quant.stackable.from_mask_form")
        d = dataclasses.asdict(self)
        del d["group_mask"]  # the saved format is unchanged
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerQuantConfig":
        d = dict(d)
        for k in ("w_spec", "a_spec"):
            if d.get(k) is not None:
                d[k] = QuantSpec(**d[k])
        return cls(**d)


def match_rule(name: str, rules) -> QuantRule | None:
    """First rule whose pattern matches ``name``, or None."""
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.pattern):
            return rule
    return None


@dataclass(frozen=True)
class QARVDConfig:
    """Every hyperparameter of Q-ARVD (qarvd_method.md), with the spec's defaults."""

    w_bits: int = 4
    a_bits: int | None = 8  # None: full-precision activations
    # scope: every block linear + the text embedding; cross-attn k/v and the text embedding are RTN
    quantize_text_embedding: bool = True
    # outlier-aware dual-scale splitting (weights only)
    dual_scale: bool = True
    outlier_method: Literal["mad_zscore", "iqr"] = "mad_zscore"
    align: int = 32
    mad_threshold: float = 3.5
    min_ratio_vs_median: float = 1.2
    # range init
    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)
    hist_bins: int = 32768
    # chunk (frame) weighting of the activation search and reconstruction loss
    chunk_weighting: bool = True
    chunk_weighting_dual: bool = False  # the original turns weighting off for dual-scale layers
    # layer-wise reconstruction
    reconstruct: bool = True
    iters: int = 2000
    batch_size: int = 8
    lr_v: float = 2e-3
    lr_act_step: float = 4e-5
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    recon_seed: int = 0
    # memory bounds for the real model: calibrate/reconstruct this many layers per collection pass
    # (None: all at once) and keep at most this many tokens of every recorded input (None: all). The
    # reconstruction loss of T' kept tokens (summed over tokens) is multiplied by T/T', so subsampling keeps
    # the loss scale, and the balance with the rounding regulariser reg_weight, of all T tokens.
    calib_layer_group: int | None = None
    calib_tokens: int | None = None
    # host-memory budget (GiB) of the recorded calibration inputs when calib_layer_group is unset: layers
    # are grouped (exact: each group re-runs the same seeded generations) so that one group's inputs fit,
    # and tokens are subsampled only if a single layer does not fit. None: min(16, half the available RAM)
    calib_memory_gb: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        for name in ("w_bits", "a_bits"):
            if getattr(self, name) is not None and not 2 <= getattr(self, name) <= 16:
                raise ValueError(f"QARVDConfig.{name}={getattr(self, name)} must be in [2, 16]")
        if self.align < 1:
            raise ValueError(f"QARVDConfig.align={self.align} must be >= 1")
        if self.outlier_method not in ("mad_zscore", "iqr"):
            raise ValueError(f"QARVDConfig.outlier_method={self.outlier_method!r} must be mad_zscore or iqr")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("QARVDConfig.iters and batch_size must be >= 1")

    def rules(self) -> tuple[QuantRule, ...]:
        w, a = self.w_bits, self.a_bits
        rules = [QuantRule("blocks.*.cross_attn.k", w, a, self.dual_scale, False, act_samples=1),
                 QuantRule("blocks.*.cross_attn.v", w, a, self.dual_scale, False, act_samples=1),
                 QuantRule("blocks.*", w, a, self.dual_scale, self.reconstruct)]
        if self.quantize_text_embedding:
            rules.append(QuantRule("text_embedding.*", w, a, dual_scale=False, reconstruct=False, act_samples=1))
        return tuple(rules)

    def adaround(self) -> AdaRoundConfig:
        return AdaRoundConfig(reg_weight=self.reg_weight, iters=self.iters, warmup=self.warmup,
                              beta_start=self.beta_start, beta_end=self.beta_end)

    def replace(self, **kw) -> "QARVDConfig":
        return dataclasses.replace(self, **kw)
