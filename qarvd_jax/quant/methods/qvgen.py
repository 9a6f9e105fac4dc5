"""QVGen: QAT with auxiliary low-rank branches Φ that decay to rank zero, served as plain W4A4.

Training-time layer (``quantizer_variants.md`` §2(a)), x [..., in], kernel [in, out]::

    y = Q_a(x) Q_w(W)ᵀ + ((Q_a(x) lr_down) ⊙ γ) lr_up + b        (Φᵀ = lr_down lr_up, [in, r] x [r, out])

* Q_a: per-token dynamic asymmetric ``a_bits`` with learnable clipping: ``σ(clip_lo[g]) min(x)``,
  ``σ(clip_hi[g]) max(x)``, one logit pair per step group g (``clip_groups`` = 50, init logit(0.95));
  g = denoising-pass index mod ``clip_groups`` (the pipeline's explicit step context; QVGen trains with
  ``int(t) mod 50`` and counts calls at inference, §2(f) 5: a deliberate deviation).
* Q_w: per-output-channel LSQ+ (learnable step ``w_scale`` [out] and real zero point ``w_zero`` [out],
  gradient scale 1/sqrt(K qmax)), initialised by the MSE grid search (p = 2.4, :mod:`qarvd_jax.quant.lsq_quant`).
* Φ: rank ``rank`` (32; clipped to min(in, out)) from the fp32 SVD of E = W - Q_w(W):
  ``lr_down = V_r sqrt(S_r)``, ``lr_up = sqrt(S_r) U_rᵀ``, on the *quantized* input.
* Rank decay (:func:`schedule`, :func:`gamma`, :func:`resvd`): ``n = rank.bit_length()`` stages of
  ``T = stage_steps`` steps (0: ``total_steps // n``). In stage k (steps [kT, (k+1)T)) the active rank is
  ``r = rank >> k``; γ is 1 on columns [0, r//2), ``u = (1 + cos(π τ/T))/2`` on [r//2, r) (τ = step - kT)
  and 0 beyond. At every boundary (step kT, 1 <= k <= n) the first ``rank >> k`` columns are kept and
  re-factorised by SVD (strongest first); after the last one (step nT <= total_steps) Φ is gone. L, R keep
  their allocated shape (static for jit; Adam state not reset); :func:`finalize_layer` drops them, so the
  saved model (``OUT/quantized``) holds plain W/A layers only and exports to the integer path
  (:func:`~qarvd_jax.quant.lsq_quant.integer_form`).
* Training (:mod:`qarvd_jax.train.method_qat`): latent weights and every other DiT parameter trainable
  (full fine-tune), AdamW with four learning rates (weights ``lr_weight``, Q_w ``lr_quant``, Φ ``lr_phi``,
  clip logits ``lr_clip``), warm-up + cosine, gradient clipping; distillation from the frozen
  full-precision teacher.

What changes for an autoregressive video DiT (Self-Forcing) compared with QVGen's bidirectional DiTs:
QVGen regresses the teacher's velocity on noised *real* video latents at random timesteps. Here there is
no video data set and generation is chunk by chunk with a KV cache, so the teacher generates each video
itself (its 4 denoising passes per chunk plus the context pass at ``context_noise``) and the student
replays exactly those inputs on its own KV cache, one model call at a time (``rollout_gradient=per_call``:
the cache each call reads enters with stop-gradient; the context pass runs forward only and refreshes the
cache, as in Self-Forcing's training). The loss of a chunk is the mean squared flow error of its S
denoising passes, weighted by the chunk weights ω_k (Q-ARVD sensitivity, uniform without
``--sensitivity``): ``L = 1/(K S) Σ_k ω_k Σ_s mse_ks``. The activation clip groups follow the denoising-pass
index (5 used of 50 with the default sampler), not the training timestep.

Paper: Huang, Gong, Liu, Ding, Lv, Qin, Zhang, "QVGen: Pushing the Limit of Quantized Video Generative
Models", ICLR 2026 (arXiv 2505.11497). Code: ``ModelTC/QVGen`` 198e761 (``training/quant/quant.py``,
``training/trainer.py``, ``script/train/*.sh``).

Integer form: yes, after :func:`finalize_layer` (per-token dynamic activation codes with the clip ratio of
the step group, int8 x int8 -> int32 dot, real zero point in the epilogue; XLA on every backend).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from qarvd_jax.quant import lsq_quant as lq
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import QuantizedLayer

NAME = "qvgen"
HAS_INTEGER_FORM = True
QAT = True  # trained by qarvd_jax.train.method_qat (quantize_layer is the initialisation)
TRAIN_PARAMS = True  # every nnx.Param is trained (full fine-tune)

__all__ = ["NAME", "Config", "quantize_layer", "apply", "quantize_model", "needs_calibration", "weight_bytes",
           "num_stages", "stage_length", "schedule", "gamma", "resvd", "finalize_layer", "param_group",
           "learning_rates", "train_hooks", "export_integer_layer", "integer_module"]


@dataclass(frozen=True)
class Config:
    """``rank`` r0 of Φ (0: no Φ, the QVGen-without-Φ ablation); ``clip_groups`` activation clip pairs;
    ``clip_init`` their initial ratio; ``mse_power`` of the weight grid search; ``stage_steps`` rank-decay
    stage length (0: total_steps // rank.bit_length()); learning rates ``lr_weight`` (latent weights and
    every other parameter), ``lr_quant`` (w_scale, w_zero), ``lr_phi`` (Φ), ``lr_clip`` (clip logits)."""

    w_bits: int = 4
    a_bits: int | None = 4
    rank: int = 32
    clip_groups: int = 50
    clip_init: float = 0.95
    mse_power: float = 2.4
    stage_steps: int = 0
    lr_weight: float = 3e-5
    lr_quant: float = 3e-5
    lr_phi: float = 3e-5
    lr_clip: float = 1e-2
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        base.check_bits(NAME, self.w_bits, self.a_bits)
        problems = []
        if self.rank < 0:
            problems.append(f"rank={self.rank} must be >= 0")
        if self.clip_groups < 1:
            problems.append(f"clip_groups={self.clip_groups} must be >= 1")
        if not 0.0 < self.clip_init < 1.0:
            problems.append(f"clip_init={self.clip_init} must be in (0, 1)")
        if self.stage_steps < 0:
            problems.append(f"stage_steps={self.stage_steps} must be >= 0 (0: auto)")
        for n in ("lr_weight", "lr_quant", "lr_phi", "lr_clip"):
            if not getattr(self, n) >= 0:
                problems.append(f"{n}={getattr(self, n)} must be >= 0")
        if problems:
            raise ValueError("qvgen: " + "; ".join(problems))


def needs_calibration(cfg: Config) -> bool:
    return False


def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """The layer at initialisation. kernel [in, out], bias [out] | None; ``calib_inputs`` ignored
    (weights by the MSE grid, dynamic activations, Φ from the weight error)."""
    kernel, bias, _ = base.check_layer_inputs(kernel, bias, None, needs_data=False, name=NAME)
    w = kernel.T
    scale, zero = lq.mse_grid_init(w, config.w_bits, config.mse_power)
    state = {"w_scale": scale, "w_zero": zero}
    if config.a_bits is not None:
        state["clip_lo"] = jnp.full((config.clip_groups,), lq.logit(config.clip_init), jnp.float32)
        state["clip_hi"] = jnp.full((config.clip_groups,), lq.logit(config.clip_init), jnp.float32)
    r = min(config.rank, *kernel.shape)
    if r:
        err = w - lq.lsq_weight(w, scale, zero, config.w_bits)
        down, up = lq.lowrank_factors(err, r)
        state.update(lr_down=down, lr_up=up, phi_gamma=jnp.ones((r,), jnp.float32))
    static = lq.PlainStatic(config.w_bits, config.a_bits, "dynamic_clip", config.clip_groups, r, 0)
    return QuantizedLayer(NAME, kernel, bias, state, static)


apply = lq.plain_apply
weight_bytes = lq.plain_weight_bytes
quantize_model = base.rules_quantizer(NAME)
export_integer_layer = lq.export_integer_layer
integer_module = lq.integer_module


# ------------------------------------------------------------------------------------------ rank decay
def num_stages(rank: int) -> int:
    """Stages until Φ is gone: r0, r0/2, ..., 1 (``rank.bit_length()``; 32 -> 6)."""
    return int(rank).bit_length()


def stage_length(config: Config, total_steps: int) -> int:
    """T: ``stage_steps``, else ``total_steps // num_stages`` (>= 1; the last boundary is <= total_steps)."""
    n = num_stages(config.rank)
    if n == 0:
        return max(1, total_steps)
    if config.stage_steps:
        if config.stage_steps * n > total_steps:
            raise ValueError(f"qvgen: stage_steps={config.stage_steps} x {n} stages > --steps {total_steps}: "
                             f"the rank would not reach 0 by the end of training")
        return config.stage_steps
    if total_steps < n:
        raise ValueError(f"qvgen: --steps {total_steps} is below the {n} rank-decay stages of rank={config.rank} "
                         f"(one step per stage at least)")
    return total_steps // n


def schedule(step, rank0: int, stage: int):
    """(active rank, u) at 0-based ``step`` (ints or traced int32): stage k = min(step // T, n)."""
    n = num_stages(rank0)
    step = jnp.asarray(step, jnp.int32)
    k = jnp.minimum(step // stage, n)
    rank = jnp.where(k >= n, 0, jnp.right_shift(jnp.int32(rank0), k))
    u = 0.5 * (1.0 + jnp.cos(jnp.pi * (step - k * stage).astype(jnp.float32) / stage))
    return rank, u


def gamma(step, rank0: int, stage: int, width: int):
    """γ [width] at ``step``: 1 on [0, r//2), u on [r//2, r), 0 beyond (r the active rank)."""
    rank, u = schedule(step, rank0, stage)
    j = jnp.arange(width)
    return jnp.where(j < rank // 2, 1.0, jnp.where(j < rank, u, 0.0)).astype(jnp.float32)


def resvd(down, up, keep):
    """Keep the first ``keep`` (traced) columns of ``down`` [in, c] / rows of ``up`` [c, out] and
    re-factorise their product by SVD (QR of each factor, SVD of the c x c core): columns ordered by
    singular value, split as sqrt(S) on both sides; columns >= keep are exactly 0."""
    m = (jnp.arange(down.shape[1]) < keep).astype(jnp.float32)
    q1, r1 = jnp.linalg.qr(down * m)
    q2, r2 = jnp.linalg.qr((up * m[:, None]).T)
    u, s, vt = jnp.linalg.svd(r1 @ r2.T)
    rs = jnp.sqrt(s) * m
    return (q1 @ u) * rs, rs[:, None] * (vt @ q2.T)


def finalize_layer(layer: QuantizedLayer) -> QuantizedLayer:
    """The deployed layer: Φ (``lr_down``, ``lr_up``, ``phi_gamma``) removed, rank 0."""
    state = {k: v for k, v in layer.state.items() if k not in ("lr_down", "lr_up", "phi_gamma")}
    return QuantizedLayer(layer.method, layer.kernel, layer.bias, state, dataclasses.replace(layer.static, rank=0))


# ------------------------------------------------------------------------------------------ training
def param_group(name: str) -> str | None:
    """Optimiser group of a layer state leaf (None: frozen)."""
    return {"w_scale": "quant", "w_zero": "quant", "lr_down": "phi", "lr_up": "phi", "clip_lo": "clip",
            "clip_hi": "clip"}.get(name)


def learning_rates(config: Config) -> dict[str, float]:
    return {"weight": config.lr_weight, "quant": config.lr_quant, "phi": config.lr_phi, "clip": config.lr_clip}


class _Hooks:
    """The rank-decay hooks of :mod:`qarvd_jax.train.method_qat` (pure, traced step ints)."""

    log_keys = ("phi_rank", "phi_params")

    def __init__(self, config: Config, total_steps: int):
        self.rank0 = config.rank
        self.stage = stage_length(config, total_steps)
        self.n = num_stages(config.rank)

    def frozen_layer(self, st: dict, step) -> dict:
        """γ of the step about to be taken into the layer's ``phi_gamma``."""
        if "phi_gamma" in st:
            st = {**st, "phi_gamma": gamma(step, self.rank0, self.stage, st["phi_gamma"].shape[0])}
        return st

    def trained_layer(self, st: dict, new_step) -> dict:
        """After the update to ``new_step``: re-SVD at a stage boundary (keep ``rank >> k`` columns)."""
        if "lr_down" not in st:
            return st
        k = new_step // self.stage
        boundary = (new_step % self.stage == 0) & (k >= 1) & (k <= self.n)
        keep, _ = schedule(new_step, self.rank0, self.stage)
        down, up = jax.lax.cond(boundary, lambda d, u: resvd(d, u, keep), lambda d, u: (d, u), st["lr_down"],
                                st["lr_up"])
        return {**st, "lr_down": down, "lr_up": up}

    def layer_metrics(self, st: dict, step) -> dict:
        """``phi_rank`` (active rank) and ``phi_params`` (active Φ parameters) of one layer at ``step``."""
        if "lr_down" not in st:
            return {"phi_rank": jnp.int32(0), "phi_params": jnp.int32(0)}
        rank, _ = schedule(step, self.rank0, self.stage)
        r = jnp.minimum(rank, st["lr_down"].shape[1])
        return {"phi_rank": r, "phi_params": r * (st["lr_down"].shape[0] + st["lr_up"].shape[1])}


def train_hooks(config: Config, total_steps: int) -> _Hooks:
    return _Hooks(config, total_steps)
