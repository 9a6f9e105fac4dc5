"""`qarvd demo` end to end (the README's main job) on the trained testbed, with reduced sizes; and on tiny."""

import json
import os

import numpy as np
import pytest

from extended import extended
from qarvd_jax.cli import main as cli
from qarvd_jax.testbed.config import weights_available


@pytest.mark.skipif(not weights_available(), reason="testbed weights not trained")
def test_demo_on_the_testbed_writes_report_with_decaying_sensitivity_and_task_score(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--preset", "testbed", "--out", str(out), "--num-prompts", "2", "--recon-iters", "20",
                "--qat-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    s = np.asarray(report["sensitivity"])
    assert s.shape == (7,) and abs(s.sum() - 1) < 1e-9 and np.all(s > 0)
    # the chunk-sensitivity decay Q-ARVD is built on: chunk 0 dominates, the late chunks matter least
    assert np.argmax(s) == 0 and s[0] > 2 * s[-1] and s[:3].sum() > s[-3:].sum(), s
    assert set(report["metrics"]) == {"ptq", "qat"}
    for m in report["metrics"].values():
        assert m["num_video_pairs"] == 2 and m["num_latent_pairs"] == 2
        assert 0 < m["ssim"] <= 1 and m["psnr"] > 10
        assert 0 <= m["task_score"] <= 1 and m["task_score_ref"] is not None
        assert set(m["task_score_parts"]) == {"colour", "shape", "direction", "presence"}
    for name in ("sensitivity/sensitivity.png", "eval_ptq/report.md", "eval_ptq/error_per_chunk.png",
                 "ptq/quantized", "qat/quantized", "videos_fp/generation.json"):
        assert os.path.exists(out / name), name
    assert "task score" in (out / "eval_ptq" / "report.md").read_text()
    assert "report.json" in capsys.readouterr().out


@extended("~100 s on 2 shared cores; the demo path itself is covered on the testbed above, this adds the tiny preset")
def test_demo_on_tiny_writes_report_with_sensitivity_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--preset", "tiny", "--out", str(out), "--num-prompts", "2", "--recon-iters", "20",
                "--qat-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    s = np.asarray(report["sensitivity"])
    assert s.shape == (2,) and abs(s.sum() - 1) < 1e-9 and np.all(s > 0)
    for m in report["metrics"].values():
        assert 0 < m["latent_mse"] < 1 and m["task_score"] is None
    assert "report.json" in capsys.readouterr().out
