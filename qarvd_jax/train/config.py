"""Typed configuration of quantization-aware training (``qarvd quantize --method qat``).

Load with :func:`qarvd_jax.config.load_config` (YAML file + ``key=value`` overrides)::

    cfg = load_config(QATConfig, "configs/qat_tiny.yaml", ["steps=200", "mesh=data=2,fsdp=4"])

Every field is documented on :class:`QATConfig`; the logical-axis rule table is described in
:mod:`qarvd_jax.train.sharding`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qarvd_jax.quant.recipe import QARVDConfig

__all__ = ["QATConfig", "DEFAULT_LOGICAL_AXIS_RULES", "load_qat_config"]

# logical axis -> mesh axes (none: replicated); see qarvd_jax.train.sharding for the parameter table
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, ...], ...] = (
    ("batch", "data", "fsdp"),
    ("weight_in", "fsdp"),
    ("weight_out", "tensor"),
    ("embed",),
    ("row_in", "tensor"),
    ("row_out", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("context",),
)


@dataclass(frozen=True)
class QATConfig:
    """Hyperparameters of QAT distillation from the full-precision model (all have defaults).

    Optimisation
      steps: train until this global step (a resumed run continues up to it).
      batch_size: *global* batch (videos per step), split over processes and the ('data', 'fsdp') axes.
      lr: peak *relative* learning rate of the quantizer steps (QuantState ``a_scale``/``w_scale``):
        each update moves a layer's steps by about ``lr`` times their RMS (see ``make_optimizer``).
      weight_lr: peak learning rate of the weights (only with ``train_weights``).
      train_weights: also train every ``nnx.Param`` (kernels, biases, norms, modulation).
      warmup_steps / lr_schedule_steps / min_lr_ratio: linear warmup from 0 (shortened to fit the
        schedule), then cosine decay to ``min_lr_ratio * peak`` at ``lr_schedule_steps`` (0: ``steps``).
        Fix ``lr_schedule_steps`` when a run may be extended with a larger ``steps`` so the schedule
        does not change on resume.
      b1 / b2 / eps / weight_decay: AdamW settings; clip_norm: global gradient-norm clip (0: off).
      min_scale: quantizer steps are projected to ``>= min_scale`` after every update.

    Objective
      target: "flow" (model output) or "x0" (the clean prediction ``x_t - sigma * flow``).
      resample_noise: draw fresh noise every step (True) or fix it per prompt (a fixed data set).
      compute_dtype: model compute dtype; master weights, quantizer state and optimiser state are
        always float32 (mixed precision).
      rollout_gradient: "per_call" (default): the gradient goes through one model call (chunk x
        denoising step) at a time; the KV cache each call reads enters with ``stop_gradient`` and the
        context pass runs forward only (as in Self-Forcing and QVGen training); memory of one call.
        "full": backpropagation through the whole multi-chunk rollout, through the student's cache
        (memory grows with every call: small models only). See :mod:`qarvd_jax.train.rollout`.
      remat: rematerialise in the backward pass (``jax.checkpoint``): per transformer block with
        ``remat_policy`` (``per_call``), or each whole model call (``full``).
      remat_policy: a ``jax.checkpoint_policies`` name; ``nothing_saveable`` keeps only block inputs.
      scan_layers: run the blocks under ``lax.scan`` over stacked per-block states (``per_call``;
        dual-scale layers with different outlier counts train in the fixed-shape mask form,
        :mod:`qarvd_jax.quant.stackable`, so the blocks stay alike; a Python loop when blocks differ).
      attention: attention implementation of the student and teacher during training ("flash":
        O(block) memory forward and backward; cuDNN on GPU). The exported model keeps the
        checkpoint's own setting.

    Data / init
      seed: seed of the noise and of the data order.
      calib_prompts: prompts used to calibrate the activation quantizers before training.
      max_prompts: use at most this many prompts of the source (0: all).
      preload_embeddings: hold every prompt embedding of this process in host memory; false: fill the
        on-disk embedding cache before training and read each batch from it (large prompt sets).

    Logging and checkpoints
      log_every: log (jsonl + progress bar) every N steps; checkpoint_every: save every N steps (and at the
      end); keep_checkpoints: how many step checkpoints Orbax keeps; async_checkpointing: write in the
      background.

    Parallelism
      mesh: ``"data=2,fsdp=4"`` (axes data, fsdp, tensor; unnamed ones 1; empty: all devices on data).
      logical_axis_rules: ``[logical, mesh_axis...]`` rows (see :mod:`qarvd_jax.train.sharding`).
      distributed: call ``jax.distributed.initialize()`` (multi-host; env QARVD_DISTRIBUTED=1 also does).

    Quantization recipe of the initial (RTN + calibrated) model: as :class:`QARVDConfig`, including
    the calibration memory bounds ``calib_memory_gb``, ``calib_layer_group`` and ``calib_tokens``.
    """

    # optimisation
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-2
    weight_lr: float = 1e-5
    train_weights: bool = False
    warmup_steps: int = 10
    lr_schedule_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    min_scale: float = 1e-8
    # objective
    target: Literal["flow", "x0"] = "flow"
    resample_noise: bool = True
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    remat: bool = True
    rollout_gradient: Literal["per_call", "full"] = "per_call"
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = True
    attention: str = "flash"
    # data / init
    seed: int = 0
    calib_prompts: int = 1
    max_prompts: int = 0
    preload_embeddings: bool = True
    # logging and checkpoints
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    # parallelism
    mesh: str = ""
    logical_axis_rules: tuple[tuple[str, ...], ...] = DEFAULT_LOGICAL_AXIS_RULES
    distributed: bool = False
    # quantization recipe (initial quantizers)
    w_bits: int = 4
    a_bits: int = 8
    dual_scale: bool = True
    outlier_method: Literal["mad_zscore", "iqr"] = "mad_zscore"
    align: int = 32
    quantize_text_embedding: bool = True
    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)
    hist_bins: int = 32768
    chunk_weighting: bool = True
    # calibration memory (see QARVDConfig): host budget in GiB (None: min(16, half the free RAM)),
    # or a fixed layer-group size, and a token cap per recorded input
    calib_memory_gb: float | None = None
    calib_layer_group: int | None = None
    calib_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "logical_axis_rules", tuple(tuple(str(a) for a in r)
                                                             for r in self.logical_axis_rules))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        problems = []
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "lr_schedule_steps", "calib_prompts", "max_prompts"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0 or (self.train_weights and self.weight_lr <= 0):
            problems.append("learning rates must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.clip_norm < 0:
            problems.append(f"clip_norm={self.clip_norm} must be >= 0 (0: no clipping)")
        for rule in self.logical_axis_rules:
            if not rule:
                problems.append("an empty logical_axis_rules row (write [name] for a replicated axis)")
        if problems:
            raise ValueError("invalid QATConfig: " + "; ".join(problems))

    @property
    def schedule_steps(self) -> int:
        """Length of the warmup + cosine schedule."""
        return self.lr_schedule_steps or self.steps

    def recipe(self) -> QARVDConfig:
        """The Q-ARVD recipe that builds and calibrates the initial quantized model (no reconstruction)."""
        return QARVDConfig(w_bits=self.w_bits, a_bits=self.a_bits, dual_scale=self.dual_scale,
                           outlier_method=self.outlier_method, align=self.align,
                           quantize_text_embedding=self.quantize_text_embedding, percentiles=self.percentiles,
                           hist_bins=self.hist_bins, chunk_weighting=self.chunk_weighting, reconstruct=False,
                           calib_memory_gb=self.calib_memory_gb, calib_layer_group=self.calib_layer_group,
                           calib_tokens=self.calib_tokens)

    def replace(self, **kw) -> "QATConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["logical_axis_rules"] = [list(r) for r in self.logical_axis_rules]
        d["percentiles"] = list(self.percentiles)
        return d


def load_qat_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> QATConfig:
    """:class:`QATConfig` from an optional YAML file and ``key=value`` overrides (``load_config`` rules)."""
    from qarvd_jax.config import load_config

    return load_config(QATConfig, path, overrides)
