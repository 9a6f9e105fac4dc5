"""``qarvd demo``: the four-step workflow end to end on a built-in model (default: the random tiny one; the
testbed with ``preset="testbed"`` once its trained weights are present), on CPU in minutes.

sensitivity -> quantize (Q-ARVD PTQ, plus a few QAT steps when available) -> generate full-precision
and quantized videos with the same seeds -> evaluate. Writes ``OUT/report.json``::

    {"sensitivity": [s_0, ..., s_{K-1}], "metrics": {"ptq": {...}, "qat": {...}}, "steps": {...}, ...}

plus each step's own outputs (``OUT/sensitivity``, ``OUT/ptq``, ``OUT/videos_fp``, ``OUT/videos_ptq``,
``OUT/eval_ptq`` with report.md and plots, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from qarvd_jax.pipeline.text_to_video import GenerateConfig, TextToVideo
from qarvd_jax.quant.recipe import QARVDConfig
from qarvd_jax.workflow import build_stack, run_quantize_qarvd, run_sensitivity, write_json

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``preset``: ``"tiny"`` (random weights, default) or ``"testbed"`` (trained weights
    from :mod:`qarvd_jax.testbed`: real videos and a task score); geometry ``None``: the preset's (tiny 6
    latent frames at 32 x 32, testbed 21 at 32 x 32)."""

    preset: str = "tiny"
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_prompts: int = 4
    sensitivity_prompts: int = 3
    recon_iters: int = 200
    qat_steps: int = 4
    seed: int = 0


def _generate(stack, dit, prompts, out_dir: str, seed: int) -> None:
    t2v = TextToVideo(dit, stack.t2v.vae, stack.t2v.encode_prompts, stack.t2v.pipeline.config,
                      vae_config=stack.t2v.vae_config, model_name=stack.t2v.model_name)
    g = stack.gen
    t2v.run(prompts, out_dir, seed=seed, num_frames=g.num_frames, height=g.height, width=g.width)


def run_demo(out_dir: str, cfg: DemoConfig = DemoConfig()) -> dict:
    """Run the four steps; returns (and writes to ``OUT/report.json``) the combined report."""
    from qarvd_jax.cli._common import builtin_prompts
    from qarvd_jax.eval.report import evaluate_folders
    from qarvd_jax.quant.checkpoint import load_quantized_model

    os.makedirs(out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.preset not in ("testbed", "tiny"):
        raise ValueError(f"demo preset {cfg.preset!r}: the demo runs a built-in model, 'testbed' or 'tiny'")
    small = cfg.preset == "tiny"  # the random tiny model: 6 latent frames at 32 x 32 unless told otherwise
    gen = GenerateConfig(seed=cfg.seed, num_frames=cfg.num_frames or (6 if small else None),
                         height=cfg.height or (32 if small else None), width=cfg.width or (32 if small else None),
                         preset=cfg.preset)
    stack = build_stack(gen, out_dir)
    prompts = builtin_prompts(cfg.preset)[: max(cfg.num_prompts, cfg.sensitivity_prompts + 1)]
    qcfg = QARVDConfig(iters=cfg.recon_iters)

    def lap(name):
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        print(f"[demo] {name} done in {timings[name]} s")

    sens = run_sensitivity(stack, qcfg, prompts, num_prompts=cfg.sensitivity_prompts, seed=cfg.seed,
                           out_dir=os.path.join(out_dir, "sensitivity"))
    lap("1 sensitivity")
    ptq = run_quantize_qarvd(stack, qcfg, prompts[:1], seed=cfg.seed, out_dir=os.path.join(out_dir, "ptq"),
                             sensitivity=sens["sensitivity"])
    lap("2 quantize (Q-ARVD PTQ)")
    variants = {"ptq": ptq}
    if cfg.qat_steps:
        variants["qat"] = _run_qat(stack, prompts, os.path.join(out_dir, "sensitivity", "sensitivity.json"),
                                   os.path.join(out_dir, "qat"), cfg)
        lap(f"2b quantize (QAT, {cfg.qat_steps} steps)")
    eval_prompts = prompts[: cfg.num_prompts]
    fp_dir = os.path.join(out_dir, "videos_fp")
    _generate(stack, stack.dit, eval_prompts, fp_dir, cfg.seed + 5000)
    for name, ckpt in variants.items():
        model, _ = load_quantized_model(ckpt)
        _generate(stack, model, eval_prompts, os.path.join(out_dir, f"videos_{name}"), cfg.seed + 5000)
    lap("3 generate (FP and quantized, same seeds)")
    metrics = {}
    for name in variants:
        rep = evaluate_folders(fp_dir, os.path.join(out_dir, f"videos_{name}"), os.path.join(out_dir, f"eval_{name}"),
                               progress=False)
        metrics[name] = rep["aggregate"]
    lap("4 evaluate")
    report = {"sensitivity": sens["sensitivity"], "metrics": metrics, "steps": timings,
              "checkpoints": variants, "settings": dataclasses.asdict(cfg),
              "reports": {n: os.path.join(out_dir, f"eval_{n}", "report.md") for n in variants}}
    write_json(os.path.join(out_dir, "report.json"), report)
    return report


def _run_qat(stack, prompts, sensitivity_json: str, out_dir: str, cfg: DemoConfig) -> str:
    """A few QAT steps (``configs/qat_tiny.yaml`` settings, ``cfg.qat_steps`` steps, on every local device:
    the default mesh puts them all on the ``data`` axis, so the batch is a multiple of the device count)."""
    import jax

    from qarvd_jax.train.qat import QATConfig, run_qat

    n = jax.device_count()
    qat_cfg = QATConfig(steps=cfg.qat_steps, seed=cfg.seed, warmup_steps=1, lr=1e-2, batch_size=n * -(-4 // n),
                        checkpoint_every=cfg.qat_steps, hist_bins=4096)
    result = run_qat(stack, qat_cfg, prompts, out_dir=out_dir, sensitivity=sensitivity_json)
    return result.quantized
