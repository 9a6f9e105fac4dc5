"""`qarvd demo` end to end (the README's main job), with reduced sizes."""

import json
import os

import numpy as np

from qarvd_jax.cli import main as cli


def test_demo_writes_report_with_sensitivity_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--num-prompts", "2", "--recon-iters", "20", "--qat-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    s = np.asarray(report["sensitivity"])
    assert s.shape == (2,) and abs(s.sum() - 1) < 1e-9 and np.all(s > 0)
    assert set(report["metrics"]) == {"ptq", "qat"}
    for m in report["metrics"].values():
        assert m["num_video_pairs"] == 2 and m["num_latent_pairs"] == 2
        assert 0 < m["latent_mse"] < 1 and 0 < m["ssim"] <= 1 and m["psnr"] > 10
    for name in ("sensitivity/sensitivity.png", "eval_ptq/report.md", "eval_ptq/error_per_chunk.png",
                 "ptq/quantized", "qat/quantized", "videos_fp/generation.json"):
        assert os.path.exists(out / name), name
    assert "report.json" in capsys.readouterr().out
