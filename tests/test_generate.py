"""`qarvd generate` on the built-in tiny model: files, determinism and bad input."""

import json
import os
import warnings

import imageio.v3 as iio
import numpy as np
import pytest

from qarvd_jax.cli import main as cli
from qarvd_jax.pipeline.text_to_video import GenerateConfig, build_text_to_video, read_prompts, video_stem

ARGS = ["--num-frames", "6", "--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    prompts = d / "prompts.txt"
    prompts.write_text("a red fox in snow\n\na red fox in snow\nclouds / over hills\n")
    out = d / "out"
    assert cli(["generate", "--prompts", str(prompts), "--out", str(out), "--seed", "7", *ARGS]) == 0
    return prompts, out


def test_writes_decodable_videos_latents_and_manifest(generated):
    _, out = generated
    manifest = json.loads((out / "generation.json").read_text())
    stems = [v["stem"] for v in manifest["videos"]]
    assert stems == ["a red fox in snow-0", "a red fox in snow-1", "clouds   over hills-0"]
    assert [v["seed"] for v in manifest["videos"]] == [7, 8, 9]
    for stem in stems:
        frames = np.stack(list(iio.imiter(out / "videos" / f"{stem}.mp4")))
        assert frames.shape == (1 + 4 * 5, 32, 48, 3) and frames.dtype == np.uint8  # 6 latent -> 21 frames
        lat = np.load(out / "latents" / f"{stem}.npz")
        assert lat["latents"].shape == (6, 16, 4, 6) and int(lat["chunk_frames"]) == 3
        assert np.isfinite(lat["latents"]).all()
    assert not [f for f in os.listdir(out / "videos") if not f.endswith(".mp4")]  # no temp leftovers


def test_same_seed_same_latents(generated, tmp_path):
    prompts, out = generated
    out2 = tmp_path / "again"
    assert cli(["generate", "--prompts", str(prompts), "--out", str(out2), "--seed", "7", *ARGS]) == 0
    a = np.load(out / "latents" / "a red fox in snow-0.npz")["latents"]
    b = np.load(out2 / "latents" / "a red fox in snow-0.npz")["latents"]
    np.testing.assert_array_equal(a, b)
    c = np.load(out / "latents" / "a red fox in snow-1.npz")["latents"]  # same prompt, other seed
    assert not np.allclose(a, c)


def test_bad_prompt_files(tmp_path, capsys):
    assert cli(["generate", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)


def test_bad_geometry_and_checkpoint(tmp_path, fixtures_dir):
    t2v, cfg = build_text_to_video(GenerateConfig(), str(tmp_path))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        t2v.latent_shape(6, 8 * 3, 32)  # latent height 3 is not a multiple of 2
    with pytest.raises(ValueError, match="VAE stride"):
        t2v.latent_shape(6, 30, 32)
    with pytest.raises(ValueError, match="chunk size"):
        t2v.latent_shape(4, 32, 32)
    with pytest.raises(ValueError, match="RoPE"):
        t2v.latent_shape(3 * 400, 32, 32)
    with pytest.raises(ValueError, match="needs --checkpoint, --t5, --vae and --tokenizer"):
        build_text_to_video(GenerateConfig(checkpoint=f"{fixtures_dir}/selfforcing_tiny/checkpoint.pt"),
                            str(tmp_path))
    from convert.wan_dit import load_model
    from qarvd_jax.models.wan.config import WanDiTConfig

    with pytest.raises(ValueError, match="contradicts the config"):
        load_model(f"{fixtures_dir}/selfforcing_tiny/checkpoint.pt", WanDiTConfig.tiny(dim=128, num_heads=4))


def test_unwritable_output_folder(tmp_path, monkeypatch):
    t2v, _ = build_text_to_video(GenerateConfig(), str(tmp_path / "x"))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as for a read-only folder (root bypasses chmod)
    with pytest.raises(PermissionError, match="not writable"):
        t2v.run(["a"], str(tmp_path / "ro"), num_frames=6, height=32, width=32)


def test_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    blocker = tmp_path / "out"
    blocker.write_text("i am a file")
    assert cli(["generate", "--prompts", str(prompts), "--out", str(blocker), *ARGS]) == 2
    assert "cannot create output folder" in capsys.readouterr().err
    assert blocker.read_text() == "i am a file"


def test_long_prompt_is_truncated_with_a_warning(tmp_path):
    t2v, _ = build_text_to_video(GenerateConfig(), str(tmp_path))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        emb = t2v.encode_prompts(["word " * 100])
    assert emb.shape == (1, 16, 32)
    assert any("trunc" in str(x.message).lower() for x in w)


def test_video_stem_sanitising():
    assert video_stem("a/b\\c\n", 2) == "a b c-2"
    long = "é" * 200
    stem = video_stem(long, 0)
    assert len(stem.encode()) <= 182 and stem.endswith("-0")


def test_builtin_tiny_model_is_the_same_in_every_dtype(tmp_path):
    import ml_dtypes

    from qarvd_jax.models.wan.loading import model_params

    a, _ = build_text_to_video(GenerateConfig(dtype="float32"), str(tmp_path))
    b, _ = build_text_to_video(GenerateConfig(dtype="bfloat16"), str(tmp_path))
    pa, pb = model_params(a.dit), model_params(b.dit)
    k32 = pa["blocks"][1]["ffn"]["layers"][0]["kernel"]
    k16 = pb["blocks"][1]["ffn"]["layers"][0]["kernel"]
    assert k16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k16, k32.astype(ml_dtypes.bfloat16))


def test_prompt_embedding_cache_of_a_url_output_is_local(tmp_path, monkeypatch):
    """A gs:// run folder (QAT through etils.epath) must not turn into a local ./gs: cache folder."""
    import tempfile

    from qarvd_jax.pipeline.text_to_video import embed_cache_dir

    monkeypatch.chdir(tmp_path)
    a = embed_cache_dir(GenerateConfig(), "gs://bucket/run")
    b = embed_cache_dir(GenerateConfig(), "gs://bucket/other")
    assert os.path.isabs(a) and a.startswith(tempfile.gettempdir()) and a != b and "gs:" not in a
    assert embed_cache_dir(GenerateConfig(), "runs/x") == os.path.join("runs/x", "prompt_embeds_cache")
    assert embed_cache_dir(GenerateConfig(embed_cache_dir="/c"), "gs://bucket/run") == "/c"
