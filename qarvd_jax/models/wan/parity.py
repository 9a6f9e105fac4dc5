"""Verify the DiT port against a golden fixture folder produced from the original PyTorch code.

Folder format (see ``tests/fixtures/selfforcing_tiny/README.md``): ``config.json`` (``model``,
``video``, ``inference``, ``checkpoint`` sections), ``checkpoint.pt``, ``forward.npz`` (training
path) and ``kv_inference.npz`` (chunked KV-cache inference with recorded re-noising draws). Any
configuration works: other dims/heads, batch > 1, non-square latents, local window and sink,
other step lists, shifts and context_noise. Arrays missing from a fixture are skipped.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.state_dict_io import read_state_dict
from convert.wan_dit import SourceLayout, export_torch, load_orbax, read_dit_checkpoint, save_orbax
from qarvd_jax.models.wan import params as wan_params
from qarvd_jax.models.wan.attention import block_causal_mask
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.loading import model_from_params
from qarvd_jax.pipeline import scheduler as sch
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig
from qarvd_jax.utils.parity import ArrayReport, compare

__all__ = ["verify_fixture", "fixture_configs"]

ATOL, RTOL = 1e-4, 0.0  # "max error <= 1e-4" in float32


def fixture_configs(cfg_json: dict) -> tuple[WanDiTConfig, InferenceConfig]:
    """Model and sampler configs described by a fixture's ``config.json`` (float32, highest precision)."""
    model_cfg = WanDiTConfig.from_fixture_json(cfg_json, matmul_precision="highest")
    inf = cfg_json.get("inference", {})
    if inf.get("independent_first_frame", False):
        raise NotImplementedError("fixtures with independent_first_frame=true are not supported")
    sampler = InferenceConfig(
        denoising_step_list=tuple(inf.get("denoising_step_list", (1000, 750, 500, 250))),
        warp_denoising_step=inf.get("warp_denoising_step", True),
        timestep_shift=inf.get("timestep_shift", 5.0),
        num_train_timesteps=inf.get("num_train_timesteps", 1000),
        context_noise=float(inf.get("context_noise", 0.0)))
    return model_cfg, sampler


def _roundtrip_reports(ckpt_path: str, cfg: WanDiTConfig, prefer: str | None) -> list[ArrayReport]:
    """PyTorch -> Orbax -> PyTorch (.safetensors) must reproduce every tensor bit for bit."""
    state, layout = read_dit_checkpoint(ckpt_path, prefer=prefer)
    with tempfile.TemporaryDirectory() as tmp:
        save_orbax(os.path.join(tmp, "orbax"), wan_params.torch_to_flax(state, cfg, source=ckpt_path), cfg, layout)
        params, cfg2, meta = load_orbax(os.path.join(tmp, "orbax"))
        out = os.path.join(tmp, "back.safetensors")
        export_torch(params, cfg2, out, SourceLayout(**meta["source_layout"]))
        back = read_state_dict(out)
    prefix = layout.key_prefix
    bad, worst = [], 0.0
    for k, v in state.items():
        w = back.get(prefix + k)
        same = (w is not None and w.shape == v.shape and w.dtype == v.dtype
                and np.array_equal(np.asarray(w).view(np.uint8), np.ascontiguousarray(v).view(np.uint8)))
        if not same:
            bad.append(k)
            if w is not None and w.shape == v.shape:
                worst = max(worst, float(np.abs(np.asarray(w, np.float64) - np.asarray(v, np.float64)).max()))
    extra = sorted(set(back) - {prefix + k for k in state})
    ok = not bad and not extra
    note = f"{len(state)} tensors bit-exact" if ok else f"differs: {bad[:4]} extra: {extra[:4]}"
    return [ArrayReport("roundtrip pt->orbax->safetensors", (len(state),), worst if bad else 0.0, 0.0, 0.0, 0.0,
                        0.0, ok, note)]


@nnx.jit
def _forward_with_taps(model, x, t, context):
    taps: dict = {}
    flow = model(x, t, context, taps=taps)
    return flow, taps


def _forward_reports(model, sampler: InferenceConfig, cfg: WanDiTConfig, f) -> list[ArrayReport]:
    tables = sampler.tables()
    reps = []
    x = jnp.asarray(f["noisy_latent"])
    t = jnp.asarray(f["timestep"])
    if "clean_latent" in f and "noise" in f:
        reps.append(compare("forward/noisy_latent (add_noise)", sch.add_noise(jnp.asarray(f["clean_latent"]),
                            jnp.asarray(f["noise"]), t, tables), f["noisy_latent"], atol=ATOL, rtol=RTOL))
    flow, taps = _forward_with_taps(model, x, t, jnp.asarray(f["prompt_embeds"]))
    reps.append(compare("forward/flow_pred", flow, f["flow_pred"], atol=ATOL, rtol=RTOL))
    if "pred_x0" in f:
        reps.append(compare("forward/pred_x0", sch.flow_to_x0(flow, x, t, tables), f["pred_x0"], atol=ATOL, rtol=RTOL))
    if "attn_mask" in f:
        _, nf, _, h, w = x.shape
        mask = block_causal_mask(nf // cfg.patch_size[0], cfg.frame_seq_length(h, w), cfg.num_frame_per_block,
                                 cfg.local_attn_size)
        reps.append(compare("forward/attn_mask", mask, f["attn_mask"], atol=0, rtol=0))
    tap_names = {"act_patch_tokens": "patch_tokens", "act_time_embedding": "time_embedding",
                 "act_time_projection": "time_projection", "act_text_embedding": "text_embedding",
                 "act_head_out": "head_out"}
    for key, tap in tap_names.items():
        if key in f:
            reps.append(compare(f"forward/{key}", taps[tap], f[key], atol=ATOL, rtol=RTOL))
    if "act_block_out" in f:
        reps.append(compare("forward/act_block_out", np.stack([np.asarray(a) for a in taps["block_out"]]),
                            f["act_block_out"], atol=ATOL, rtol=RTOL))
    return reps


def _kv_reports(model, sampler: InferenceConfig, k) -> list[ArrayReport]:
    tables = sampler.tables()
    reps = []
    for name, mine in (("scheduler_timesteps", tables.timesteps), ("scheduler_sigmas", tables.sigmas),
                       ("denoising_timesteps", sampler.timesteps())):
        if name in k:
            reps.append(compare(f"kv/{name}", mine, k[name], atol=ATOL, rtol=RTOL))
    pipe = CausalInferencePipeline(model, sampler)
    recs = list(pipe.stream(k["noise"], k["prompt_embeds"], renoise=k["renoise_noise"]))
    s = pipe.num_denoising_steps
    stack = lambda field, sl: np.stack([np.asarray(getattr(r, field)[sl]) for r in recs])  # noqa: E731
    checks = {
        "step_noisy_input": stack("inputs", slice(0, s)), "step_flow_pred": stack("flows", slice(0, s)),
        "step_x0_pred": stack("x0s", slice(0, s)), "context_input": stack("inputs", s),
        "context_flow_pred": stack("flows", s),
        "output_latents": np.concatenate([np.asarray(r.output) for r in recs], axis=1),
    }
    cache = recs[-1].extras["cache"]
    checks["final_kv_k"] = np.stack([np.asarray(a) for a in cache.k])
    checks["final_kv_v"] = np.stack([np.asarray(a) for a in cache.v])
    for name, mine in checks.items():
        if name in k:
            reps.append(compare(f"kv/{name}", mine, k[name], atol=ATOL, rtol=RTOL))
    for name, mine in (("final_kv_global_end_index", cache.global_end), ("final_kv_local_end_index", cache.local_end)):
        if name in k:
            reps.append(compare(f"kv/{name}", np.broadcast_to(np.asarray(mine), k[name].shape), k[name], atol=0, rtol=0))
    if "step_timestep" in k:
        reps.append(compare("kv/step_timestep", np.broadcast_to(sampler.timesteps(), k["step_timestep"].shape),
                            k["step_timestep"], atol=ATOL, rtol=RTOL))
    if "context_timestep" in k:
        reps.append(compare("kv/context_timestep", np.full(k["context_timestep"].shape, sampler.context_noise),
                            k["context_timestep"], atol=0, rtol=0))
    if "chunk_current_start" in k:
        b, f, c, h, w = k["noise"].shape
        fsl = model.config.frame_seq_length(h, w)
        fc = model.config.num_frame_per_block
        reps.append(compare("kv/chunk_current_start", np.arange(f // fc) * fc * fsl, k["chunk_current_start"],
                            atol=0, rtol=0))
    return reps


def verify_fixture(fixture_dir: str) -> list[ArrayReport]:
    """Run every check the folder supports; returns one :class:`ArrayReport` per array."""
    with open(os.path.join(fixture_dir, "config.json")) as fh:
        cfg_json = json.load(fh)
    cfg, sampler = fixture_configs(cfg_json)
    ck = cfg_json.get("checkpoint", {})
    ckpt_path = os.path.join(fixture_dir, ck.get("file", "checkpoint.pt"))
    prefer = ck.get("golden_weights_key")
    reports = _roundtrip_reports(ckpt_path, cfg, prefer)
    state, _ = read_dit_checkpoint(ckpt_path, prefer=prefer)
    model = model_from_params(wan_params.torch_to_flax(state, cfg, source=ckpt_path), cfg)
    fwd = os.path.join(fixture_dir, "forward.npz")
    if os.path.exists(fwd):
        with np.load(fwd) as f:
            reports += _forward_reports(model, sampler, cfg, dict(f))
    kv = os.path.join(fixture_dir, "kv_inference.npz")
    if os.path.exists(kv):
        with np.load(kv) as k:
            reports += _kv_reports(model, sampler, dict(k))
    return reports
