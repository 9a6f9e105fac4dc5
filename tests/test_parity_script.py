"""scripts/parity.py on a configuration it has never seen (written here in the fixture format)."""

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.state_dict_io import write_state_dict
from qarvd_jax.cli import main as cli
from qarvd_jax.models.wan import params as wan_params
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.loading import model_params
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.models.wan.parity import verify_fixture
from qarvd_jax.pipeline import scheduler as sch
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig
from extended import extended


def _write_fixture(d, *, b=2, f=8, h=4, w=6):
    """A fixture with batch 2, non-square latents, odd head count, local window + sink, another step
    list / shift and context_noise != 0, produced by this port (so the script's generality is tested;
    faithfulness to PyTorch is tested by the real fixtures)."""
    cfg = WanDiTConfig.tiny(dim=48, num_heads=3, ffn_dim=80, text_dim=24, text_len=10, num_frame_per_block=2,
                            local_attn_size=4, sink_size=1)
    sampler = InferenceConfig(denoising_step_list=(1000, 600, 200), timestep_shift=3.0, context_noise=25.0)
    model = CausalWanModel(cfg, rngs=nnx.Rngs(3))
    state = wan_params.flax_to_torch(model_params(model), cfg, prefix="model.")
    write_state_dict(state, d / "checkpoint.safetensors")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((b, 7, 24)).astype(np.float32)
    tables = sampler.tables()
    clean = rng.standard_normal((b, f, 16, h, w)).astype(np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    idx = np.repeat(rng.integers(0, 1000, (b, f // 2)), 2, axis=1)
    t = tables.timesteps[idx]
    noisy = np.asarray(sch.add_noise(clean, noise, t, tables))
    flow = np.asarray(model(jnp.asarray(noisy), jnp.asarray(t), jnp.asarray(emb)))
    np.savez(d / "forward.npz", prompt_embeds=emb, clean_latent=clean, noise=noise, timestep=t, noisy_latent=noisy,
             flow_pred=flow, pred_x0=np.asarray(sch.flow_to_x0(flow, noisy, t, tables)))
    pipe = CausalInferencePipeline(model, sampler)
    s = len(sampler.denoising_step_list)
    renoise = rng.standard_normal((f // 2, s - 1, b, 2, 16, h, w)).astype(np.float32)
    recs = list(pipe.stream(jnp.asarray(noise), jnp.asarray(emb), renoise=renoise))
    cache = recs[-1].extras["cache"]
    np.savez(d / "kv_inference.npz", noise=noise, prompt_embeds=emb, renoise_noise=renoise,
             output_latents=np.concatenate([np.asarray(r.output) for r in recs], 1),
             step_x0_pred=np.stack([np.asarray(r.x0s[:s]) for r in recs]),
             context_flow_pred=np.stack([np.asarray(r.flows[s]) for r in recs]),
             final_kv_k=np.stack([np.asarray(k) for k in cache.k]),
             final_kv_local_end_index=np.full((2, b), int(cache.local_end)),
             denoising_timesteps=sampler.timesteps())
    m = cfg
    conf = {"model": {"dim": m.dim, "ffn_dim": m.ffn_dim, "num_heads": m.num_heads, "head_dim": m.head_dim,
                      "num_layers": m.num_layers, "in_dim": 16, "out_dim": 16, "text_dim": 24, "text_len": 10,
                      "freq_dim": 256, "patch_size": [1, 2, 2], "eps": 1e-6, "local_attn_size": 4, "sink_size": 1},
            "video": {"num_frame_per_block": 2},
            "inference": {"denoising_step_list": [1000, 600, 200], "warp_denoising_step": True,
                          "timestep_shift": 3.0, "context_noise": 25},
            "checkpoint": {"file": "checkpoint.safetensors"}}
    (d / "config.json").write_text(json.dumps(conf))


@extended("scripts/parity.py end to end on an unseen configuration (~1 min on one core)")
def test_parity_on_an_unseen_configuration_and_it_can_fail(tmp_path, capsys):
    _write_fixture(tmp_path)
    reports = verify_fixture(str(tmp_path))
    assert all(r.passed for r in reports), [(r.name, r.max_abs, r.note) for r in reports if not r.passed]
    assert {"kv/final_kv_k", "kv/output_latents", "forward/flow_pred"} <= {r.name for r in reports}
    # a corrupted golden must make the script exit 1 and name the array
    with np.load(tmp_path / "kv_inference.npz") as k:
        arrays = dict(k)
    arrays["output_latents"] = arrays["output_latents"] + 5e-4
    np.savez(tmp_path / "kv_inference.npz", **arrays)
    assert cli(["parity", str(tmp_path)]) == 1
    assert "FAILED: kv/output_latents" in capsys.readouterr().out
