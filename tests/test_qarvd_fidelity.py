"""Q-ARVD fidelity points (shared docs qarvd_method.md, "Fidelity notes") and the CLI guards around them:
cross-attention K/V and text embedding quantized with chunk 0 in the sensitivity step, fresh noise for every
calibration pass, calib_tokens keeping the loss scale, prompts required with a real checkpoint, presets,
and checked sensitivity vectors (file or --sensitivity-values)."""

import json

import numpy as np
import pytest
from flax import nnx

from qarvd_jax.cli import main as cli
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
from qarvd_jax.quant import calibration as calib
from qarvd_jax.quant.objective import validate_sensitivity
from qarvd_jax.quant.qlinear import iter_quant_layers, quantize_model, set_quant_flags
from qarvd_jax.quant.recipe import QARVDConfig, QuantRule
from qarvd_jax.quant.sensitivity import chunk_sensitivity, load_sensitivity

LATENT = (6, 16, 4, 4)  # 2 chunks of 3 latent frames
GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]


def _model(seed=0):
    return CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(seed))


def _embeds(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16, 32)).astype(np.float32)


def test_sensitivity_quantizes_cross_kv_and_text_embedding_with_chunk_zero():
    """Only the once-per-video layers quantized: they are computed at chunk 0, so perturbing chunk 0 changes
    the whole video (e_0 > 0) while perturbing chunk 1 changes nothing (e_1 == 0, same compiled function on
    identical inputs). Before the fix the sweep kept them in full precision for every k: all errors 0."""
    model = _model()
    a8 = dict(w_bits=4, a_bits=8, dual_scale=False, reconstruct=False, act_samples=1)
    quantize_model(model, (QuantRule("blocks.*.cross_attn.k", **a8), QuantRule("blocks.*.cross_attn.v", **a8),
                           QuantRule("text_embedding.*", **a8)))
    assert {n.split(".")[-1] for n, _ in iter_quant_layers(model)} == {"k", "v", "0", "2"}
    pipe = CausalInferencePipeline(model)
    calib.calibrate_rtn(model, pipe, _embeds(1), [0], LATENT, QARVDConfig())
    set_quant_flags(model, weights=True, acts=True)
    pipe.set_model(model)
    res = chunk_sensitivity(pipe, _embeds(2, seed=1), [5, 6], LATENT)
    assert res["errors"][0] > 0 and res["errors"][1] == 0.0
    assert res["sensitivity"] == [1.0, 0.0]


def test_calibration_passes_draw_fresh_noise(monkeypatch):
    """Pass B (W on, A off) and pass C (full precision) of PTQ, and the sensitivity step's calibration, each
    use their own seeds for the same prompt; every layer group of one pass reuses that pass's seeds."""
    seen = []
    real = calib.collect_inputs

    def spy(pipeline, model, prompt_embeds, seeds, latent_shape, **kw):
        seen.append((kw.get("desc", ""), [int(s) for s in seeds]))
        return real(pipeline, model, prompt_embeds, seeds, latent_shape, **kw)

    monkeypatch.setattr(calib, "collect_inputs", spy)
    model = _model()
    cfg = QARVDConfig(iters=2, calib_layer_group=6)
    calib.run_qarvd_ptq(model, CausalInferencePipeline(model), _embeds(1), [7], LATENT, cfg)
    b = {tuple(s) for d, s in seen if d.startswith("pass B")}
    c = {tuple(s) for d, s in seen if d.startswith("pass C")}
    assert len([d for d, _ in seen if d.startswith("pass B")]) > 1  # several groups ...
    assert len(b) == 1 and len(c) == 1  # ... all on the same draws within a pass
    assert b.isdisjoint(c) and (7,) not in b | c  # and a fresh draw per pass (the sensitivity step uses 7)
    assert calib.pass_seeds([7, 8], 1) != calib.pass_seeds([7, 8], 2)


def test_calib_tokens_keeps_the_reconstruction_loss_scale():
    """The token-summed reconstruction loss of T' of T tokens is rescaled by T/T': the first-step loss with a
    quarter of the tokens matches the full one (random token subset, so up to sampling noise), where the
    unnormalised loss would be 4x smaller and reg_weight 4x stronger."""
    model = _model()
    cfg = QARVDConfig(iters=1, dual_scale=False)
    calib.prepare_quantized_model(model, cfg)
    calib.init_weight_quantizers(model, cfg)
    name = "blocks.0.ffn.0"
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, 1, 48, 64)).astype(np.float32)  # 8 samples of 48 tokens
    full, sub = calib.CalibrationData(), calib.CalibrationData(max_tokens=12)
    for i, x in enumerate(xs):
        full.add(name, x, i % 2)
        sub.add(name, x, i % 2)
    assert sub.samples[name][0].shape == (12, 64) and sub.full_tokens[name] == 48
    calib.calibrate_activations(model, full, cfg, names=[name])
    layer = dict(iter_quant_layers(model))[name]
    a_scale = layer.a_scale[...]
    losses = []
    for data in (full, sub):
        layer.a_scale[...] = a_scale
        losses.append(calib.reconstruct_layers(model, data, cfg, names=[name], deferred={})[name]["rec_loss_first"])
    assert 0.7 < losses[1] / losses[0] < 1.4, losses


def test_sensitivity_vectors_are_checked_everywhere(tmp_path):
    assert validate_sensitivity([0.5, 0.3, 0.2], 3) == [0.5, 0.3, 0.2]
    for bad, match in [([0.5, float("nan")], "finite"), ([0.5, -0.1], ">= 0"), ([0.0, 0.0], "sum to 0"),
                       ([], "empty"), ("0.5", "list"), ([0.5, "x"], "number")]:
        with pytest.raises(ValueError, match=match):
            validate_sensitivity(bad)
    with pytest.raises(ValueError, match="3 chunk sensitivities but the video has 2 chunks"):
        validate_sensitivity([1, 2, 3], 2)
    assert load_sensitivity(values="0.546,0.167, 0.119") == [0.546, 0.167, 0.119]
    with pytest.raises(ValueError, match="comma-separated numbers"):
        load_sensitivity(values="0.5;0.5")
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"sensitivity": [0.5, float("nan")]}))
    with pytest.raises(ValueError, match=f"{f}: sensitivities must be finite"):
        load_sensitivity(str(f))
    f.write_text(json.dumps({"errors": [1.0]}))
    with pytest.raises(ValueError, match="no 'sensitivity' entry"):
        load_sensitivity(str(f))
    with pytest.raises(ValueError, match="not both"):
        load_sensitivity(str(f), "1,2")
    # the library recipe refuses a NaN vector too (it gave NaN latents and exit 0)
    model = _model()
    with pytest.raises(ValueError, match="finite"):
        calib.run_qarvd_ptq(model, CausalInferencePipeline(model), _embeds(1), [0], LATENT, QARVDConfig(iters=1),
                            sensitivity=[float("nan"), 1.0])


def test_cli_sensitivity_values_reach_the_recipe(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(["quantize", "--out", str(out), *GEOM, "--sensitivity-values", "0.75,0.25", "iters=2"]) == 0
    summary = json.loads((out / "quantize.json").read_text())
    assert summary["sensitivity"] == [0.75, 0.25]
    assert summary["chunk_weights"] == pytest.approx([1.5, 0.5])
    capsys.readouterr()
    for values, match in [("0.5,0.3,0.2", "3 chunk sensitivities but the video has 2"), ("nan,1", "finite"),
                          ("-1,2", ">= 0"), ("0,0", "sum to 0")]:
        assert cli(["quantize", "--out", str(tmp_path / "bad"), *GEOM, f"--sensitivity-values={values}"]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad" / "quantized").exists()


@pytest.mark.parametrize("command", [["quantize"], ["sensitivity"], ["quantize", "--method", "qat"]])
def test_real_checkpoint_requires_prompts(tmp_path, capsys, command):
    """No silent calibration of a real model on the demo prompts; the error comes before any loading."""
    argv = [*command, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "missing.pt")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "--prompts" in err and "MovieGenVideoBench_extended" in err and "Traceback" not in err


def test_presets_unknown_or_without_weights_are_errors(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    base = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "g")]
    assert cli([*base, "--preset", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown --preset 'nonsense'" in err and "selfforcing_1_3b" in err and "tiny" in err
    assert cli([*base, "--preset", "selfforcing_1_3b"]) == 2
    assert "has no built-in weights: pass its --checkpoint" in capsys.readouterr().err
    assert cli(["quantize", "--out", str(tmp_path / "q"), "--preset", "nonsense"]) == 2
    assert "unknown --preset" in capsys.readouterr().err
    for flag in ("--height", "--num-frames", "--width"):
        with pytest.raises(SystemExit) as e:
            cli([*base, flag, "0"])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err
    assert cli([*base, "--preset", "tiny", *GEOM[:2], "--height", "32", "--width", "32"]) == 0
    manifest = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert len(manifest["videos"]) == 1
