"""`qarvd compare` on the tiny model: compare.json schema, sorted compare.md, plots, a failing run in its row."""

import json

import pytest

from qarvd_jax.cli import main as cli
from qarvd_jax.compare import RESULT_KEYS, parse_bits, parse_method_overrides

GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]


def test_parse_bits_and_overrides():
    assert parse_bits("w8a8, W4A8,w4a16") == [(8, 8), (4, 8), (4, None)]
    with pytest.raises(ValueError, match="wNaM"):
        parse_bits("int8")
    o = parse_method_overrides(["gptq.act_order=true", "alpha=0.7"], ["gptq", "smoothquant"])
    assert o == {"gptq": ["act_order=true"], "smoothquant": ["alpha=0.7"]}
    with pytest.raises(ValueError, match="not one of the compared methods"):
        parse_method_overrides(["rtn.w_bits=4"], ["gptq"])


def test_compare_command(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "cmp"
    assert cli(["compare", "--methods", "rtn,svdquant", "--bits", "w8a8,w4a8", "--out", str(out),
                "--prompts", str(prompts), *GEOM, "svdquant.group_size=48"]) == 0
    rep = json.loads((out / "compare.json").read_text())
    assert set(rep) == {"fp", "results"} and rep["fp"]["task_score"] is None
    rows = rep["results"]
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in rows] == [
        (m, w, 8) for m in ("rtn", "svdquant") for w in (8, 4)]
    for r in rows:
        assert set(r) == set(RESULT_KEYS)
        if r["method"] == "svdquant":  # planted failure: reported in its row, the run went on
            assert "group_size=48" in r["error"] and r["latent_psnr"] is None
            continue
        assert r["error"] is None and r["task_score"] is None
        assert r["latent_psnr"] > 20 and r["psnr"] > 10 and 0 < r["ssim"] <= 1
        assert len(r["latent_mse_per_chunk"]) == 2 and r["quantize_seconds"] > 0
        assert r["weight_bytes"] < rep["fp"]["weight_bytes"]
    by = {(r["method"], r["w_bits"]): r for r in rows}
    assert by["rtn", 4]["weight_bytes"] < by["rtn", 8]["weight_bytes"]
    assert by["rtn", 8]["latent_psnr"] > by["rtn", 4]["latent_psnr"]
    # the markdown table is sorted by quality, failed runs last
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 4 and all("svdquant" in line for line in table[-2:])
    psnrs = [float(line.split("|")[4]) for line in table[:2]]
    assert psnrs == sorted(psnrs, reverse=True)
    for png in ("quality.png", "error_per_chunk.png"):
        assert (out / png).stat().st_size > 1000
    assert "2 of 4 runs failed" in capsys.readouterr().out
    assert cli(["compare", "--methods", "rtn,awq", "--out", str(tmp_path / "x"), *GEOM]) == 2  # unknown method
