"""LSQ-family quantizers and the plain low-bit layer shared by the QAT methods (``lsq``, ``qvgen``, ``efficientdm``).

Specs: ``quantizer_variants.md`` §1, §2(a)-(b) (QVGen), §4 (LSQ / LSQ+), §6 (EfficientDM). Layouts as the
method interface: ``kernel`` [in, out], W = kernel.T [out, in] (per output channel = axis 0), x [..., in].

* Weights (:func:`lsq_weight`): per output channel, asymmetric LSQ+ with a learnable step ``s`` [out] and a
  learnable *real-valued* zero point ``z`` [out]: ``Ŵ = s (clamp(round_STE(W/s + z), 0, qmax) - z)``; both get
  the LSQ gradient scale ``g = 1/sqrt(K qmax)`` (K = in_features). Init :func:`mse_grid_init`: per row, the
  shrink p in {1, 0.99, ..., 0.21} of (min, max) with the lowest ``sum |W - Ŵ|^2.4`` (QVGen's grid).
* Activations, mode ``"dynamic_clip"`` (:func:`clip_dynamic_act`, QVGen): per token, asymmetric, dynamic, with
  learnable clip logits: ``lo = σ(l_lo) min(x, 0)``, ``hi = σ(l_hi) max(x, 0)`` (0 kept in the range so
  the integer zero point stays in [0, qmax]: a project choice for one-signed tokens), ``s = max((hi - lo)/qmax, 1e-9)``,
  integer ``z = clamp(-round(lo/s), 0, qmax)`` (no gradient), ``x̂ = s (clamp(round_STE(x/s) + z, 0, qmax) - z)``;
  one logit pair per step group ``[G]``.
* Activations, mode ``"static"`` (:func:`lsq_act`, LSQ+ / EfficientDM TALSQ): per tensor, learnable step ``s``
  and offset ``β``: ``x̂ = s clamp(round_STE((x - β)/s), 0, qmax) + β`` with gradient scale
  ``1/sqrt(K qmax)``; one (s, β) per step group ``[G]`` (LSQ: G = 1; EfficientDM: one per denoising pass).
* Step groups: ``group = step % G`` with ``step`` the denoising-pass index the pipeline writes into every
  call (0..S-1, S = the context pass); a deliberate deviation from QVGen's ``int(t) mod 50`` (§2(f) 5).

The layer (:func:`plain_apply`): ``y = Q_a(x) (Q_w(W + D U))ᵀ + ((Q_a(x) P) ⊙ γ) Q + b`` where ``D U`` is an
optional LoRA ``lora_down`` [in, r] x ``lora_up`` [r, out] merged *before* the weight quantizer
(EfficientDM) and ``P Q`` an optional auxiliary branch ``lr_down`` [in, r] x ``lr_up`` [r, out] with the column
mask ``phi_gamma`` [r] on the quantized input (QVGen's Φ). Without LoRA and Φ it is the plain W/A layer
every method exports; :func:`integer_form` / :func:`integer_apply` are its integer path (int8 codes, int32
dots, zero-point corrections in a float epilogue; XLA on every backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["PlainStatic", "round_ste", "grad_scale", "lsq_weight", "mse_grid_init", "clip_dynamic_act", "lsq_act",
           "quant_input", "effective_weight", "plain_apply", "lowrank_factors", "logit", "integer_form",
           "integer_apply", "plain_weight_bytes", "TRAINABLE", "export_integer_layer",
           "integer_module", "PlainIntLinear", "static_act_init"]

# state names that training updates (the rest of a layer's state is frozen); Params are chosen per method
TRAINABLE = ("w_scale", "w_zero", "clip_lo", "clip_hi", "a_scale", "a_offset", "lr_down", "lr_up", "lora_down",
             "lora_up")


@dataclass(frozen=True)
class PlainStatic:
    """Static description of an LSQ-family layer: ``w_bits``; ``a_bits`` (None: FP activations); ``act``
    ``"dynamic_clip"`` | ``"static"``; ``groups`` step groups of the activation parameters; ``rank`` Φ columns
    allocated (0: no Φ); ``lora`` rank of the LoRA merged before Q_w (0: none)."""

    w_bits: int
    a_bits: int | None
    act: str = "dynamic_clip"
    groups: int = 1
    rank: int = 0
    lora: int = 0

    @property
    def w_qmax(self) -> float:
        return float(2 ** self.w_bits - 1)

    @property
    def a_qmax(self) -> float:
        return float(2 ** (self.a_bits or 8) - 1)


def logit(p: float) -> float:
    return float(math.log(p / (1.0 - p)))


def round_ste(x):
    """round with the straight-through gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def clamp(x, lo, hi):
    """clip with gradient 1 on [lo, hi] *including* the bounds (``jnp.clip`` halves it at a tie, which a
    rounded code equal to 0 or qmax is), 0 outside."""
    return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def grad_scale(p, g):
    """Forward value p, gradient times g."""
    return p * g + jax.lax.stop_gradient(p - p * g)


def lsq_weight(w, scale, zero, bits: int):
    """LSQ+ fake quantization of W [out, in] with step ``scale`` [out] and real zero point ``zero`` [out]."""
    w = jnp.asarray(w, jnp.float32)
    qmax = float(2 ** bits - 1)
    g = 1.0 / math.sqrt(w.shape[1] * qmax)
    s = grad_scale(scale, g)[:, None]
    z = grad_scale(zero, g)[:, None]
    return s * (clamp(round_ste(w / s + z), 0.0, qmax) - z)


@jax.jit
def _grid_search(w, qmax, power):
    lo, hi = jnp.minimum(jnp.min(w, axis=1), 0.0), jnp.maximum(jnp.max(w, axis=1), 0.0)

    def cand(p):
        s = jnp.maximum((hi - lo) * p / qmax, 1e-8)
        z = -lo * p / s
        q = jnp.clip(jnp.round(w / s[:, None] + z[:, None]), 0.0, qmax)
        err = jnp.sum(jnp.abs(w - s[:, None] * (q - z[:, None])) ** power, axis=1)
        return s, z, err

    def body(best, p):
        new = cand(p)
        better = new[2] < best[2]
        return tuple(jnp.where(better, n, o) for n, o in zip(new, best)), None

    ps = 1.0 - jnp.arange(1, 80, dtype=jnp.float32) / 100.0
    best, _ = jax.lax.scan(body, cand(jnp.float32(1.0)), ps)
    return best[0], best[1]


def mse_grid_init(w, bits: int, power: float = 2.4) -> tuple[jax.Array, jax.Array]:
    """(scale [out], real zero point [out]) of W [out, in]: per row the shrink p = 1 - i/100, i < 80, of the
    (min, max) range (0 included) minimising ``sum |W - Ŵ|^power``; ``z = -p lo / s`` (real)."""
    return _grid_search(jnp.asarray(w, jnp.float32), float(2 ** bits - 1), float(power))


def static_act_init(x, bits: int, groups: int, max_values: int = 1 << 16, seed: int = 0):
    """(a_scale [G], a_offset [G]) of the static per-tensor quantizer from calibration rows x [n, in]: the
    MSE grid search over all values (a seeded subsample of ``max_values``), copied to every step group."""
    v = np.asarray(x, np.float32).reshape(-1)
    if v.size > max_values:
        v = v[np.sort(np.random.default_rng(seed).choice(v.size, max_values, replace=False))]
    s, z = mse_grid_init(v[None], bits)
    return jnp.full((groups,), s[0], jnp.float32), jnp.full((groups,), -z[0] * s[0], jnp.float32)


def clip_dynamic_act(x, lo_logit, hi_logit, bits: int):
    """QVGen's per-token dynamic activation quantizer with learnable clipping (logits are scalars)."""
    qmax = float(2 ** bits - 1)
    xf = jnp.asarray(x, jnp.float32)
    xs = jax.lax.stop_gradient(xf)
    lo = jax.nn.sigmoid(lo_logit) * jnp.minimum(jnp.min(xs, axis=-1, keepdims=True), 0.0)
    hi = jax.nn.sigmoid(hi_logit) * jnp.maximum(jnp.max(xs, axis=-1, keepdims=True), 0.0)
    s = jnp.maximum((hi - lo) / qmax, 1e-9)
    z = jax.lax.stop_gradient(jnp.clip(-jnp.round(lo / s), 0.0, qmax))
    return s * (clamp(round_ste(xf / s) + z, 0.0, qmax) - z)


def lsq_act(x, scale, offset, bits: int):
    """LSQ+ static per-tensor activation quantizer (scale and offset are scalars)."""
    qmax = float(2 ** bits - 1)
    xf = jnp.asarray(x, jnp.float32)
    g = 1.0 / math.sqrt(xf.shape[-1] * qmax)
    s, b = grad_scale(scale, g), grad_scale(offset, g)
    return s * clamp(round_ste((xf - b) / s), 0.0, qmax) + b


def quant_input(x, state, static: PlainStatic, step):
    """Q_a(x) in float32 with the parameters of step group ``step % groups``."""
    if static.a_bits is None:
        return jnp.asarray(x, jnp.float32)
    gi = jnp.asarray(step, jnp.int32) % static.groups
    if static.act == "dynamic_clip":
        return clip_dynamic_act(x, state["clip_lo"][gi], state["clip_hi"][gi], static.a_bits)
    return lsq_act(x, state["a_scale"][gi], state["a_offset"][gi], static.a_bits)


def effective_weight(kernel, state, static: PlainStatic):
    """Q_w(W + LoRA) [out, in] float32 (the LoRA merged before quantization, EfficientDM)."""
    w = jnp.asarray(kernel, jnp.float32).T
    if static.lora:
        w = w + (state["lora_down"] @ state["lora_up"]).T
    return lsq_weight(w, state["w_scale"], state["w_zero"], static.w_bits)


def plain_apply(kernel, bias, state, x, static: PlainStatic, step, chunk=0, precision=None):
    """y [..., out] = Q_a(x) Q_w(W (+ LoRA))ᵀ (+ ((Q_a(x) lr_down) ⊙ γ) lr_up) + b, in x's dtype."""
    xq = quant_input(x, state, static, step).astype(x.dtype)
    wq = effective_weight(kernel, state, static)
    y = jnp.einsum("...i,oi->...o", xq, wq.astype(x.dtype), precision=precision)
    if static.rank:
        h = jnp.einsum("...i,ir->...r", xq, state["lr_down"].astype(x.dtype), precision=precision)
        h = h * state["phi_gamma"].astype(x.dtype)
        y = y + jnp.einsum("...r,ro->...o", h, state["lr_up"].astype(x.dtype), precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def lowrank_factors(e, rank: int) -> tuple[jax.Array, jax.Array]:
    """Rank-r factors of E [out, in] (fp32 SVD, singular values descending) in the kernel layout:
    ``down = V_r sqrt(S_r)`` [in, r], ``up = sqrt(S_r) U_rᵀ`` [r, out], ``down @ up = (U_r S_r V_rᵀ)ᵀ``."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(e, jnp.float32), full_matrices=False)
    r = jnp.sqrt(s[:rank])
    return vt[:rank].T * r, r[:, None] * u[:, :rank].T


def plain_weight_bytes(layer) -> int:
    """Deployed bytes of a plain layer: weight codes, the per-channel step and zero point, the activation
    parameters (4 bytes each) and the bias (16-bit). Φ and LoRA are not part of a deployed layer."""
    from qarvd_jax.quant.methods.base import layer_weight_bytes

    st = {n: v for n, v in layer.state.items() if n in ("w_scale", "w_zero", "clip_lo", "clip_hi", "a_scale",
                                                         "a_offset")}
    k = layer.kernel
    return layer_weight_bytes(k.shape[0], k.shape[1], layer.static.w_bits, st, has_bias=layer.bias is not None)


# ------------------------------------------------------------------------------------------ integer form
def integer_form(kernel, bias, state, static: PlainStatic) -> dict:
    """Deployable arrays of a plain layer (no Φ, LoRA merged): ``w_codes`` int8 [out, in] = q_w - 2^(b-1)
    (q_w = clamp(round(W/s + z), 0, qmax)), ``w_scale`` [out], ``w_zero`` [out] (real), ``w_colsum`` int32 [out]
    (Σ_k q_w), the activation parameters of the static's mode and ``bias``."""
    if static.rank or static.lora:
        raise ValueError("integer form: remove Φ and merge the LoRA first (finalize the layer)")
    if static.a_bits is None or static.a_bits > 8 or static.w_bits > 8:
        raise ValueError(f"integer form: needs quantized activations and weights of <= 8 bits "
                         f"(w_bits={static.w_bits}, a_bits={static.a_bits})")
    w = jnp.asarray(kernel, jnp.float32).T
    q = jnp.clip(jnp.round(w / state["w_scale"][:, None] + state["w_zero"][:, None]), 0, static.w_qmax)
    out = {"w_codes": (q - 2 ** (static.w_bits - 1)).astype(jnp.int8), "w_scale": state["w_scale"],
           "w_zero": state["w_zero"], "w_colsum": jnp.sum(q, axis=1).astype(jnp.int32)}
    for n in ("clip_lo", "clip_hi", "a_scale", "a_offset"):
        if n in state:
            out[n] = state[n]
    if bias is not None:
        out["bias"] = bias
    return {k: np.asarray(v) for k, v in out.items()}


def integer_apply(arrays: dict, static: PlainStatic, x, step=0):
    """The integer path: activation codes q_x in [0, qmax] (per token dynamic or static per tensor), shifted
    to int8, one int8 x int8 -> int32 dot with the shifted weight codes, then the float epilogue
    ``y = a_t s_w (Σ q_x q_w - z_w Σ q_x) + c_t s_w (Σ q_w - K z_w) + b`` for ``x̂ = a_t q_x + c_t``."""
    lead, k = x.shape[:-1], x.shape[-1]
    xf = jnp.asarray(x, jnp.float32).reshape(-1, k)
    qmax = static.a_qmax
    gi = jnp.asarray(step, jnp.int32) % static.groups
    if static.act == "dynamic_clip":
        lo = jax.nn.sigmoid(arrays["clip_lo"][gi]) * jnp.minimum(jnp.min(xf, axis=-1, keepdims=True), 0.0)
        hi = jax.nn.sigmoid(arrays["clip_hi"][gi]) * jnp.maximum(jnp.max(xf, axis=-1, keepdims=True), 0.0)
        a = jnp.maximum((hi - lo) / qmax, 1e-9)
        zt = jnp.clip(-jnp.round(lo / a), 0.0, qmax)
        qx = jnp.clip(jnp.round(xf / a) + zt, 0.0, qmax)
        c = -a * zt
    else:
        a, c = arrays["a_scale"][gi], arrays["a_offset"][gi]
        qx = jnp.clip(jnp.round((xf - c) / a), 0.0, qmax)
    ca, cw = 2.0 ** (static.a_bits - 1), 2.0 ** (static.w_bits - 1)
    qs = (qx - ca).astype(jnp.int8)
    p = jax.lax.dot_general(qs, arrays["w_codes"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    colsum_shifted = arrays["w_colsum"] - k * int(cw)  # Σ_k (q_w - cw), int32
    sum_qx_i = jnp.sum(qx.astype(jnp.int32), axis=-1, keepdims=True)
    # Σ q_x q_w = Σ (q_x - ca)(q_w - cw) + cw Σ q_x + ca Σ (q_w - cw), exact in int32
    dot = (p + int(cw) * sum_qx_i + int(ca) * colsum_shifted[None, :]).astype(jnp.float32)
    sum_qx = sum_qx_i.astype(jnp.float32)
    s_w, z_w = arrays["w_scale"][None, :], arrays["w_zero"][None, :]
    y = a * s_w * (dot - z_w * sum_qx) + c * s_w * (arrays["w_colsum"][None, :] - k * z_w)
    if arrays.get("bias") is not None:
        y = y + arrays["bias"].astype(jnp.float32)
    return y.reshape(*lead, -1).astype(x.dtype)


def export_integer_layer(node, bias_dtype) -> tuple[dict, dict]:
    """``qarvd export`` of one finalized LSQ-family MethodLinear: (host arrays, JSON metadata incl. bytes)."""
    from qarvd_jax.quant.methods.base import static_to_dict

    arrays = integer_form(node.kernel[...], node.bias[...] if node.bias is not None else None,
                          {n: getattr(node, "q_" + n)[...] for n in node.state_names}, node.static)
    if "bias" in arrays:
        arrays["bias"] = arrays["bias"].astype(bias_dtype)
    k, n = node.kernel[...].shape
    info = {"method": node.method, "static": static_to_dict(node.static), "in_features": int(k),
            "out_features": int(n), "w_bits": node.static.w_bits, "a_bits": node.static.a_bits, "n_outlier": 0,
            "has_bias": "bias" in arrays,
            "bytes": {"weight": int(arrays["w_codes"].nbytes), "total": int(sum(a.nbytes for a in arrays.values())),
                      "bf16": 2 * (k * n + (n if "bias" in arrays else 0))}}
    return arrays, info


class PlainIntLinear(nnx.Module):
    """The integer layer of an exported LSQ-family layer (``qarvd generate --backend ...``; XLA int8 dots on
    every backend); ``step_index`` is the step context the pipeline fills before every call."""

    def __init__(self, arrays: dict, info: dict, dtype=None):
        from qarvd_jax.quant.integer.int_linear import IntState
        from qarvd_jax.quant.methods.base import StepContext, static_from_dict

        self.names = tuple(sorted(arrays))
        for k in self.names:
            setattr(self, "i_" + k, IntState(jnp.asarray(arrays[k])))
        self.static = static_from_dict(info["static"])
        self.method = info["method"]
        self.dtype = dtype
        self.step_index = StepContext(jnp.zeros((), jnp.int32))
        self.backend_label = f"xla ({info['method']})"

    def __call__(self, x):
        x = x.astype(self.dtype) if self.dtype is not None else x
        return integer_apply({k: getattr(self, "i_" + k)[...] for k in self.names}, self.static, x,
                             self.step_index[...])


def integer_module(arrays: dict, info: dict, dtype=None) -> PlainIntLinear:
    return PlainIntLinear(arrays, info, dtype)
