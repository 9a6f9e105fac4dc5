"""Every method at model level on the tiny model: quantize -> checkpoint -> generate (-> export where the
method has an integer form), mixed methods by rules, and the explicit step context of ViDiT-Q."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.cli import main as cli
from qarvd_jax.pipeline.text_to_video import GenerateConfig
from qarvd_jax.quant import methods
from qarvd_jax.quant.checkpoint import load_quantized_model, save_quantized
from qarvd_jax.quant.methods.model import MethodRule, iter_method_layers
from qarvd_jax.quant.qlinear import iter_quant_layers
from qarvd_jax.workflow import build_stack, quantize_copy

GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]
SMALL = {"rtn": {}, "smoothquant": {}, "gptq": {"a_bits": 8}, "vidit-q": {},
         "svdquant": {"w_bits": 4, "a_bits": 4, "rank": 8, "lowrank_iters": 2, "smooth_search": False},
         "qarvd": {"iters": 10, "align": 8, "hist_bins": 1024}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_model")
    return build_stack(GenerateConfig(num_frames=6, height=32, width=32), str(d))


def latents(stack, model, prompt="a fox", seed=0):
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline

    pipe = CausalInferencePipeline(model, stack.t2v.pipeline.config)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 << 20), (1, *stack.latent_shape))  # as generate
    return np.asarray(pipe.generate(noise, jnp.asarray(stack.embeds([prompt])), seed=seed)), pipe


@pytest.fixture(scope="module")
def fp_latents(stack):
    return latents(stack, stack.dit)[0]


@pytest.mark.parametrize("name", ["smoothquant", "vidit-q", "svdquant", "qarvd"])
def test_quantize_checkpoint_generate(name, stack, fp_latents, tmp_path):
    m = methods.get(name)
    cfg = methods.load_method_config(name, None, [f"{k}={json.dumps(v)}" for k, v in SMALL[name].items()])
    model, summary = quantize_copy(stack, name, cfg, ["a fox"], seed=0)
    assert summary["method"] == m.NAME
    kinds = {type(layer).__name__ for _, layer in [*iter_quant_layers(model), *iter_method_layers(model)]}
    assert kinds == ({"QuantLinear"} if m.HAS_INTEGER_FORM else {"MethodLinear"})
    save_quantized(tmp_path / "q", model, metadata={"method": m.NAME, "recipe": summary["config"]})
    loaded, meta = load_quantized_model(tmp_path / "q")
    assert meta["method"] == m.NAME and meta["recipe"]["w_bits"] == cfg.w_bits
    # the checkpoint restores the same arrays (no arithmetic in between)
    saved = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    restored = dict(jax.tree_util.tree_flatten_with_path(nnx.state(loaded, nnx.Param))[0])
    for path, v in saved:
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(v))
    a = latents(stack, loaded)[0]
    rel = np.mean((a - fp_latents) ** 2) / np.var(fp_latents)
    assert 0 < rel < 0.1, rel
    if name == "smoothquant":
        check_norm3_fold(stack, model, summary)
    if name == "qarvd":  # the interface runs the recipe itself: same arrays as run_qarvd_ptq
        from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
        from qarvd_jax.quant.calibration import run_qarvd_ptq

        ref = nnx.clone(stack.dit)
        run_qarvd_ptq(ref, CausalInferencePipeline(ref, stack.t2v.pipeline.config), stack.embeds(["a fox"]), [0],
                      stack.latent_shape, cfg)
        got = dict(jax.tree_util.tree_flatten_with_path(nnx.state(model))[0])
        for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(ref))[0]:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(v), rtol=1e-6, atol=0)


def check_norm3_fold(stack, model, summary):
    """cross_attn.q's 1/s lives in norm3: norm3' then layer(smooth=1) equals norm3 then layer(smooth=s)."""
    from qarvd_jax.quant.methods.base import QuantizedLayer

    assert summary["folded_into_norm3"] == ["blocks.0.cross_attn.q", "blocks.1.cross_attn.q"]
    lyr = dict(iter_method_layers(model))["blocks.0.cross_attn.q"]
    q = lyr.quantized_layer()
    np.testing.assert_array_equal(np.asarray(q.state["smooth"]), 1.0)
    norm, norm_fp = model.blocks[0].norm3, stack.dit.blocks[0].norm3
    s = np.asarray(norm_fp.scale[...]) / np.asarray(norm.scale[...])
    np.testing.assert_allclose(np.asarray(norm_fp.bias[...]) / s, np.asarray(norm.bias[...]), rtol=1e-5, atol=1e-7)
    unfolded = QuantizedLayer(q.method, q.kernel, q.bias, dict(q.state, smooth=jnp.asarray(s)), q.static)
    x = jax.random.normal(jax.random.key(0), (64, s.shape[0])) * 3
    a, b = np.asarray(q(norm(x))), np.asarray(unfolded(norm_fp(x)))
    assert np.mean(np.abs(a - b) > 1e-4 * np.abs(b).max()) < 0.01


def test_cli_quantize_generate_export_for_integer_methods(tmp_path, stack, fp_latents):
    """rtn and gptq land in the QuantLinear layout: `qarvd export` and the integer path run them;
    methods without an integer form are refused by export with a clear message."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    assert cli(["quantize", "--method", "gptq", "--out", str(tmp_path / "g"), "--prompts", str(prompts), *GEOM,
                "a_bits=8"]) == 0
    summary = json.loads((tmp_path / "g" / "quantize.json").read_text())
    assert summary["method"] == "gptq" and summary["recipe"]["a_bits"] == 8 and summary["recipe"]["w_bits"] == 4
    assert cli(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "gg"), "--quantized",
                str(tmp_path / "g"), *GEOM]) == 0
    assert cli(["export", str(tmp_path / "g"), str(tmp_path / "g_int")]) == 0
    from qarvd_jax.quant.integer.export import export_model
    from qarvd_jax.quant.integer.int_linear import load_integer_model

    fake = np.load(tmp_path / "gg" / "latents" / "a fox-0.npz")["latents"]
    integer = latents(stack, load_integer_model(tmp_path / "g_int", backend="xla"), seed=0)[0][0]
    assert np.mean((fake - integer) ** 2) < 1e-3 * np.var(fake)
    # dynamic activations (a MethodLinear) have no integer form and are refused
    dyn, _ = quantize_copy(stack, "rtn", methods.get("rtn").Config(act_dynamic=True), ["a fox"], seed=0)
    with pytest.raises(ValueError, match="no integer form"):
        export_model(dyn)


def test_mixed_methods_and_bits_by_rules(stack):
    rules = (MethodRule.make("blocks.0.*", "gptq", w_bits=4, a_bits=None),
             MethodRule.make("blocks.1.ffn.*", "vidit-q"),
             MethodRule.make("blocks.1.cross_attn.*", skip=True),
             MethodRule.make("blocks.*"))
    model = nnx.clone(stack.dit)
    cal = methods.Calibration(stack.embeds(["a fox"]), [0], stack.latent_shape, stack.t2v.pipeline.config)
    summary = methods.get("rtn").quantize_model(model, cal, methods.get("rtn").Config(w_bits=8, a_bits=8), rules)
    layers = summary["layers"]
    assert {layers[n]["method"] for n in layers if n.startswith("blocks.0.")} == {"gptq"}
    assert layers["blocks.0.ffn.0"]["w_bits"] == 4 and layers["blocks.0.ffn.0"]["a_bits"] is None
    assert layers["blocks.1.ffn.2"]["method"] == "vidit-q" and layers["blocks.1.self_attn.q"]["method"] == "rtn"
    assert not any(n.startswith("blocks.1.cross_attn") for n in layers)
    assert {n for n, _ in iter_method_layers(model)} == {"blocks.1.ffn.0", "blocks.1.ffn.2"}
    with pytest.raises(ValueError, match="available"):
        methods.get("rtn").quantize_model(nnx.clone(stack.dit), cal, methods.get("rtn").Config(),
                                          (MethodRule.make("blocks.*", "nope"),))


def test_vidit_q_gets_the_step_explicitly_and_compiles_once(stack):
    cfg = methods.get("vidit-q").Config(w_bits=4, a_bits=8, alpha=0.5)
    model, _ = quantize_copy(stack, "vidit-q", cfg, ["a fox", "clouds"], seed=0)
    a, pipe = latents(stack, model)
    latents_again = np.asarray(pipe.generate(jax.random.normal(jax.random.key(1), (1, *stack.latent_shape)),
                                             jnp.asarray(stack.embeds(["clouds"])), seed=1))
    assert pipe.trace_count == 1 and latents_again.shape == a.shape  # 2 chunks x 5 passes, 2 videos: one trace
    # per-pass balance really differs, and the layers see the pass: using pass 0's parameters for every
    # pass changes the video
    layer = dict(iter_method_layers(model))["blocks.0.self_attn.q"]
    assert layer.q_smooth[...].shape[0] == 5
    flat = nnx.clone(model)
    for _, lyr in iter_method_layers(flat):
        for n in ("q_smooth", "q_w_scale", "q_w_zero"):
            v = getattr(lyr, n)[...]
            getattr(lyr, n)[...] = jnp.broadcast_to(v[:1], v.shape)
    b = latents(stack, flat)[0]
    assert np.mean((a - b) ** 2) > 1e-9
    # with_step_context writes the traced indices into exactly the StepContext leaves
    from qarvd_jax.pipeline.causal_inference import with_step_context

    st = with_step_context(nnx.state(model), 3, 7)
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(st)[0]}
    assert all(int(v) == 3 for k, v in leaves.items() if "step_index" in k)
    assert all(int(v) == 7 for k, v in leaves.items() if "chunk_index" in k)


def test_layer_groups_bound_memory_without_changing_the_result(stack):
    """Recording 8 layers per generation pass (from an FP copy) gives the layers of one pass."""
    cfg = methods.get("rtn").Config(w_bits=8, a_bits=8)
    out = []
    for group in (None, 8):
        model = nnx.clone(stack.dit)
        cal = methods.Calibration(stack.embeds(["a fox"]), [0], stack.latent_shape, stack.t2v.pipeline.config,
                                  layer_group=group, max_tokens=64)
        methods.get("rtn").quantize_model(model, cal, cfg)
        out.append({n: np.asarray(lyr.a_scale[...]) for n, lyr in iter_quant_layers(model)})
    assert out[0].keys() == out[1].keys() and len(out[0]) == 20
    from qarvd_jax.quant.integer.export import export_model

    _, meta = export_model(model)  # rtn with static activations is in the QuantLinear layout: it exports
    assert len(meta["layers"]) == 20 and {v["w_bits"] for v in meta["layers"].values()} == {8}
    for n in out[0]:
        np.testing.assert_allclose(out[0][n], out[1][n], rtol=1e-6)


def test_vidit_q_mixed_precision_on_the_model(stack):
    cfg = methods.get("vidit-q").Config(mixed_precision=True, mp_bits=(4, 8), mp_avg_bits=6.0)
    model, summary = quantize_copy(stack, "vidit-q", cfg, ["a fox"], seed=0)
    bits = summary["mixed_precision"]["bits"]
    sizes = {n: int(np.prod(lyr.kernel[...].shape)) for n, lyr in iter_method_layers(model)}
    assert set(bits) == set(sizes) and set(bits.values()) == {4, 8}
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) <= 6.0
    assert all(summary["layers"][n]["w_bits"] == b for n, b in bits.items())
    errs = summary["mixed_precision"]["errors"]
    assert all(errs[n][4] > errs[n][8] for n in errs)  # the metric: 4-bit error above 8-bit
