"""The four-step Q-ARVD workflow as library functions (the CLI and the demo are thin wrappers).

1. :func:`run_sensitivity` — chunk-wise sensitivity of the RTN+dual-scale quantized model.
2. :func:`run_quantize_qarvd` — the post-training recipe, saved as an Orbax quantized checkpoint.
3. generation with ``qarvd generate --quantized`` (:mod:`qarvd_jax.pipeline.text_to_video`).
4. evaluation with ``qarvd evaluate`` (:mod:`qarvd_jax.eval`).

A :class:`Stack` bundles the full-precision DiT, the prompt encoder (cached, freed after use), the
VAE and the latent geometry, built from checkpoints or the built-in tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from convert.state_dict_io import atomic_output
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
from qarvd_jax.pipeline.text_to_video import GenerateConfig, TextToVideo, build_text_to_video
from qarvd_jax.quant.recipe import QARVDConfig

__all__ = ["DEMO_PROMPTS", "Stack", "build_stack", "run_sensitivity", "run_quantize_qarvd", "run_quantize_method",
           "quantize_copy", "write_json"]

log = logging.getLogger(__name__)

DEMO_PROMPTS = (
    "a red fox running through fresh snow at sunrise",
    "a timelapse of clouds rolling over green mountains",
    "a paper boat drifting down a rainy street gutter",
    "a close-up of a hummingbird drinking from a flower",
    "city traffic at night with neon reflections on wet asphalt",
    "waves crashing on black volcanic rocks in slow motion",
    "an astronaut walking on a dusty orange planet",
    "a cat stretching on a sunny windowsill",
)


def write_json(path: str, obj) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)


@dataclass
class Stack:
    """Everything a workflow step needs; ``latent_shape`` is (F, C, h, w)."""

    t2v: TextToVideo
    gen: GenerateConfig
    latent_shape: tuple[int, int, int, int]

    @property
    def dit(self):
        return self.t2v.dit

    def embeds(self, prompts) -> np.ndarray:
        return self.t2v.encode_prompts(list(prompts))


def build_stack(gen: GenerateConfig, work_dir: str, dit=None) -> Stack:
    """Load the models (or the built-in tiny ones) and resolve the geometry defaults."""
    t2v, gen = build_text_to_video(gen, work_dir, dit=dit)
    return Stack(t2v, gen, t2v.latent_shape(gen.num_frames, gen.height, gen.width))


def _seeds(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def _calibrated_rtn_pipeline(stack: Stack, cfg: QARVDConfig, calib_prompts, seed: int):
    """Quantize a copy of the DiT (dual-scale split, RTN weights) and calibrate activations with
    uniform chunk weights: the model step 1 measures."""
    from flax import nnx

    from qarvd_jax.quant.calibration import calibrate_rtn, prepare_quantized_model
    from qarvd_jax.quant.qlinear import set_quant_flags

    model = nnx.clone(stack.dit)
    layers = prepare_quantized_model(model, cfg)
    pipe = CausalInferencePipeline(model, stack.t2v.pipeline.config)
    calibrate_rtn(model, pipe, stack.embeds(calib_prompts), _seeds(seed, len(calib_prompts)), stack.latent_shape,
                  cfg, omega=None)
    set_quant_flags(model, weights=True, acts=True)
    pipe.set_model(model)
    return pipe, layers


def run_sensitivity(stack: Stack, cfg: QARVDConfig, prompts, *, num_prompts: int, seed: int, out_dir: str) -> dict:
    """Step 1: writes ``sensitivity.json`` and ``sensitivity.png`` in ``out_dir``; returns the result."""
    from qarvd_jax.quant.sensitivity import chunk_sensitivity, write_sensitivity

    if len(prompts) < 2:
        raise ValueError("sensitivity needs at least 2 prompts (one to calibrate, the rest to measure)")
    pipe, layers = _calibrated_rtn_pipeline(stack, cfg, [prompts[0]], seed)
    sweep = list(prompts[1:1 + num_prompts]) if len(prompts) > 1 else list(prompts[:1])
    if len(sweep) < num_prompts:
        log.warning("sensitivity: %d prompts requested but only %d available after the calibration prompt "
                    "(the original measures 100 of MovieGenVideoBench_extended.txt)", num_prompts, len(sweep))
    result = chunk_sensitivity(pipe, stack.embeds(sweep), _seeds(seed + 1000, len(sweep)), stack.latent_shape)
    result.update(prompts=sweep, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                  dual_scale_layers=sorted(n for n, c in layers.items() if c.n_outlier))
    os.makedirs(out_dir, exist_ok=True)
    write_sensitivity(result, os.path.join(out_dir, "sensitivity.json"), os.path.join(out_dir, "sensitivity.png"))
    return result


def run_quantize_qarvd(stack: Stack, cfg: QARVDConfig, calib_prompts, *, seed: int, out_dir: str,
                       sensitivity=None, overwrite: bool = True) -> str:
    """Step 2: Q-ARVD PTQ of a copy of the DiT; writes ``OUT/quantized`` (Orbax) and ``OUT/quantize.json``."""
    from flax import nnx

    from qarvd_jax.quant.calibration import run_qarvd_ptq
    from qarvd_jax.quant.checkpoint import save_quantized

    model = nnx.clone(stack.dit)
    pipe = CausalInferencePipeline(model, stack.t2v.pipeline.config)
    summary = run_qarvd_ptq(model, pipe, stack.embeds(calib_prompts), _seeds(seed, len(calib_prompts)),
                            stack.latent_shape, cfg, sensitivity=sensitivity)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "quantized")
    meta = {"method": "qarvd", "recipe": dataclasses.asdict(cfg), "sensitivity": sensitivity,
            "calibration_prompts": list(calib_prompts), "seed": seed}
    save_quantized(ckpt, model, metadata=meta, overwrite=overwrite)
    write_json(os.path.join(out_dir, "quantize.json"), {**meta, **summary})
    return ckpt


def quantize_copy(stack: Stack, method: str, cfg, calib_prompts, *, seed: int, sensitivity=None, rules=None):
    """A quantized copy of the DiT by ``method`` (:mod:`qarvd_jax.quant.methods`), calibrated on
    ``calib_prompts`` with seeds ``seed, seed + 1, ...``. Returns ``(model, summary)``; ``qarvd`` runs
    exactly :func:`run_qarvd_ptq` (as :func:`run_quantize_qarvd`)."""
    from flax import nnx

    from qarvd_jax.quant import methods

    model = nnx.clone(stack.dit)
    cal = None  # no calibration prompts: a data-free method (dvd-quant) encodes and runs nothing
    if calib_prompts:
        cal = methods.Calibration(stack.embeds(calib_prompts), _seeds(seed, len(calib_prompts)), stack.latent_shape,
                                  sampler=stack.t2v.pipeline.config, sensitivity=sensitivity, seed=seed)
    summary = methods.get(method).quantize_model(model, cal, cfg, rules)
    return model, summary


def run_quantize_method(stack: Stack, method: str, cfg, calib_prompts, *, seed: int, out_dir: str,
                        sensitivity=None, overwrite: bool = True) -> str:
    """Step 2 with any registered method; ``qarvd`` is :func:`run_quantize_qarvd` unchanged. Writes
    ``OUT/quantized`` (method and config recorded in its metadata) and ``OUT/quantize.json``."""
    from qarvd_jax.quant.checkpoint import save_quantized
    from qarvd_jax.quant.methods import get

    name = get(method).NAME
    if name == "qarvd":
        return run_quantize_qarvd(stack, cfg, calib_prompts, seed=seed, out_dir=out_dir, sensitivity=sensitivity,
                                  overwrite=overwrite)
    model, summary = quantize_copy(stack, name, cfg, calib_prompts, seed=seed, sensitivity=sensitivity)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "quantized")
    meta = {"method": name, "recipe": dataclasses.asdict(cfg), "sensitivity": sensitivity,
            "calibration_prompts": list(calib_prompts), "seed": seed}
    save_quantized(ckpt, model, metadata=meta, overwrite=overwrite)
    write_json(os.path.join(out_dir, "quantize.json"), {**meta, **summary})
    return ckpt
