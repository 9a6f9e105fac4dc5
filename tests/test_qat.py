"""Quantization-aware training (qarvd_jax.train) on the tiny model over 8 virtual CPU devices.

Tiny geometry (6 latent frames = 2 chunks, 32x32 pixels -> 4x4 latents). To keep the file fast the
runs share one compiled train step (``jit_cache``): the sharded-step test, the uninterrupted 6-step
run and the 4-step + resumed runs (through the CLI) all use the same config and mesh data=2,fsdp=4.
The stack is built without the VAE (training never decodes) and with deterministic prompt
embeddings standing in for the cached text encoder.
"""

from __future__ import annotations

import hashlib
import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.models.wan_vae import WanVAEConfig
from qarvd_jax.pipeline.text_to_video import GenerateConfig, TextToVideo
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import QATConfig, load_qat_config
from qarvd_jax.train.data import PromptDataset, PromptSource, count_prompts, host_range, read_prompts_range
from qarvd_jax.train.sharding import (logical_axes, make_mesh, parse_mesh_spec, partition_spec, rules_table)
from qarvd_jax.workflow import DEMO_PROMPTS, Stack

MESH = "data=2,fsdp=4"
OVERRIDES = ["batch_size=8", "compute_dtype=float32", "hist_bins=2048", "align=8", "warmup_steps=1",
             "lr_schedule_steps=6", "checkpoint_every=2", "resample_noise=false", "async_checkpointing=false",
             f"mesh={MESH}"]
JIT_CACHE: dict = {}  # one compiled step for every run of this file with the OVERRIDES config


def _embed(prompts, text_len=16, text_dim=32):
    """Deterministic stand-in for the cached text encoder: [n, text_len, text_dim] per prompt hash."""
    out = []
    for p in prompts:
        seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
        out.append(np.random.default_rng(seed).standard_normal((text_len, text_dim)).astype(np.float32))
    return np.stack(out)


@pytest.fixture(scope="module")
def stack():
    dit = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    t2v = TextToVideo(dit, None, _embed, vae_config=WanVAEConfig.tiny())  # QAT never decodes
    return Stack(t2v, GenerateConfig(num_frames=6, height=32, width=32), t2v.latent_shape(6, 32, 32))


@pytest.fixture(scope="module")
def cfg():
    return load_qat_config(None, OVERRIDES)


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory):
    path = tmp_path_factory.mktemp("sens") / "sensitivity.json"
    path.write_text(json.dumps({"sensitivity": [0.4, 0.6]}))
    return str(path)


@pytest.fixture(scope="module")
def calibrated(stack, cfg, sensitivity):
    omega, _ = qat_mod.load_chunk_weights(sensitivity, 2)
    model, _ = qat_mod.prepare_student(stack.dit, cfg)
    qat_mod.calibrate_student(model, cfg, stack.t2v.pipeline.config, stack.embeds(DEMO_PROMPTS[:1]),
                              stack.latent_shape, omega)
    return model, omega


def sharded_and_single_step(stack, cfg, calibrated, mesh_spec: str, jit_cache=None):
    """One QAT step of the calibrated model on ``mesh_spec`` and on one device, from the same batch of 8:
    ``(sharded_trainer, single_trainer, (sharded_state, sharded_metrics), (single_state, single_metrics))``."""
    model, omega = calibrated
    sharded = qat_mod.QATTrainer(model, cfg, make_mesh(mesh_spec), stack.latent_shape, stack.t2v.pipeline.config,
                                 omega, jit_cache=jit_cache)
    single = qat_mod.QATTrainer(model, cfg, make_mesh("", jax.devices()[:1]), stack.latent_shape,
                                stack.t2v.pipeline.config, omega)
    data = PromptDataset(np.arange(8), stack.embeds(DEMO_PROMPTS), global_batch=8, seed=0)
    multi = sharded.step(sharded.init_state(), data.global_batch_arrays(0, sharded.batch_sh))
    return sharded, single, multi, single.step(single.init_state(), data.global_batch_arrays(0, single.batch_sh))


def _host(tree):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


# --------------------------------------------------------------------------------------- cheap checks


def test_mesh_spec_and_errors():
    assert parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh_spec("") == {}
    for bad, msg in [("data2", "not axis=size"), ("model=2", "unknown axis"), ("data=x", "positive integer"),
                     ("data=2,data=4", "given twice"), ("data=0", ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad)
    mesh = make_mesh(MESH)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh("").shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="6 devices but 8 are available"):
        make_mesh("data=2,fsdp=3")


def test_config_yaml_overrides_and_errors(tmp_path):
    c = load_qat_config("configs/qat_tiny.yaml", ["lr=1e-3", "steps=7", "train_weights=true"])
    assert (c.lr, c.steps, c.train_weights, c.compute_dtype) == (1e-3, 7, True, "bfloat16")
    assert c.logical_axis_rules[0] == ("batch", "data", "fsdp") and c.schedule_steps == 50
    with pytest.raises(ValueError, match="unknown QATConfig fields"):
        load_qat_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size"):
        load_qat_config(None, ["batch_size=0"])
    with pytest.raises(FileNotFoundError, match="sensitivity file not found"):
        qat_mod.load_chunk_weights(str(tmp_path / "nope.json"), 2)
    (tmp_path / "s.json").write_text(json.dumps({"sensitivity": [1, 2, 3]}))
    with pytest.raises(ValueError, match="3 chunk sensitivities but the video has 2 chunks"):
        qat_mod.load_chunk_weights(str(tmp_path / "s.json"), 2)
    with pytest.raises(ValueError, match="unknown logical axis"):
        rules_table([("vocab", "tensor")])


def test_partition_spec_rules():
    mesh = make_mesh("fsdp=4,tensor=2")
    rules = rules_table(QATConfig().logical_axis_rules)

    def spec(names, shape):
        path = tuple(jax.tree_util.DictKey(n) for n in names)
        return partition_spec(logical_axes(path, shape), shape, rules, mesh)

    assert spec(("blocks", 0, "ffn", 0, "kernel"), (64, 128)) == P("fsdp", "tensor")
    assert spec(("head", "head", "kernel"), (64, 7)) == P("fsdp")  # 7 outputs not divisible by tensor=2
    assert spec(("x", "kernel"), (6, 64)) == P(None, "tensor")  # 6 not divisible by fsdp=4: replicated
    assert spec(("x", "kernel"), (6, 7)) == P()
    assert spec(("x", "w_scale"), (2, 64)) == P(None, "tensor")
    assert spec(("x", "bias"), (64,)) == P("tensor")
    assert spec(("blocks", 0, "norm3", "bias"), (64,)) == P()  # embed: replicated
    assert spec(("blocks", 0, "modulation"), (1, 6, 64)) == P()
    assert spec(("x", "a_scale"), (2,)) == P()
    # Megatron row-parallel o / ffn.2: input features on tensor, outputs on fsdp
    assert spec(("blocks", 0, "self_attn", "o", "kernel"), (64, 64)) == P("tensor", "fsdp")
    assert spec(("blocks", 0, "cross_attn", "o", "w_scale"), (1, 64)) == P(None, "fsdp")
    assert spec(("blocks", 0, "ffn", "layers", 2, "kernel"), (128, 64)) == P("tensor", "fsdp")
    assert spec(("blocks", 0, "ffn", "layers", 0, "kernel"), (64, 128)) == P("fsdp", "tensor")
    old_rules = rules_table([("batch", "data", "fsdp"), ("weight_in", "fsdp"), ("weight_out", "tensor")])
    path = tuple(jax.tree_util.DictKey(n) for n in ("blocks", 0, "self_attn", "o", "kernel"))
    assert partition_spec(logical_axes(path, (64, 64)), (64, 64), old_rules, mesh) == P("fsdp", "tensor")


def test_data_slices_per_process(tmp_path):
    prompts = [f"prompt {i}" for i in range(10)]
    seen_by = {}

    def embed(ps):
        seen_by.setdefault("calls", []).append(list(ps))
        return _embed(ps)

    src = PromptSource(prompts=tuple(prompts))
    hosts = [PromptDataset.from_source(src, embed, global_batch=4, seed=3, process_index=p, process_count=2)
             for p in range(2)]
    assert [list(h.ids) for h in hosts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert seen_by["calls"] == [prompts[:5], prompts[5:]]  # each process embeds only its own slice
    for h in hosts:
        assert h.local_batch == 2
        epoch = np.concatenate([h.local_batch_arrays(s)["prompt_id"] for s in range(5)])[:5]
        assert sorted(epoch) == sorted(h.ids)  # every prompt once per epoch
        b = h.local_batch_arrays(3)
        np.testing.assert_array_equal(b["prompt_id"], h.local_batch_arrays(3)["prompt_id"])  # deterministic
        np.testing.assert_array_equal(b["embeds"], _embed([prompts[i] for i in b["prompt_id"]]))
        assert h.data_position(3) == 12
    step = [np.concatenate([h.local_batch_arrays(s)["prompt_id"] for h in hosts]) for s in range(2)]
    assert all(len(set(s[:2]) & set(s[2:])) == 0 for s in step)  # hosts never share prompts
    # a single process sees the whole source; the global batch is sharded over (data, fsdp)
    one = PromptDataset.from_source(src, _embed, global_batch=8, seed=3, process_index=0, process_count=1)
    from qarvd_jax.train.sharding import batch_sharding

    mesh = make_mesh(MESH)
    rules = rules_table(QATConfig().logical_axis_rules)
    shard = {"embeds": batch_sharding(mesh, rules, 3), "prompt_id": batch_sharding(mesh, rules, 1)}
    g = one.global_batch_arrays(0, shard)
    assert g["embeds"].shape == (8, 16, 32) and g["embeds"].sharding.spec == P(("data", "fsdp"), None, None)
    np.testing.assert_array_equal(np.asarray(g["prompt_id"]), one.local_batch_arrays(0)["prompt_id"])
    # lazy mode: the batch's embeddings are looked up per step (the on-disk cache), same batches
    calls = []
    lazy = PromptDataset.from_source(src, lambda ps: calls.append(list(ps)) or _embed(ps), global_batch=4, seed=3,
                                     process_index=1, process_count=2, preload=False, warm_chunk=2)
    assert lazy.embeds is None and calls == [prompts[5:7], prompts[7:9], prompts[9:]]  # cache warmed up front
    lb, hb = lazy.local_batch_arrays(3), hosts[1].local_batch_arrays(3)
    np.testing.assert_array_equal(lb["prompt_id"], hb["prompt_id"])
    np.testing.assert_array_equal(lb["embeds"], hb["embeds"])
    assert calls[-1] == [prompts[i] for i in hb["prompt_id"]]
    assert host_range(10, 1, 3) == (3, 6)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        PromptDataset(np.arange(4), _embed(prompts[:4]), global_batch=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        host_range(3, 0, 4)
    (tmp_path / "p.txt").write_text("a\n\nb\nc\n")
    assert count_prompts(PromptSource(prompts_file=str(tmp_path / "p.txt"), max_prompts=2)) == 2


def test_tfds_missing_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("tensorflow_datasets") is not None:
        pytest.skip("tensorflow-datasets is installed")
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        count_prompts(PromptSource(tfds="my_captions"))


def test_tfds_source_reads_only_the_process_slice(monkeypatch):
    """TFDS path with a stand-in module: counts from the split info, reads ``split[start:stop]``."""
    import sys
    import types

    captions = [f"caption {i}".encode() for i in range(10)]
    read = []

    class Builder:
        info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(captions))})

        def as_dataset(self, split, shuffle_files):
            read.append(split)
            a, b = (int(v) for v in split[len("train["):-1].split(":"))
            return [{"caption": c, "id": i} for i, c in enumerate(captions[a:b], a)]

    fake = types.SimpleNamespace(builder=lambda name, data_dir=None: Builder(),
                                 builder_from_directory=lambda d: Builder(), as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    src = PromptSource(tfds="my_captions")
    ds = PromptDataset.from_source(src, _embed, global_batch=2, seed=0, process_index=1, process_count=2)
    assert read == ["train[5:10]"] and list(ds.ids) == [5, 6, 7, 8, 9]
    np.testing.assert_array_equal(ds.embeds, _embed([f"caption {i}" for i in range(5, 10)]))
    with pytest.raises(ValueError, match="no feature 'text'"):
        read_prompts_range(PromptSource(tfds="my_captions", tfds_key="text"), 0, 2)


# --------------------------------------------------------------------------------------- training


def test_teacher_rollout_matches_pipeline(stack, cfg, calibrated):
    """The in-jit teacher reproduces CausalInferencePipeline.stream (same noise and re-noising draws)."""
    model, omega = calibrated
    trainer = qat_mod.QATTrainer(model, cfg, make_mesh("", jax.devices()[:1]), stack.latent_shape,
                                 stack.t2v.pipeline.config, omega)
    d = trainer.distiller
    emb = jnp.asarray(stack.embeds(DEMO_PROMPTS[:2]))
    noise, renoise = jax.jit(d.sample_noise)(jax.random.split(jax.random.key(5), 2))
    traj = jax.jit(d.teacher_rollout)(trainer.teacher, emb, noise, renoise)
    recs = list(stack.t2v.pipeline.stream(noise, emb, renoise=renoise))  # [K, S-1, B, Fc, C, H, W]
    for k, rec in enumerate(recs):
        np.testing.assert_allclose(traj.inputs[k], rec.inputs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(traj.flows[k], rec.flows, rtol=1e-4, atol=1e-5)


def test_sharded_step_matches_unsharded(stack, cfg, calibrated):
    """One QAT step on mesh data=2,fsdp=4 equals the single-device step, and the state is sharded as
    the rules say.

    Tolerances (float32 compute): loss and per-chunk losses rtol 1e-4, gradient norm rtol 1e-3. The
    difference is float32 summation order under FSDP/data sharding, amplified where a value sits on
    a rounding boundary of a fake quantizer (the LSQ step gradient ``round(x/D) - x/D`` jumps by 1
    there). Adam's first update is ``lr * rms * g/|g|``, so a near-zero gradient element can change
    sign: >= 98% of the updated quantizer steps agree to rtol 1e-3 and every one is within
    ``2 * lr * rms(layer steps)``, the size of such a flip.
    """
    model, omega = calibrated
    mesh = make_mesh(MESH)
    sharded, single, (s8, m8), (s1, m1) = sharded_and_single_step(stack, cfg, calibrated, MESH, jit_cache=JIT_CACHE)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
    np.testing.assert_allclose(m8["chunk_loss"], m1["chunk_loss"], rtol=1e-4)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-3)
    init = _host(single.init_state().trainable)
    agree, total = 0, 0
    for a, b, x0 in zip(jax.tree.leaves(_host(s8.trainable)), jax.tree.leaves(_host(s1.trainable)),
                        jax.tree.leaves(init)):
        bound = 2 * float(m1["lr"]) * np.sqrt(np.mean(x0 ** 2)) * (1 + 1e-3)
        assert np.all(np.abs(a - b) <= bound)
        agree += int(np.isclose(a - x0, b - x0, rtol=1e-3, atol=0).sum())
        total += a.size
    assert agree >= 0.98 * total
    assert int(s8.step) == 1 and not np.allclose(_host(s8.trainable)["blocks"][0]["ffn"]["layers"][0]["w_scale"],
                                                 init["blocks"][0]["ffn"]["layers"][0]["w_scale"])
    # shardings follow the rules: kernels (fsdp, tensor), per-channel steps (None, tensor), rest replicated
    fz = sharded.frozen["blocks"][0]["ffn"]["layers"][0]
    assert fz["kernel"][...].sharding.spec == P("fsdp", "tensor")  # [64, 128]
    assert fz["bias"][...].sharding.spec == P("tensor")
    tr = s8.trainable["blocks"][0]["ffn"]["layers"][0]
    assert tr["w_scale"][...].sharding.spec == P(None, "tensor") and tr["a_scale"][...].sharding.spec == P()
    mu = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(s8.opt_state)[0]
          if "w_scale" in jax.tree_util.keystr(path) and leaf.ndim == 2]
    row = lambda k: "['o']" in k or "['ffn']['layers'][2]" in k  # Megatron row-parallel: outputs on fsdp
    assert mu and all(m.sharding.spec == (P(None, "fsdp") if row(k) else P(None, "tensor")) for k, m in mu)
    assert s8.rng.sharding.spec == P() and s8.step.sharding.spec == P()
    # with train_weights the kernels move to the train state, sharded the same way (and their Adam moments)
    tw = qat_mod.QATTrainer(model, cfg.replace(train_weights=True), mesh, stack.latent_shape,
                            stack.t2v.pipeline.config, omega)
    st = tw.init_state()
    assert st.trainable["blocks"][1]["self_attn"]["q"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert st.trainable["blocks"][1]["modulation"][...].sharding.spec == P()
    kmu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]
           if jax.tree_util.keystr(path).endswith("['q']['kernel'].value")]
    assert kmu and all(m.sharding.spec == P("fsdp", "tensor") for m in kmu)


def test_qat_decreases_loss_and_resume_is_exact(stack, cfg, sensitivity, tmp_path, monkeypatch, capsys):
    """6 uninterrupted steps vs 4 steps + a rerun with --steps 6 (through the CLI): the resumed run
    restores step 4 and reproduces steps 5-6 bit for bit (losses, quantizer steps, Adam state, RNG)."""
    from qarvd_jax.cli import main as cli
    from qarvd_jax.quant.checkpoint import load_quantized_model

    full = qat_mod.run_qat(stack, cfg.replace(steps=6), DEMO_PROMPTS, out_dir=str(tmp_path / "full"),
                           sensitivity=sensitivity, mesh=make_mesh(MESH), return_state=True, jit_cache=JIT_CACHE)
    losses = [r["loss"] for r in full.history]
    assert [r["step"] for r in full.history] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < 0.95 * losses[0] and min(losses[3:]) < min(losses[:2])  # fixed data: QAT learns

    # the same run killed after step 4, then resumed by the same command with --steps 6
    monkeypatch.setattr("qarvd_jax.workflow.build_stack", lambda gen, work_dir, dit=None: stack)
    results = []
    real_run_qat = qat_mod.run_qat

    def spy(*args, **kwargs):  # the CLI's run_qat, sharing the compiled step and keeping the final state
        results.append(real_run_qat(*args, return_state=True, jit_cache=JIT_CACHE, **kwargs))
        return results[-1]

    monkeypatch.setattr(qat_mod, "run_qat", spy)
    out = tmp_path / "killed"
    base = ["quantize", "--method", "qat", "--mesh", MESH, "--out", str(out), "--sensitivity", sensitivity,
            "--num-frames", "6", "--height", "32", "--width", "32", *OVERRIDES[:-1]]
    assert cli(base + ["--steps", "4"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    with open(out / "train_log.jsonl", "a") as fh:  # killed after logging step 5, before its checkpoint
        fh.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    assert cli(base + ["--steps", "6"]) == 0
    assert "resumed from step 4 -> step 6" in capsys.readouterr().out
    resumed = results[-1]
    assert resumed.resumed_from == 4 and resumed.step == 6
    assert [r["loss"] for r in resumed.history[4:]] == losses[4:]  # bit for bit
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]  # log kept and continued
    jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.trainable), _host(full.state.trainable))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.opt_state),
                 jax.device_get(full.state.opt_state))
    np.testing.assert_array_equal(np.asarray(resumed.state.rng), np.asarray(full.state.rng))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["data_position"] == 48
    assert [r["loss"] for r in rows[4:]] == losses[4:]  # the stale step-5 row was dropped
    assert (out / "train_loss.png").stat().st_size > 1000
    # the final quantized checkpoint loads for `qarvd generate --quantized OUT`
    model, meta = load_quantized_model(str(out / "quantized"))
    assert meta["method"] == "qat" and meta["steps"] == 6 and meta["chunk_weights"] == pytest.approx([0.8, 1.2])
    trained = _host(resumed.state.trainable)["blocks"][0]["ffn"]["layers"][0]["w_scale"]
    np.testing.assert_allclose(model.blocks[0].ffn.layers[0].w_scale[...], trained, rtol=1e-6)
    # errors of the command line
    assert cli(["quantize", "--method", "qat", "--mesh", "data=3", "--out", str(tmp_path / "x")]) == 2
    assert "3 devices but 8 are available" in capsys.readouterr().err
    assert cli(["quantize", "--method", "qat", "--mesh", "data=2,fsdp=4", "--out", str(tmp_path / "x"),
                "--sensitivity", str(tmp_path / "missing.json")]) == 2
    assert "sensitivity file not found" in capsys.readouterr().err
    assert cli(base + ["batch_size=16", "--steps", "6"]) == 2  # incompatible with the checkpoint
    assert "batch_size=8" in capsys.readouterr().err


def test_sigterm_saves_and_resumes_and_profile_trace(stack, cfg, sensitivity, tmp_path, monkeypatch):
    """A SIGTERM during step 3 saves checkpoint 3 and returns without the export; the rerun resumes at 3.
    The loss of a step is logged one step late (after the next step was launched) and --profile writes
    a trace of the chosen steps."""
    import os
    import signal

    real_step = qat_mod.QATTrainer.step
    calls = []

    def step(self, state, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # preemption notice while step 3 runs
        return real_step(self, state, batch)

    monkeypatch.setattr(qat_mod.QATTrainer, "step", step)
    out = tmp_path / "pre"
    res = qat_mod.run_qat(stack, cfg.replace(steps=6), DEMO_PROMPTS, out_dir=str(out), sensitivity=sensitivity,
                          mesh=make_mesh(MESH), jit_cache=JIT_CACHE, profile=(str(tmp_path / "trace"), 1, 2))
    assert res.step == 3 and res.quantized is None and not (out / "quantized").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert [r["step"] for r in res.history] == [1, 2, 3]
    assert any(f.endswith(".xplane.pb") for _, _, files in os.walk(tmp_path / "trace") for f in files)
    monkeypatch.setattr(qat_mod.QATTrainer, "step", real_step)
    again = qat_mod.run_qat(stack, cfg.replace(steps=4), DEMO_PROMPTS, out_dir=str(out), sensitivity=sensitivity,
                            mesh=make_mesh(MESH), jit_cache=JIT_CACHE)
    assert again.resumed_from == 3 and again.step == 4 and (out / "quantized").is_dir()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))
