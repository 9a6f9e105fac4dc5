"""QAT with dual-scale layers under ``lax.scan``: the fixed-shape mask form (qarvd_jax.quant.stackable).

A tiny DiT whose weights have planted outlier input channels, so that outlier detection (``align=8``) makes
dual-scale layers with a different K per block (``ffn.0``: 8 and 16) and a position that is dual-scale in
block 1 only (``self_attn.o``: promoted in block 0). Gather form: two block structures, a Python loop; mask
form: one structure, scanned. Numbers agree to float32 summation order (the fake-quant codes are the same
elementwise operations; the matmul and the per-group gradient sums add in another order).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel, block_stack_plan
from qarvd_jax.models.wan_vae import WanVAEConfig
from qarvd_jax.pipeline.text_to_video import GenerateConfig, TextToVideo
from qarvd_jax.quant import stackable
from qarvd_jax.quant.fake_quant import params_from_range
from qarvd_jax.quant.qlinear import QuantState, iter_quant_layers, qlinear_apply, set_quant_flags
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import load_qat_config
from qarvd_jax.train.rollout import Trajectory
from qarvd_jax.train.sharding import make_mesh
from qarvd_jax.workflow import DEMO_PROMPTS, Stack
from test_qat import _embed

OVERRIDES = ["batch_size=2", "compute_dtype=float32", "hist_bins=2048", "align=8", "warmup_steps=1",
             "lr_schedule_steps=3", "checkpoint_every=1", "resample_noise=false", "async_checkpointing=false",
             "mesh=data=1"]  # dual_scale: the default (true)
PLANTED = {(0, "ffn", 0): [3, 17], (1, "ffn", 0): list(range(0, 40, 4)), (1, "o", None): [5],
           (0, "q", None): [1, 2, 3], (1, "q", None): [9]}


def _planted_dit():
    dit = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0))
    for (blk, name, idx), chans in PLANTED.items():
        b = dit.blocks[blk]
        lin = b.ffn.layers[idx] if name == "ffn" else getattr(b.self_attn, name)
        lin.kernel[...] = lin.kernel[...].at[jnp.array(chans)].multiply(10.0)
    return dit


@pytest.fixture(scope="module")
def stack():
    dit = _planted_dit()
    t2v = TextToVideo(dit, None, _embed, vae_config=WanVAEConfig.tiny())
    return Stack(t2v, GenerateConfig(num_frames=6, height=32, width=32), t2v.latent_shape(6, 32, 32))


@pytest.fixture(scope="module")
def cfg():
    return load_qat_config(None, OVERRIDES)


def quick_calibrate(model, *_args, **_kw) -> None:
    """Data-free stand-in for ``calibrate_student`` (seconds instead of a calibration generation): per-group
    weight ranges at 90 % of min/max (codes clip at both ends), activation ranges [-4, 4] (group 0) and [-5, 5]
    (group 1, or the only group); flags on."""
    for _, lyr in iter_quant_layers(model):
        w = jnp.asarray(lyr.kernel[...], jnp.float32).T
        groups = [w] if not lyr.cfg.n_outlier else [w[:, lyr.outlier_idx[...]], w[:, lyr.normal_idx[...]]]
        for g, wg in enumerate(groups):
            p = params_from_range(0.9 * wg.min(1), 0.9 * wg.max(1), lyr.cfg.w_spec)
            lyr.w_scale[...] = lyr.w_scale[...].at[g].set(p.scale)
            lyr.w_zero[...] = lyr.w_zero[...].at[g].set(p.zero_point)
            a = params_from_range(-4.0 - g, 4.0 + g, lyr.cfg.a_spec)  # the groups' steps differ
            lyr.a_scale[...] = lyr.a_scale[...].at[g].set(a.scale)
            lyr.a_zero[...] = lyr.a_zero[...].at[g].set(a.zero_point)
    set_quant_flags(model, weights=True, acts=True)


@pytest.fixture(scope="module")
def calibrated(stack, cfg):
    """The calibrated gather-form student (flags on) and its layer configs."""
    model, layers = qat_mod.prepare_student(stack.dit, cfg)
    quick_calibrate(model)
    return model, layers


def _pure(model, coll):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, coll)))


def test_mask_form_stacks_and_round_trip_is_exact(calibrated):
    model, layers = calibrated
    assert layers["blocks.0.ffn.0"].n_outlier == 8 and layers["blocks.1.ffn.0"].n_outlier == 16
    assert layers["blocks.0.self_attn.o"].n_outlier == 0 and layers["blocks.1.self_attn.o"].n_outlier == 8
    assert layers["blocks.0.ffn.2"].n_outlier == 0  # no dual-scale layer at this position: untouched
    assert len(block_stack_plan(model)) == 2  # gather form: different structures, a Python loop
    masked = stackable.shallow_copy(model)
    stackable.to_mask_form(masked)
    assert len(block_stack_plan(masked)) == 1  # one graphdef: the blocks stack for lax.scan
    names = dict(iter_quant_layers(masked))
    assert sorted(stackable.mask_form_layers(masked)) == sorted(
        f"blocks.{b}.{p}" for b in (0, 1) for p in ("ffn.0", "self_attn.o", "self_attn.q"))
    promoted = names["blocks.0.self_attn.o"]
    assert promoted.cfg.groups == 2 and promoted.a_scale[...].shape == (2,)
    assert not np.any(np.asarray(promoted.group_mask[...]))
    assert float(names["blocks.1.ffn.0"].group_mask[...].sum()) == 16
    with pytest.raises(ValueError, match="mask-form"):
        promoted.cfg.to_dict()  # never saved
    assert stackable.to_mask_form(masked) == []  # idempotent
    # round trip: every leaf, dtype, config and the graph definition exactly as before
    stackable.from_mask_form(masked)
    assert nnx.graphdef(masked) == nnx.graphdef(model)
    for coll in (QuantState, nnx.Param):
        jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b), a.dtype == b.dtype or pytest.fail("dtype")),
                     _pure(masked, coll), _pure(model, coll))
    assert {n: lyr.cfg for n, lyr in iter_quant_layers(masked)} == layers


@partial(jax.jit, static_argnums=(1,))
def _values_and_grads(args, cfgs):
    """Per layer: y and the gradients of sum(y * r) w.r.t. x, kernel, a_scale, w_scale (one compile)."""

    def one(x, kernel, bias, state, r, cfg):
        def f(x, kernel, a_scale, w_scale):
            y = qlinear_apply(x, kernel, bias, {**state, "a_scale": a_scale, "w_scale": w_scale}, cfg)
            return jnp.sum(y * r), y

        (_, y), g = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(x, kernel, state["a_scale"],
                                                                              state["w_scale"])
        return y, g

    return [one(*a, c) for a, c in zip(args, cfgs)]


def test_mask_apply_equals_gather_per_layer(calibrated):
    """Outputs and gradients (x, kernel, a_scale, w_scale) of every converted layer, gather vs mask form."""
    model, _ = calibrated
    masked = stackable.shallow_copy(model)
    stackable.to_mask_form(masked)
    masked = dict(iter_quant_layers(masked))
    rng = np.random.default_rng(0)
    pairs = [(lyr, masked[n]) for n, lyr in iter_quant_layers(model) if masked[n].cfg.group_mask]
    args, cfgs = [], []
    for lyr, m in pairs:
        x = jnp.asarray(rng.standard_normal((2, 5, lyr.kernel.shape[0])) * 2.0, jnp.float32)
        r = jnp.asarray(rng.standard_normal((2, 5, lyr.kernel.shape[1])), jnp.float32)
        for layer in (lyr, m):
            args.append((x, layer.kernel[...], layer.bias[...], layer.state_dict(), r))
            cfgs.append(layer.cfg)
    out = _values_and_grads(args, tuple(cfgs))
    for (yg, gg), (ym, gm) in zip(out[0::2], out[1::2]):
        np.testing.assert_allclose(ym, yg, rtol=1e-5, atol=1e-5 * float(jnp.abs(yg).max()))
        for a, b in zip(gm, gg):
            if a.shape != b.shape:  # promoted layer: group 1 is the layer's own group, group 0 has no channel
                np.testing.assert_array_equal(a[:1], 0)
                a = a[1:]
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    m = masked["blocks.0.ffn.0"]
    with pytest.raises(ValueError, match="AdaRound"):
        qlinear_apply(jnp.zeros((1, m.kernel.shape[0])), m.kernel[...], None, m.state_dict(), m.cfg, v=(m.kernel[...],))


def _at(tree, name: str):
    """The sub-dict of a pure state dict at a PyTorch layer name (``blocks.0.ffn.0`` -> blocks/0/ffn/layers/0)."""
    for key in name.split("."):
        tree = (tree["layers"] if "layers" in tree else tree)[int(key)] if key.isdigit() else tree[key]
    return tree


def _compare(mask_tree, gather_tree, rtol, atol_frac):
    """Leaf by leaf (pure dicts of the same keys); a promoted layer's [2, ...] mask-form leaf is compared by its
    group 1 (its group 0 has no channel: zero gradient, unchanged step)."""

    def one(a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            a = a[1:]
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * float(np.abs(b).max()))

    jax.tree.map(one, mask_tree, gather_tree)


def test_scanned_mask_step_equals_gather_loop(stack, cfg, calibrated):
    """The per_call QAT objective (the train step's loss and gradients) of scanned mask-form blocks equals the
    Python loop over the gather-form blocks, on the same trajectory (random: the teacher is not under test)."""
    model, _ = calibrated
    mesh, sampler = make_mesh("", jax.devices()[:1]), stack.t2v.pipeline.config
    mask = qat_mod.QATTrainer(model, cfg, mesh, stack.latent_shape, sampler)
    gather = qat_mod.QATTrainer(model, cfg.replace(scan_layers=False), mesh, stack.latent_shape, sampler,
                                mask_form=False)
    assert mask.distiller.scanned and len(mask.mask_layers) == 6 and stackable.mask_form_layers(model) == []
    assert not gather.distiller.scanned and gather.mask_layers == [] and mask.layer_configs == gather.layer_configs
    d = mask.distiller
    shape = (d.num_chunks, d.num_steps + 1, 2, d.chunk_frames, *stack.latent_shape[1:])
    rng = np.random.default_rng(1)
    traj = Trajectory(*(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)))
    emb = jnp.asarray(stack.embeds(DEMO_PROMPTS[:2]))
    (lg, ag), gg = jax.jit(gather.distiller.student_loss_and_grad)(gather.init_state().trainable, gather.frozen,
                                                                   emb, traj)
    (lm, am), gm = jax.jit(d.student_loss_and_grad)(mask.init_state().trainable, mask.frozen, emb, traj)
    np.testing.assert_allclose(lm, lg, rtol=1e-5)
    np.testing.assert_allclose(am["chunk_loss"], ag["chunk_loss"], rtol=1e-5)
    _compare(nnx.to_pure_dict(gm), nnx.to_pure_dict(gg), rtol=1e-3, atol_frac=1e-3)
    promoted = _at(nnx.to_pure_dict(gm), "blocks.0.self_attn.o")  # no gradient reaches its empty group 0
    assert not np.any(np.asarray(promoted["w_scale"])[0]) and not np.asarray(promoted["a_scale"])[0]


def test_qat_run_resume_and_export_keep_the_gather_layout(stack, cfg, calibrated, tmp_path, monkeypatch):
    """A QAT run with the default dual_scale (mask form inside, checkpoints in the mask form), resumed, then
    exported: the saved model has the original configs and outlier indices and the trained steps."""
    from qarvd_jax.quant.checkpoint import load_quantized_model

    ref, layers = calibrated
    monkeypatch.setattr(qat_mod, "calibrate_student", quick_calibrate)
    mesh, out, cache = make_mesh("", jax.devices()[:1]), tmp_path / "run", {}
    first = qat_mod.run_qat(stack, cfg.replace(steps=2), DEMO_PROMPTS, out_dir=str(out), mesh=mesh, jit_cache=cache)
    res = qat_mod.run_qat(stack, cfg.replace(steps=3), DEMO_PROMPTS, out_dir=str(out), mesh=mesh, jit_cache=cache,
                          return_state=True)
    assert first.step == 2 and res.resumed_from == 2 and res.step == 3 and len(cache) == 1
    exported, meta = load_quantized_model(res.quantized)
    assert meta["steps"] == 3 and {n: lyr.cfg for n, lyr in iter_quant_layers(exported)} == layers
    trained = nnx.to_pure_dict(res.state.trainable)
    refs = dict(iter_quant_layers(ref))
    for name, lyr in iter_quant_layers(exported):
        assert not hasattr(lyr, "group_mask") and not hasattr(lyr, "unmasked_cfg")
        if lyr.cfg.n_outlier:
            for leaf in ("outlier_idx", "normal_idx"):
                np.testing.assert_array_equal(getattr(lyr, leaf)[...], getattr(refs[name], leaf)[...])
                assert getattr(lyr, leaf)[...].dtype == np.int32
        if not name.startswith("blocks."):
            continue
        for leaf in ("w_scale", "a_scale"):
            want = np.asarray(_at(trained, name)[leaf])
            want = want[1:] if want.shape != getattr(lyr, leaf)[...].shape else want  # promoted: group 1
            np.testing.assert_array_equal(getattr(lyr, leaf)[...], want)
    o = dict(iter_quant_layers(exported))["blocks.0.self_attn.o"]  # promoted in training: trained, [1, out]
    assert o.w_scale[...].shape == (1, 64)
    assert not np.allclose(o.w_scale[...], refs["blocks.0.self_attn.o"].w_scale[...])
