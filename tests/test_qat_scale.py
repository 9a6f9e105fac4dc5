"""QAT at scale: calibration memory budget, checks before heavy work, resume refusals, crash-safe
checkpoints and the memory planner (tiny model on the 8 virtual CPU devices of conftest)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
from qarvd_jax.quant.calibration import calibrate_rtn, plan_calibration, prepare_quantized_model
from qarvd_jax.quant.qlinear import QuantState
from qarvd_jax.quant.recipe import QARVDConfig
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.sharding import make_mesh

LATENT = (6, 16, 4, 4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _calibrated(budget_gb):
    model = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    cfg = QARVDConfig(hist_bins=512, align=8, reconstruct=False, calib_memory_gb=budget_gb)
    prepare_quantized_model(model, cfg)
    emb = np.random.default_rng(0).standard_normal((1, 16, 32)).astype(np.float32)
    groups = calibrate_rtn(model, CausalInferencePipeline(model), emb, [0], LATENT, cfg)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, QuantState))), groups, model, cfg


def test_calibration_budget_groups_layers_bit_identically():
    ref, groups_all, model, cfg = _calibrated(1000.0)
    assert len(groups_all) == 1
    kw = dict(videos=1, calls_per_video=2 * 5, tokens_per_call=3 * 4, frames_per_call=3)
    plan = plan_calibration(model, cfg, **kw)
    sizes = plan.total_bytes
    budget_gb = sizes / 5 / 1024 ** 3  # about five groups, every layer still fits whole
    got, groups, _, _ = _calibrated(budget_gb)
    assert len(groups) >= 4 and sum(len(g) for g in groups) == len(groups_all[0])
    small = plan_calibration(model, cfg.__class__(**{**cfg.__dict__, "calib_memory_gb": budget_gb}), **kw)
    assert small.max_tokens is None and small.peak_bytes <= small.budget_bytes < sizes
    jax.tree.map(np.testing.assert_array_equal, got, ref)  # grouping is exact
    # a budget below the largest layer subsamples tokens so that it fits
    tiny = plan_calibration(model, cfg.__class__(**{**cfg.__dict__, "calib_memory_gb": 30000 / 1024 ** 3}), **kw)
    assert tiny.max_tokens == 30000 // (10 * 128 * 4) and tiny.peak_bytes <= tiny.budget_bytes  # ffn.2: 128 inputs
    # the QAT config passes the budget to its recipe
    assert QATConfig(calib_memory_gb=3.0, calib_tokens=7).recipe().calib_memory_gb == 3.0


class _Stack:
    def __init__(self):
        self.dit = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
        self.latent_shape = LATENT


def test_mesh_errors_come_before_calibration(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("calibration (or model preparation) ran before the mesh check")

    monkeypatch.setattr(qat_mod, "prepare_student", boom)
    monkeypatch.setattr(qat_mod, "calibrate_student", boom)
    stack = _Stack()
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the 8 batch shards.*use batch_size=8"):
        qat_mod.run_qat(stack, QATConfig(batch_size=6), ["a"], out_dir=str(tmp_path / "a"),
                        mesh=make_mesh("data=2,fsdp=4"))
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by tensor=8.*\[1, 2, 4\]"):
        qat_mod.run_qat(stack, QATConfig(batch_size=1), ["a"], out_dir=str(tmp_path / "b"), mesh=make_mesh("tensor=8"))
    assert not (tmp_path / "a" / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"URL scheme ftp:// is not supported"):
        qat_mod.run_qat(stack, QATConfig(batch_size=8), ["a"], out_dir="ftp://host/run", mesh=make_mesh("fsdp=8"))
    assert not os.path.exists("ftp:")


def test_resume_refuses_other_sensitivity_or_process_count():
    cfg = QATConfig()
    meta = {"config": cfg.to_dict(), "process_count": 1, "chunk_weights": [0.8, 1.2]}
    qat_mod._check_resume(meta, cfg, "ck", np.asarray([0.8, 1.2], np.float32))  # same: fine
    with pytest.raises(ValueError, match="chunk weights .*--sensitivity"):
        qat_mod._check_resume(meta, cfg, "ck", np.asarray([1.0, 1.0], np.float32))
    with pytest.raises(ValueError, match="chunk weights"):
        qat_mod._check_resume(meta, cfg, "ck", None)
    with pytest.raises(ValueError, match="written by 3 processes, this run has 1"):
        qat_mod._check_resume({**meta, "process_count": 3}, cfg, "ck", np.asarray([0.8, 1.2], np.float32))
    with pytest.raises(ValueError, match="--coordinator, --num-processes and --process-id go together"):
        qat_mod.initialize_distributed(coordinator="127.0.0.1:1")


_SAVER = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from qarvd_jax.train.state import QATCheckpointer, TrainState
ck = QATCheckpointer(sys.argv[1], async_save=False)
def state(v, n):
    return TrainState(step=jnp.int32(v), trainable=nnx.State({"w": jnp.full((n,), float(v))}), opt_state=(),
                      rng=jnp.zeros((2,), jnp.uint32))
ck.save(2, state(2, 8), nnx.State({"f": jnp.ones(3)}), {"step": 2})
ck.wait()
print("saved 2", flush=True)
print("saving 4", flush=True)
ck.save(4, state(4, 60_000_000), nnx.State({"f": jnp.ones(3)}), {"step": 4})
ck.wait()
print("saved 4", flush=True)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    from qarvd_jax.train.state import QATCheckpointer, TrainState

    d = str(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, "-c", _SAVER, d], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
    seen = None
    try:
        for line in p.stdout:
            if line.startswith("saving 4"):
                # Kill as soon as the step-4 save has begun writing (its temporary folder appears), not after a
                # fixed sleep: on an idle core the 240 MB save can finish within a fixed delay.
                deadline = time.monotonic() + 10
                while seen is None and time.monotonic() < deadline:
                    seen = next((n for n in os.listdir(d) if n.startswith("4")), None)
                    time.sleep(0.0005)
                p.send_signal(signal.SIGKILL)
                break
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    if seen == "4":
        pytest.skip("the step-4 save committed before the kill landed (no partial save to test)")
    ck = QATCheckpointer(d, async_save=False)
    assert ck.latest_step() == 2, (seen, sorted(os.listdir(d)))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=nnx.State(
        {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}), opt_state=(), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state, frozen, meta = ck.restore(2, abstract, nnx.State({"f": jax.ShapeDtypeStruct((3,), jnp.float32)}))
    assert int(state.step) == 2 and meta["step"] == 2 and float(state.trainable["w"][0]) == 2.0
    ck.close()


@pytest.mark.slow
def test_planner_figures_equal_memory_analysis(tmp_path):
    """plan_memory's JSON (abstract inputs) == memory_analysis of the same step compiled from real arrays."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import plan_memory

    out = tmp_path / "plan.json"
    assert plan_memory.main(["--preset", "tiny", "--mesh", "fsdp=8", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert set(plan) == {"qat", "calibration"}
    assert plan["qat"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["qat"]["videos_per_device"] == 1
    pdb = plan["qat"]["per_device_bytes"]
    assert pdb["total"] == pdb["arguments"] + pdb["temp"] and pdb["temp"] > 0
    assert set(plan["calibration"]) >= {"host_bytes", "device_bytes"}
    # the same step built from a real (random-weight) student with concrete sharded arrays
    args = plan_memory._parse(["--preset", "tiny", "--mesh", "fsdp=8"])
    _, _, cfg, mesh, latent_shape, sampler, mcfg = plan_memory.build(args)
    model = CausalWanModel(mcfg, rngs=nnx.Rngs(0))
    from qarvd_jax.quant.qlinear import quantize_model

    quantize_model(model, cfg.recipe().rules(), outliers={})
    real = qat_mod.QATTrainer(model, cfg, mesh, latent_shape, sampler)
    b = cfg.batch_size
    batch = {"embeds": jax.device_put(np.zeros((b, mcfg.text_len, mcfg.text_dim), np.float32),
                                      real.batch_sh["embeds"]),
             "prompt_id": jax.device_put(np.arange(b, dtype=np.int32), real.batch_sh["prompt_id"])}
    ma = real.step_fn.lower(real.init_state(), real.frozen, real.teacher, batch).compile().memory_analysis()
    assert pdb["arguments"] == ma.argument_size_in_bytes
    assert pdb["temp"] == ma.temp_size_in_bytes


def test_planner_method_qvgen_tiny(tmp_path):
    """``plan_memory --method qvgen`` compiles QVGen's step (full fine-tune student with Φ, separate FP teacher)
    from abstract inputs: method Config overrides reach the hooks, and the compiled argument bytes match the
    per-device shard bytes of the step's abstract arguments."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import plan_memory

    out = tmp_path / "plan.json"
    argv = ["--preset", "tiny", "--mesh", "fsdp=8", "--method", "qvgen", "rank=4", "stage_steps=1"]
    assert plan_memory.main([*argv, "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    q = plan["qat"]
    assert set(plan) == {"qat"} and q["method"] == "qvgen" and q["method_config"]["rank"] == 4
    pdb = q["per_device_bytes"]
    assert pdb["total"] == pdb["arguments"] + pdb["temp"] and pdb["temp"] > 0
    assert q["analytic_bytes"]["teacher_weights_sharded"] > 0
    trainer = plan_memory.build(plan_memory._parse(argv))[0]
    assert trainer.hooks is not None and any("lr_down" in str(p) for p, _ in
                                             jax.tree_util.tree_leaves_with_path(trainer._host_trainable))
    shard_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(trainer.abstract_step_args()))
    # XLA drops the few unused leaves (step-context indices the step overwrites): within 1 %
    assert 0.99 * shard_bytes <= pdb["arguments"] <= shard_bytes
