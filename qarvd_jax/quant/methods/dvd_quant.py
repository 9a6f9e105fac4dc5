"""DVD-Quant: data-free W4A4 with BGR weights, ARQ rotated activations and δ-GBS bit switching.

Forward of one layer (``quantizer_variants.md`` §3(a), U.1)::

    y = [Q_B(X R Λ^-1) Λ] · BGR(W R)^T + b,      R = D H  (D: ±1 signs, H: block Walsh-Hadamard)

* **BGR** (bounded-init grid refinement) on the rotated weight W R, per output channel, asymmetric
  ``w_bits``: (1) bounded init: clip each row to ``[min + p R, max - p R]`` (R = max - min) and keep the
  p of ``p = 0, 1/bgr_init_steps * bgr_init_max, ..., bgr_init_max`` with the lowest error (``bgr_init=
  "sym"``, paper v1) or independent lower/upper shifts on that grid (``"grid2d"``, v3, the default: the
  symmetric shift keeps a row's asymmetry and ends above the MSE clip search, 3.01 vs 2.98 on a
  256 x 1536 Gaussian matrix, where grid2d gives 2.95); (2) coordinate
  descent, per row: codes ``W_q = clamp(round(W/Δ) + z, 0, 2^b - 1)``; step by least squares
  ``Δ = <W_q - z, W> / <W_q - z, W_q - z>``; zero point relaxed to the real ``mean_row(W_q - W/Δ)``
  then rounded and clamped; the best (Δ, z) of every row is kept, so the error never rises. Stop when
  the kept error improves by less than ``bgr_tol`` (relative), falls to ``bgr_threshold`` (absolute
  mean squared error per element, 0 = off) or after ``bgr_max_iters`` rounds.
* **ARQ** (auto-scaling rotated quantization): the input dimension is rotated by R. H is one
  Walsh-Hadamard transform of the whole width when it is a power of two, else block-diagonal with
  block ``rotation_block`` (128: Wan 1.3B widths 1536 = 12 x 128 and 8960 = 70 x 128; the block of
  every layer is recorded in the summary, ``rotation``). The weight side is rotated once at
  quantization (the stored kernel is (W R)^T); the activation side online (fast transform,
  :mod:`qarvd_jax.quant.hadamard`). Λ = per-channel max |X R| over all tokens of the current call
  (recomputed every call: every chunk, denoising step, prompt; activation side only, never migrated into
  the weights), then per-token dynamic min-max quantization of X R Λ^-1 (asymmetric; ``a_symmetric``).
* **δ-GBS** (:mod:`qarvd_jax.quant.bit_switch`): the activation width of every denoising step is
  ``a_bits`` (low, A4) or ``a_bits_high`` (A6/A8), decided at generation time from the model's own
  outputs by the pipeline inside the compiled chunk function and passed explicitly into every layer as
  the ``act_high`` context leaf (like the step index; nothing counts calls). The accumulator restarts
  at every chunk (Self-Forcing has only 4 steps per chunk: a project adaptation; the first step of a
  chunk is high for ``delta <= 1``). The context pass uses the width the rule gives after the last
  step. ``delta`` (config) 0: high at every step; huge: low at every step.
  Without a pipeline (``layer(x)`` directly) the layer runs at ``a_bits``; so do the cross-attention
  K/V projections, computed once per video outside the chunk function.

Every part is switchable (the paper's ablation): ``bgr=false`` (min-max weights), ``rotate=false``,
``act_scale=false`` (no Λ), ``gbs=false`` (always ``a_bits``).

Paper: Li, Li, Wu, Liu, Qin, Kong, Chen, Zhang, Yang, "DVD-Quant: Data-free Video Diffusion Transformers
Quantization", ICLR 2026 (arXiv 2505.18663; v1 called BGR "Progressive Bounded Quantization"). The
authors released no code (``lhxcs/DVD-Quant`` 430cde6 holds README and figures only); this is a first
implementation from the paper notes, the overview figures and the OpenReview reviews, as summarised in
``quantizer_variants.md`` §3 and U.1. Project choices where the paper is silent (that document's table of
labelled defaults): random ±1 signs seeded by ``seed`` and the width (layers of one width share
them); Λ per channel (not the paper's hardware block-wise Λ); per-token asymmetric activations; BGR
independent (δ_l, δ_u) init over [0, 0.2]^2 (21 x 21), <= 50 rounds, tolerance 1e-4; z from the row mean; δ fixed (not
tuned on prompts, which would need data).

Λ is per channel by default; ``lambda_block`` (e.g. 128, the kernel K-tile) makes it constant per K-block
(the paper's "hardware-friendly block-wise" form), which the integer form needs.

Integer form (``qarvd export``, ``qarvd generate --backend xla|pallas``): :func:`integer_form` (the unsigned
int4 codes q_w of the rotated weights packed two per byte, ``w_packed`` uint8 [out, in/2] in the half-split
layout of :mod:`kernels_pallas.int4_pack`, with the zero points ``w_zero``: the rotation is folded in and
the same codes serve A4 and A8; per-K-block column sums of q_w - z_w) and :func:`integer_apply` (online
FWHT and Λ as one separate pass, then :func:`kernels_pallas.rotated_w4a4_matmul`: per-token dynamic codes
in the prologue, int4 unpacking, int8 x int8 -> int32 dot per K-block, zero-point correction and Λ in the
epilogue), run by :class:`DVDIntLinear`: ``--backend xla`` with XLA's int8 dot, ``--backend pallas`` with
the Pallas TPU kernel (:mod:`kernels_pallas.tpu_rotated_matmul`; on CPU only in interpret mode) where the
shapes allow (``lambda_block`` a multiple of 128, in % (2 lambda_block) == 0, out % 128 == 0; the default
``lambda_block=1`` never does), else the XLA path (label ``'xla (shape fallback)'``). There is no Mosaic
GPU kernel for it: on a GPU ``pallas`` runs the XLA path. An export from before the packing (int8
``w_codes``) is refused with a request to re-export.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.int4_pack import pack_int4
from kernels_pallas.rotated_w4a4_matmul import rotated_kernel_ok, rotated_w4a4_matmul, token_codes
from qarvd_jax.quant.fake_quant import QuantParams, QuantSpec, fake_quant, minmax_params, params_from_range
from qarvd_jax.quant.hadamard import block_fwht, rotation_block
from qarvd_jax.quant.methods import base
from qarvd_jax.quant.methods.base import QuantizedLayer

NAME = "dvd-quant"
HAS_INTEGER_FORM = True  # its own integer layer (DVDIntLinear), not the QuantLinear layout

__all__ = ["NAME", "Config", "Static", "BGRResult", "bgr_init", "bgr_step", "bgr_quantize", "rotate", "signs_for",
           "act_quant", "quantize_layer", "apply", "quantize_model", "needs_calibration", "weight_bytes",
           "bit_switch_of", "rotation_blocks", "channel_scale", "integer_form", "integer_apply",
           "export_integer_layer", "DVDIntLinear", "integer_module"]


@dataclass(frozen=True)
class Config:
    """``w_bits`` weight bits (4); ``a_bits`` the low activation bits (4; None: FP activations);
    ``a_bits_high`` the δ-GBS high state (8, or 6); ``delta`` the δ-GBS threshold; ``gbs_init`` the
    accumulator at a chunk's first step; BGR: ``bgr``, ``bgr_init`` ("sym" | "grid2d"), ``bgr_init_max``,
    ``bgr_init_steps``, ``bgr_max_iters``, ``bgr_tol``, ``bgr_threshold``; ARQ: ``rotate``,
    ``rotation_block``, ``random_signs``, ``seed``, ``act_scale``, ``a_symmetric``; ``layers``."""

    w_bits: int = 4
    a_bits: int | None = 4
    a_bits_high: int | None = 8
    lambda_block: int = 1
    delta: float = 0.12
    gbs: bool = True
    gbs_init: float = 1.0
    bgr: bool = True
    bgr_init: str = "grid2d"
    bgr_init_max: float = 0.2
    bgr_init_steps: int = 20
    bgr_max_iters: int = 50
    bgr_tol: float = 1e-4
    bgr_threshold: float = 0.0
    rotate: bool = True
    rotation_block: int = 128
    random_signs: bool = True
    seed: int = 0
    act_scale: bool = True
    a_symmetric: bool = False
    layers: tuple[str, ...] = ("blocks.*",)

    def __post_init__(self):
        base.check_bits(NAME, self.w_bits, self.a_bits)
        if self.a_bits_high is not None and not 2 <= self.a_bits_high <= 16:
            raise ValueError(f"dvd-quant: a_bits_high={self.a_bits_high} must be in [2, 16]")
        if self.bgr_init not in ("sym", "grid2d"):
            raise ValueError(f"dvd-quant: bgr_init={self.bgr_init!r} must be 'sym' or 'grid2d'")
        if not 0 <= self.bgr_init_max < 0.5 or self.bgr_init_steps < 0 or self.bgr_max_iters < 0:
            raise ValueError("dvd-quant: 0 <= bgr_init_max < 0.5, bgr_init_steps >= 0, bgr_max_iters >= 0")
        if self.rotation_block < 1 or self.rotation_block & (self.rotation_block - 1):
            raise ValueError(f"dvd-quant: rotation_block={self.rotation_block} must be a power of two")
        if self.lambda_block < 1:
            raise ValueError(f"dvd-quant: lambda_block={self.lambda_block} must be >= 1")
        if not self.delta >= 0:
            raise ValueError(f"dvd-quant: delta={self.delta} must be >= 0")

    @property
    def high_bits(self) -> int | None:
        """The high activation width actually used (never below ``a_bits``)."""
        if self.a_bits is None:
            return None
        return max(self.a_bits, self.a_bits_high or self.a_bits)


@dataclass(frozen=True)
class Static:
    w_spec: QuantSpec
    a_bits: int | None
    a_bits_high: int | None
    rot_block: int  # 1: no rotation
    act_scale: bool
    a_symmetric: bool
    gbs: bool
    delta: float
    gbs_init: float
    lam_block: int = 1


def needs_calibration(cfg: Config) -> bool:
    return False


# ------------------------------------------------------------------------------------------ BGR
class BGRResult(NamedTuple):
    """Per-row step ``scale`` [out], integer ``zero`` [out], the errors (sum over rows of the mean
    squared error per row): ``minmax_error``, ``init_error`` and ``history`` (kept-best error after the
    init and after every round; non-increasing)."""

    scale: jax.Array
    zero: jax.Array
    minmax_error: float
    init_error: float
    history: list


def _row_err(w, s, z, qmax):
    q = jnp.clip(jnp.round(w / s[:, None]) + z[:, None], 0, qmax)
    return jnp.mean((w - s[:, None] * (q - z[:, None])) ** 2, axis=1)


def _range_params(lo, hi, bits):
    p = params_from_range(lo, hi, base.weight_spec(bits))
    return p.scale, jnp.clip(p.zero_point, 0, 2 ** bits - 1)


@jax.jit
def _init_search(w, shifts, qmax):
    """Best (scale, zero, row error) per row over the inward shifts ``shifts`` [P, 2] (lower, upper)."""
    lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)
    r = hi - lo

    def cand(sh):
        s = jnp.maximum((r - (sh[0] + sh[1]) * r) / qmax, 1e-8)
        z = jnp.clip(jnp.round(-(lo + sh[0] * r) / s), 0, qmax)
        return s, z, _row_err(w, s, z, qmax)

    def body(best, sh):
        new = cand(sh)
        better = new[2] < best[2]
        return tuple(jnp.where(better, n, o) for n, o in zip(new, best)), None

    best, _ = jax.lax.scan(body, cand(shifts[0]), shifts[1:])
    return best


def bgr_init(w, bits: int, *, mode: str = "grid2d", max_shift: float = 0.2, steps: int = 20):
    """Bounded init of W [out, in]: ``(scale, zero, row_errors)`` of the best inward-shifted range
    ``[min + δ_l R, max - δ_u R]`` per row (``sym``: δ_l = δ_u; ``grid2d``: independent)."""
    w = jnp.asarray(w, jnp.float32)
    grid = [max_shift * i / steps for i in range(steps + 1)] if steps else [0.0]
    pairs = [(p, p) for p in grid] if mode == "sym" else [(a, b) for a in grid for b in grid]
    if len(pairs) == 1:
        pairs = pairs * 2
    return _init_search(w, jnp.asarray(pairs, jnp.float32), float(2 ** bits - 1))


@jax.jit
def bgr_step(w, s, z, qmax):
    """One coordinate-descent round: re-round the codes, least-squares step, real zero point then
    rounded and clamped. Returns the new ``(scale, zero, row_errors)``."""
    q = jnp.clip(jnp.round(w / s[:, None]) + z[:, None], 0, qmax)
    d = q - z[:, None]
    num = jnp.sum(d * w, axis=1)
    den = jnp.sum(d * d, axis=1)
    s_new = jnp.where((den > 0) & (num > 0), num / jnp.where(den > 0, den, 1.0), s)
    z_new = jnp.clip(jnp.round(jnp.mean(q - w / s_new[:, None], axis=1)), 0, qmax)
    return s_new, z_new, _row_err(w, s_new, z_new, qmax)


def bgr_quantize(w, bits: int, *, init: str = "grid2d", init_max: float = 0.2, init_steps: int = 20,
                 max_iters: int = 50, tol: float = 1e-4, threshold: float = 0.0) -> BGRResult:
    """BGR of W [out, in] (see the module docstring)."""
    w = jnp.asarray(w, jnp.float32)
    qmax = float(2 ** bits - 1)
    mm = minmax_params(w, base.weight_spec(bits))
    minmax_error = float(jnp.sum(_row_err(w, mm.scale, mm.zero_point, qmax)))
    s, z, e = bgr_init(w, bits, mode=init, max_shift=init_max, steps=init_steps)
    best_s, best_z, best_e = s, z, e
    history = [float(jnp.sum(best_e))]
    n = w.size
    for _ in range(max_iters):
        if threshold > 0 and history[-1] / n <= threshold:
            break
        s, z, e = bgr_step(w, s, z, qmax)
        better = e < best_e
        best_s, best_z, best_e = (jnp.where(better, a, b) for a, b in ((s, best_s), (z, best_z), (e, best_e)))
        history.append(float(jnp.sum(best_e)))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return BGRResult(best_s, best_z, minmax_error, history[0], history)


# ------------------------------------------------------------------------------------------ ARQ
def signs_for(k: int, seed: int, random: bool = True) -> jax.Array:
    """The ±1 sign vector D of width ``k`` (seeded by ``seed`` and ``k``; all ones if not random)."""
    if not random:
        return jnp.ones((k,), jnp.float32)
    rng = np.random.default_rng([seed, k, zlib.crc32(b"dvd-quant")])
    return jnp.asarray(rng.choice(np.array([-1.0, 1.0], np.float32), size=k))


def rotate(x, signs, block: int):
    """``x R`` along the last axis (R = diag(signs) H_block), float32; block 1: x * signs."""
    x = jnp.asarray(x, jnp.float32) * signs
    return x if block <= 1 else block_fwht(x, block)


def act_quant(x, bits, high_bits=None, high=False, *, symmetric: bool = False):
    """Per-token dynamic fake quantization of x [..., K] (float32) at ``high_bits`` where ``high``
    (traced bool) else ``bits``; one pass (the number of levels is traced)."""
    b = jnp.where(jnp.asarray(high) & (high_bits is not None), high_bits or bits, bits).astype(jnp.float32)
    x = jax.lax.stop_gradient(x)
    if symmetric:
        qmax = 2.0 ** (b - 1) - 1
        s = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / qmax, 1e-8)
        return jnp.clip(jnp.round(x / s), -qmax - 1, qmax) * s
    q, s, z = token_codes(x, b)
    return (q - z) * s


def channel_scale(xr, block: int = 1):
    """Λ [K]: max |xr| over all tokens of the call, per channel (``block`` 1) or per K-block of ``block``
    channels (the kernel-friendly form), repeated over the block; 1 where the maximum is 0."""
    lam = jnp.max(jnp.abs(jax.lax.stop_gradient(xr)).reshape(-1, xr.shape[-1]), axis=0)
    if block > 1:
        lam = jnp.repeat(jnp.max(lam.reshape(-1, block), axis=1), block)
    return jnp.where(lam > 0, lam, 1.0)


# ------------------------------------------------------------------------------------------ layer
def quantize_layer(kernel, bias, calib_inputs, config: Config, *, steps=None) -> QuantizedLayer:
    """kernel [in, out], bias [out] | None; ``calib_inputs`` ignored (data-free; None is fine)."""
    kernel, bias, _ = base.check_layer_inputs(kernel, bias, None, needs_data=False, name=NAME)
    k_in = kernel.shape[0]
    block = rotation_block(k_in, config.rotation_block) if config.rotate else 1
    signs = signs_for(k_in, config.seed, config.random_signs and block > 1)
    w_r = rotate(kernel.T, signs, block)  # W R, [out, in]
    if config.bgr:
        res = bgr_quantize(w_r, config.w_bits, init=config.bgr_init, init_max=config.bgr_init_max,
                           init_steps=config.bgr_init_steps, max_iters=config.bgr_max_iters, tol=config.bgr_tol,
                           threshold=config.bgr_threshold)
        scale, zero = res.scale, res.zero
    else:
        p = minmax_params(w_r, base.weight_spec(config.w_bits))
        scale, zero = p.scale, p.zero_point
    state = {"w_scale": scale, "w_zero": zero, "signs": signs, "act_high": jnp.zeros((), jnp.float32)}
    static = Static(base.weight_spec(config.w_bits), config.a_bits, config.high_bits, block, config.act_scale,
                    config.a_symmetric, config.gbs and config.a_bits is not None, float(config.delta),
                    float(config.gbs_init), config.lambda_block)
    return QuantizedLayer(NAME, w_r.T, bias, state, static)


def apply(kernel, bias, state, x, static: Static, step, chunk, precision=None):
    """y = Q_B(x R / Λ) Λ BGR(W R)^T + b; ``kernel`` is the rotated (W R)^T [in, out]."""
    xr = rotate(x, state["signs"], static.rot_block)
    if static.a_bits is not None:
        lam = channel_scale(xr, static.lam_block) if static.act_scale else 1.0
        high = (state["act_high"] > 0.5) if static.gbs else False
        xr = act_quant(xr / lam, static.a_bits, static.a_bits_high, high, symmetric=static.a_symmetric) * lam
    wq = fake_quant(jnp.asarray(kernel, jnp.float32).T, QuantParams(state["w_scale"], state["w_zero"]), static.w_spec)
    y = jnp.einsum("...i,oi->...o", xr.astype(x.dtype), wq.astype(x.dtype), precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def weight_bytes(layer: QuantizedLayer) -> int:
    """4-bit codes, per-row scale and zero point, the sign vector (1 bit per input), the bias."""
    k = layer.kernel
    st = {n: v for n, v in layer.state.items() if n in ("w_scale", "w_zero")}
    return base.layer_weight_bytes(k.shape[0], k.shape[1], layer.static.w_spec.bits, st,
                                   has_bias=layer.bias is not None) + -(-k.shape[0] // 8)


# ------------------------------------------------------------------------------------------ integer form
def integer_form(layer: QuantizedLayer) -> dict:
    """The deployable arrays of a dvd-quant layer: ``w_packed`` uint8 [out, in / 2], the unsigned int4 codes
    q_w of the rotated weights (the rotation is folded in: they quantize W R) packed two per byte
    (:func:`kernels_pallas.int4_pack.pack_int4`, halves along K, ``signed=False``; the same codes serve A4
    and A8); ``w_zero`` int8 [out] (0..2^b - 1); ``w_scale`` [out]; ``colsum`` int32 [in / lam_block, out]
    (per K-block sums of q_w - z_w, for the activation zero-point correction); ``signs`` [in]; ``bias``."""
    st = layer.static
    if st.a_symmetric:
        raise ValueError("dvd-quant integer form: asymmetric activations only (a_symmetric=false)")
    if st.w_spec.bits != 4:
        raise ValueError(f"dvd-quant integer form: 4-bit weights only (w_bits={st.w_spec.bits})")
    w = jnp.asarray(layer.kernel, jnp.float32).T
    z = layer.state["w_zero"]
    q = jnp.clip(jnp.round(w / layer.state["w_scale"][:, None]) + z[:, None], 0, st.w_spec.qmax).astype(jnp.int32)
    k = q.shape[1]
    if k % st.lam_block or k % 2:
        raise ValueError(f"dvd-quant integer form: in={k} must be even and a multiple of lambda_block="
                         f"{st.lam_block}")
    codes = q - z.astype(jnp.int32)[:, None]
    colsum = jnp.sum(codes.reshape(codes.shape[0], k // st.lam_block, st.lam_block), axis=2).T
    return {"w_packed": pack_int4(q, signed=False), "w_zero": z.astype(jnp.int8), "w_scale": layer.state["w_scale"],
            "colsum": colsum, "signs": layer.state["signs"], "bias": layer.bias}


def integer_apply(arrays: dict, static: Static, x, high=False, *, backend: str = "xla", interpret=False):
    """The integer path of one layer: online FWHT of x [..., in] and Λ per K-block of ``lam_block`` (one
    separate pass: Λ reduces over all tokens), then :func:`kernels_pallas.rotated_w4a4_matmul` on
    ``backend`` ('xla' | 'reference' | 'pallas_tpu'): dynamic per-token codes at 4 or 8 bits (``high``),
    shifted to int8 (q - 2^(b-1)), the packed int4 weight codes unpacked, an int8 x int8 -> int32 dot per
    K-block, the zero-point correction ``(2^(b-1) - z_t) colsum`` and the float epilogue
    ``s_t s_w sum_b λ_b P_b + bias``."""
    lead = x.shape[:-1]
    xr = rotate(x, arrays["signs"], static.rot_block).reshape(-1, x.shape[-1])
    k, blk = xr.shape[-1], static.lam_block
    lam = channel_scale(xr, blk) if static.act_scale else jnp.ones((k,), jnp.float32)
    y = rotated_w4a4_matmul(xr, lam, arrays["w_packed"], arrays["w_zero"], arrays["w_scale"], arrays["colsum"],
                            high=jnp.asarray(high) & static.gbs, a_bits=static.a_bits, a_bits_high=static.a_bits_high,
                            lam_block=blk, bias=arrays.get("bias"), backend=backend, interpret=interpret)
    return y.reshape(*lead, -1).astype(x.dtype)


def export_integer_layer(node, bias_dtype) -> tuple[dict, dict]:
    """``qarvd export`` of one dvd-quant MethodLinear: (host arrays, JSON metadata incl. bytes; ``weight`` is
    the packed codes, in / 2 bytes per output row)."""
    from qarvd_jax.quant.methods.base import static_to_dict

    arrays = {k: np.asarray(v) for k, v in integer_form(node.quantized_layer()).items() if v is not None}
    if "bias" in arrays:
        arrays["bias"] = arrays["bias"].astype(bias_dtype)
    k, n = node.kernel[...].shape
    info = {"method": NAME, "static": static_to_dict(node.static), "in_features": int(k), "out_features": int(n),
            "w_bits": node.static.w_spec.bits, "a_bits": node.static.a_bits, "n_outlier": 0,
            "has_bias": "bias" in arrays, "w_format": "int4-packed",
            "bytes": {"weight": int(arrays["w_packed"].nbytes), "total": int(sum(a.nbytes for a in arrays.values())),
                      "bf16": 2 * (k * n + (n if "bias" in arrays else 0))}}
    return arrays, info


def _int_backend(backend: str, interpret: bool, k: int, n: int, lam_block: int) -> tuple[str, str]:
    """(kernel backend, label) of a dvd-quant integer layer; labels as IntLinear's."""
    from qarvd_jax.quant.integer.int_linear import resolve_backend

    picked = resolve_backend(backend, interpret)
    if picked in ("xla", "reference"):
        return picked, f"{picked} (dvd-quant)"
    if picked == "pallas_gpu":
        return "xla", "xla (no pallas_gpu kernel for dvd-quant)"
    if not rotated_kernel_ok(k, n, lam_block):
        return "xla", "xla (shape fallback)"
    return picked, picked


class DVDIntLinear(nnx.Module):
    """The integer dvd-quant layer of ``qarvd generate --backend xla|pallas``: ``backend`` as
    :class:`~qarvd_jax.quant.integer.int_linear.IntLinear` ('pallas' runs the Pallas TPU kernel; on CPU only
    with ``interpret``); shapes the kernel rejects (and GPUs, which have no kernel for it) run the XLA
    integer path. ``q_act_high`` is the δ-GBS context leaf the pipeline fills, as in the fake-quant layer."""

    def __init__(self, arrays: dict, info: dict, dtype=None, *, backend: str = "xla", interpret: bool = False):
        from qarvd_jax.quant.integer.int_linear import IntState
        from qarvd_jax.quant.methods.base import static_from_dict
        from qarvd_jax.quant.qlinear import QuantState

        self.layer_name = ".".join(map(str, info.get("path", ["?"])))
        if "w_codes" in arrays or "w_packed" not in arrays:
            raise ValueError(f"{self.layer_name}: an unpacked dvd-quant export (int8 'w_codes', one 4-bit code per "
                             "byte, from before the codes were packed two per byte) is no longer loadable; "
                             "re-export the quantized checkpoint with `qarvd export`")
        self.names = tuple(sorted(arrays))
        for k in self.names:
            setattr(self, "i_" + k, IntState(jnp.asarray(arrays[k])))
        self.static = static_from_dict(info["static"])
        self.method = NAME
        self.dtype = dtype
        self.interpret = bool(interpret)
        self.q_act_high = QuantState(jnp.zeros((), jnp.float32))
        self.kernel_backend, self.backend_label = _int_backend(backend, interpret, int(info["in_features"]),
                                                               int(info["out_features"]), self.static.lam_block)

    def __call__(self, x):
        x = x.astype(self.dtype) if self.dtype is not None else x
        arrays = {k: getattr(self, "i_" + k)[...] for k in self.names}
        return integer_apply(arrays, self.static, x, self.q_act_high[...] > 0.5, backend=self.kernel_backend,
                             interpret=self.interpret)


def integer_module(arrays: dict, info: dict, dtype=None, *, backend: str = "xla", interpret: bool = False
                   ) -> DVDIntLinear:
    return DVDIntLinear(arrays, info, dtype, backend=backend, interpret=interpret)


# ------------------------------------------------------------------------------------------ model level
def rotation_blocks(model) -> dict[str, int]:
    """``name -> Hadamard block`` of every dvd-quant layer (1: not rotated)."""
    from qarvd_jax.quant.methods.model import iter_method_layers

    return {n: lyr.static.rot_block for n, lyr in iter_method_layers(model) if lyr.method == NAME}


def bit_switch_of(model):
    """The δ-GBS controller (:class:`~qarvd_jax.quant.bit_switch.BitSwitch`) of a model with dvd-quant
    layers that switch bits, else None (the pipeline calls this)."""
    from qarvd_jax.quant.bit_switch import BitSwitch

    found = {BitSwitch(n.static.delta, n.static.gbs_init, n.static.a_bits, n.static.a_bits_high)
             for _, n in nnx.iter_graph(model)
             if isinstance(getattr(n, "static", None), Static) and getattr(n, "method", None) == NAME and n.static.gbs}
    if len(found) > 1:
        raise ValueError(f"dvd-quant layers with different δ-GBS settings in one model: {sorted(map(str, found))}")
    return found.pop() if found else None


def quantize_model(model, calibration, config: Config, rules=None) -> dict:
    """Data-free, in place, by rules (``calibration`` may be None). The summary adds ``rotation``
    (layer -> Hadamard block) and ``bit_switch`` (the δ-GBS settings)."""
    from qarvd_jax.quant.methods.model import quantize_model_with_rules

    out = quantize_model_with_rules(model, calibration, config, rules, NAME)
    out["rotation"] = rotation_blocks(model)
    sw = bit_switch_of(model)
    out["bit_switch"] = dataclasses.asdict(sw) if sw is not None else None
    return out
