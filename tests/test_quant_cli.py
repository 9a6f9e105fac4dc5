"""The workflow commands on the tiny model: outliers, sensitivity, quantize, generate --quantized."""

import json

import numpy as np
import pytest

from qarvd_jax.cli import main as cli
from qarvd_jax.quant.outliers import detect_outliers

GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]


def test_outliers_command(tmp_path, fixtures_dir, capsys):
    ckpt = f"{fixtures_dir}/selfforcing_tiny/checkpoint.pt"
    out = tmp_path / "o.json"
    assert cli(["outliers", ckpt, "--json", str(out), "--align", "8", "--plot", str(tmp_path / "o.png")]) == 0
    rep = json.loads(out.read_text())
    names = {f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    names |= {f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)}
    assert set(rep["layers"]) == names
    from convert.wan_dit import read_dit_checkpoint

    state, _ = read_dit_checkpoint(ckpt)
    for name, rec in rep["layers"].items():
        want = detect_outliers(state[name + ".weight"], "mad_zscore", align=8)
        assert rec["n_outlier"] == want.count and rec["n_outlier"] % 8 == 0
        assert rec["channels"] == [int(c) for c in want.channels]
    assert (tmp_path / "o.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "ffn.0" in printed and "%" in printed
    # the same report from an Orbax checkpoint
    assert cli(["convert", ckpt, str(tmp_path / "orb"), "--preset", "tiny"]) == 0
    assert cli(["outliers", str(tmp_path / "orb"), "--json", str(tmp_path / "o2.json"), "--align", "8"]) == 0
    assert json.loads((tmp_path / "o2.json").read_text())["layers"] == rep["layers"]
    assert cli(["outliers", ckpt, "--json", str(tmp_path / "x.json"), "--method", "iqr"]) == 0


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    d = tmp_path_factory.mktemp("wf")
    prompts = d / "prompts.txt"
    prompts.write_text("a fox\nclouds over hills\na boat on a river\n")
    assert cli(["sensitivity", "--out", str(d / "sens"), "--prompts", str(prompts), "--num-prompts", "2", *GEOM,
                "iters=10"]) == 0
    assert cli(["quantize", "--out", str(d / "q"), "--prompts", str(prompts), *GEOM, "--sensitivity",
                str(d / "sens" / "sensitivity.json"), "iters=30", "align=8"]) == 0
    return d, prompts


def test_sensitivity_is_normalised_per_chunk(workflow):
    d, _ = workflow
    res = json.loads((d / "sens" / "sensitivity.json").read_text())
    s = np.asarray(res["sensitivity"])
    assert s.shape == (2,) and np.all(s > 0) and abs(s.sum() - 1) < 1e-9
    assert len(res["prompts"]) == 2 and (d / "sens" / "sensitivity.png").exists()


def test_quantize_writes_checkpoint_and_summary(workflow):
    d, _ = workflow
    summary = json.loads((d / "q" / "quantize.json").read_text())
    assert summary["method"] == "qarvd" and summary["recipe"]["iters"] == 30
    assert len(summary["chunk_weights"]) == 2 and abs(np.mean(summary["chunk_weights"]) - 1) < 1e-6
    assert set(summary["reconstruction"]) == {n for n, c in summary["layers"].items() if c["reconstruct"]}
    assert (d / "q" / "quantized").is_dir()
    assert cli(["quantize", "--out", str(d / "q"), *GEOM]) == 2  # exists without --overwrite


def test_generate_with_quantized_model(workflow):
    d, prompts = workflow
    assert cli(["generate", "--prompts", str(prompts), "--out", str(d / "fp"), *GEOM]) == 0
    assert cli(["generate", "--prompts", str(prompts), "--out", str(d / "gq"), "--quantized", str(d / "q"), *GEOM]) == 0
    a = np.load(d / "fp" / "latents" / "a fox-0.npz")["latents"]
    b = np.load(d / "gq" / "latents" / "a fox-0.npz")["latents"]
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert np.mean((a - b) ** 2) < 0.5 * np.var(a)  # quantized, yet close to full precision
    meta = json.loads((d / "gq" / "generation.json").read_text())
    assert meta["settings"]["quantized"] == str(d / "q")


def test_bad_config_override(tmp_path, capsys):
    assert cli(["quantize", "--out", str(tmp_path), *GEOM, "wbits=3"]) == 2
    assert "unknown QARVDConfig fields ['wbits']" in capsys.readouterr().err
