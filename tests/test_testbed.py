"""The trained testbed: procedural data, the task score, and the shipped weights' quality.

Quality thresholds are the issue's (VAE >= 28 dB, FP task score >= 0.8, RTN W8A8 > W4A8 > W4A4); they are
measured on held-out captions with seeds the training script never used. Planted bugs these catch
(checked by hand, see docs/testbed.md): the direction sign flipped in ``render_clip`` (score direction 0),
the shape prototypes swapped (shape 0).
"""

import json
import os

import numpy as np
import pytest

from qarvd_jax.testbed import data
from qarvd_jax.testbed.config import held_out_prompts, load_spec, weights_available
from qarvd_jax.testbed.score import score_video

needs_weights = pytest.mark.skipif(not weights_available(), reason="no trained testbed weights in the package "
                                   "(issue 12: the latest run misses the FP task-score bar, docs/testbed.md)")


# ------------------------------------------------------------------------------------------ data
def test_clips_are_deterministic_and_seed_dependent():
    cap = data.Caption("red", "circle", "up", "dark blue")
    a, ta = data.render_clip(cap, 5)
    b, tb = data.render_clip(cap, 5)
    c, _ = data.render_clip(cap, 6)
    assert a.shape == (81, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta.centre, tb.centre)
    assert np.any(a != c)
    # moves up at constant speed and stays inside the frame
    dy = np.diff(ta.centre[:, 1])
    assert np.all(dy < 0) and np.allclose(dy, dy[0]) and np.allclose(ta.centre[:, 0], ta.centre[0, 0])
    assert ta.centre.min() - ta.half_size >= 0 and ta.centre.max() + ta.half_size <= 64
    ns, _ = data.render_clip(cap, 5, height=48, width=80, num_frames=9)
    assert ns.shape == (9, 48, 80, 3)


@pytest.mark.parametrize("count", [8, 16, 192, 300, 960])
def test_clip_sets_cover_the_captions_evenly(count, monkeypatch):
    """Any dataset size covers min(count, #captions) distinct captions, each colour about equally often.
    (Caught bug: ``permutation(count) % #captions`` used only the first ``count`` captions, which are
    listed colour by colour: the VAE's 192-clip pool had no white or magenta object and the VAE turned
    them blue and yellow.)"""
    monkeypatch.setattr(data, "render_clip", lambda cap, seed, **kw: (np.zeros((1, 1, 1, 3), np.uint8), None))
    for caps in data.split_captions():
        drawn = [c for c, _, _ in data.clips(caps, count, 2026)]
        assert len(drawn) == count and len(set(drawn)) == min(count, len(caps))
        per_caption = np.unique([drawn.count(c) for c in set(drawn)])
        assert per_caption.max() - per_caption.min() <= 1
        if count >= 100:
            colours = [c.colour for c in drawn]
            per_colour = [colours.count(k) for k in data.COLOURS]
            assert max(per_colour) - min(per_colour) <= count // 12, per_colour
    a = [(c, s) for c, s, _ in data.clips(data.split_captions()[0], 50, 7)]
    assert a == [(c, s) for c, s, _ in data.clips(data.split_captions()[0], 50, 7)]  # deterministic
    assert a != [(c, s) for c, s, _ in data.clips(data.split_captions()[0], 50, 8)]


def test_caption_grammar_split_and_tokens():
    train, held = data.split_captions()
    assert len(train) + len(held) == 360 and len(held) == 60 and not set(train) & set(held)
    for field in ("colour", "shape", "direction", "background"):  # held-out: new combinations, known words
        assert {getattr(c, field) for c in held} <= {getattr(c, field) for c in train}
    for c in held:
        assert data.Caption.parse(c.text) == c
    with pytest.raises(ValueError, match="not a testbed caption"):
        data.Caption.parse("a red fox running through fresh snow")
    with pytest.raises(ValueError, match="unknown colour"):
        data.Caption("purple", "circle", "up", "black")
    from qarvd_jax.models.umt5 import ToyTokenizer

    words = sorted({w for c in data.all_captions() for w in c.text.split()})
    tok = ToyTokenizer(512, 16)
    assert len({tok._piece_id(w) for w in words}) == len(words)  # no two grammar words share a token


# ------------------------------------------------------------------------------------------ score
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("i", range(0, 60, 7))
def test_score_is_high_on_ground_truth_and_low_on_wrong_captions(i, size):
    cap = data.split_captions()[1][i]
    frames, _ = data.render_clip(cap, 100 + i, height=size, width=size)
    right = score_video(frames, cap.text)
    # at 32 px the smallest (5-px) objects' anti-aliased edges move the fill ratio a little (all 60
    # held-out clips with these seeds score >= 0.98 at 32 px, 1.0 at 64 px)
    assert right["task_score"] >= (0.95 if size == 64 else 0.9) and right["presence"] == 1.0, right
    other = lambda field, values: next(v for v in values if v != getattr(cap, field))
    wrong_colour = data.Caption(other("colour", data.COLOURS), cap.shape, cap.direction, cap.background)
    wrong_shape = data.Caption(cap.colour, other("shape", data.SHAPES), cap.direction, cap.background)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[cap.direction]
    wrong_dir = data.Caption(cap.colour, cap.shape, opposite, cap.background)
    assert score_video(frames, wrong_colour)["colour"] == 0.0
    assert score_video(frames, wrong_shape)["shape"] <= 0.1
    assert score_video(frames, wrong_dir)["direction"] == 0.0


def test_score_of_background_only_and_noise_is_low():
    cap = data.Caption("white", "square", "left", "black")
    frames, _ = data.render_clip(cap, 1)
    empty = np.broadcast_to(frames[:, :1, :1], frames.shape).copy()
    assert score_video(empty, cap)["task_score"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    assert score_video(noise, cap)["task_score"] < 0.5
    with pytest.raises(ValueError, match="uint8"):
        score_video(frames.astype(np.float32), cap)


# ------------------------------------------------------------------------------------------ weights
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from qarvd_jax.pipeline.text_to_video import GenerateConfig
    from qarvd_jax.workflow import build_stack

    return build_stack(GenerateConfig(preset="testbed"), str(tmp_path_factory.mktemp("testbed")))


def _latents(stack, prompts, seeds, model=None):
    from qarvd_jax.pipeline.text_to_video import TextToVideo

    t2v = stack.t2v if model is None else TextToVideo(model, stack.t2v.vae, stack.t2v.encode_prompts,
                                                      stack.t2v.pipeline.config, vae_config=stack.t2v.vae_config)
    emb = stack.embeds(prompts)
    return [t2v.generate_one(emb[i], s, stack.latent_shape, decode=False, chunk_bar=False)[0]
            for i, s in enumerate(seeds)]


@needs_weights
def test_weights_are_small_and_reproduce_the_reference_latents(stack):
    from qarvd_jax.testbed.config import resolve_weights_dir

    folder = resolve_weights_dir()
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if not f.startswith("train"))
    assert total <= 20 * 2 ** 20
    ref = load_spec().info["reference"]
    lat = _latents(stack, [ref["prompt"]], [ref["seed"]])[0]
    fc = stack.dit.config.num_frame_per_block
    assert lat.shape == (21, 16, 8, 8)
    np.testing.assert_allclose([lat[i:i + fc].mean() for i in range(0, 21, fc)], ref["chunk_mean"], atol=2e-3)
    np.testing.assert_allclose([lat[i:i + fc].std() for i in range(0, 21, fc)], ref["chunk_std"], rtol=2e-3)


@needs_weights
def test_vae_reconstructs_held_out_clips(stack):
    """The issue's bar, PSNR >= 28 dB on held-out clips, as the mean over 24 clips of every colour (and
    their median), with the streaming decode of the pipeline; no colour far below (the VAE of runs 1-5,
    trained on a pool without white or magenta objects, decoded them blue and yellow at 18-19 dB); and
    the reconstructions still show what the captions say (task score: the ceiling the DiT can reach)."""
    from qarvd_jax.testbed.train import reconstruct_clips, psnr, render_pool

    spec = load_spec()
    clips, meta = render_pool(data.split_captions()[1], 24, data_seed=99, height=spec.height, width=spec.width)
    recon = reconstruct_clips(stack.t2v.vae, clips)
    psnrs = np.array([psnr(r, c) for r, c in zip(recon, clips)])
    colours = np.array([cap.colour for cap, _ in meta])
    assert set(colours) == set(data.COLOURS)
    per_colour = {k: round(float(psnrs[colours == k].mean()), 2) for k in data.COLOURS}
    assert np.mean(psnrs) >= 28.0 and np.median(psnrs) >= 28.0, np.round(psnrs, 2)
    assert min(per_colour.values()) >= 26.0, per_colour
    ceiling = np.mean([score_video(r, cap)["task_score"] for r, (cap, _) in zip(recon, meta)])
    assert ceiling >= 0.9, ceiling


@needs_weights
def test_full_precision_task_score_on_held_out_prompts(stack):
    prompts = held_out_prompts()[20:26]
    emb = stack.embeds(prompts)
    scores = [score_video(stack.t2v.generate_one(emb[i], 500 + i, stack.latent_shape, chunk_bar=False)[1], p)
              for i, p in enumerate(prompts)]
    mean = float(np.mean([s["task_score"] for s in scores]))
    assert mean >= 0.8, json.dumps([(p, s["task_score"], s["detected"]) for p, s in zip(prompts, scores)])


@needs_weights
def test_rtn_latent_psnr_orders_bit_widths(stack):
    from qarvd_jax.eval.metrics import latent_psnr_per_chunk
    from qarvd_jax.quant.methods import load_method_config
    from qarvd_jax.workflow import quantize_copy

    prompts, seeds = held_out_prompts()[:2], [700, 701]
    fp = _latents(stack, prompts, seeds)
    psnr = {}
    for w, a in ((8, 8), (4, 8), (4, 4)):
        cfg = load_method_config("rtn", None, [f"w_bits={w}", f"a_bits={a}"])
        model, _ = quantize_copy(stack, "rtn", cfg, held_out_prompts()[2:3], seed=0)
        q = _latents(stack, prompts, seeds, model)
        psnr[(w, a)] = float(np.mean([latent_psnr_per_chunk(r, t, 3).mean() for r, t in zip(fp, q)]))
    assert psnr[(8, 8)] > psnr[(4, 8)] > psnr[(4, 4)], psnr


# ------------------------------------------------------------------------------------------ plumbing
def test_preset_testbed_runs_generate_evaluate_and_compare_with_task_scores(tmp_path, monkeypatch):
    """The whole --preset testbed path (loaders, sampler, default prompts, task_score in evaluate and
    compare) on testbed-architecture weights with a random DiT, written by ``write_weights``."""
    from flax import nnx

    from qarvd_jax.cli import main as cli
    from qarvd_jax.models.umt5 import UMT5Encoder
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.models.wan_vae import WanVAE
    from qarvd_jax.testbed import config as tb

    spec = tb.TestbedSpec(dit=tb.dit_config(num_layers=1), vae=tb.vae_config(dim=4),
                          sampler=tb.default_sampler().__class__(denoising_step_list=(1000, 500)), num_frames=3)
    tb.write_weights(str(tmp_path / "w"), spec, CausalWanModel(spec.dit, rngs=nnx.Rngs(0)),
                     WanVAE(spec.vae, rngs=nnx.Rngs(1)), UMT5Encoder(tb.umt5_config(), rngs=nnx.Rngs(2)))
    monkeypatch.setenv("QARVD_TESTBED_WEIGHTS", str(tmp_path / "w"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(held_out_prompts(2)) + "\n")
    fp, q = tmp_path / "fp", tmp_path / "q"
    assert cli(["generate", "--preset", "testbed", "--out", str(fp), "--prompts", str(prompts)]) == 0
    manifest = json.loads((fp / "generation.json").read_text())
    assert manifest["settings"]["model"] == "testbed" and manifest["settings"]["num_frames"] == 3
    assert manifest["settings"]["sampler"]["denoising_step_list"] == [1000, 500]  # the recorded sampler
    assert cli(["generate", "--preset", "testbed", "--out", str(q), "--prompts", str(prompts), "--kv-cache",
                "int8"]) == 0
    assert cli(["evaluate", "--ref", str(fp), "--test", str(q), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    agg = json.loads((tmp_path / "ev" / "report.json").read_text())["aggregate"]
    assert 0 <= agg["task_score"] <= 1 and 0 <= agg["task_score_ref"] <= 1
    assert set(agg["task_score_parts"]) == {"colour", "shape", "direction", "presence"}
    assert cli(["compare", "--preset", "testbed", "--methods", "rtn", "--bits", "w8a8", "--num-prompts", "1",
                "--out", str(tmp_path / "cmp")]) == 0
    rep = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert rep["fp"]["task_score"] is not None and rep["results"][0]["error"] is None
    assert 0 <= rep["results"][0]["task_score"] <= 1
    from qarvd_jax.cli._common import builtin_prompts

    assert builtin_prompts("testbed") == held_out_prompts() and len(held_out_prompts()) == 60  # default prompts
