"""Two QAT processes on localhost (2 CPU devices each, gloo collectives, mesh data=2,fsdp=2): train 2
steps and checkpoint, resume to step 4, write OUT/quantized, all under a timeout; then a resume on a
different process count is refused. Every process is killed if the run exceeds the timeout, so the
test can fail but never hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

OVERRIDES = ["batch_size=4", "compute_dtype=float32", "hist_bins=2048", "align=8", "warmup_steps=1",
             "lr_schedule_steps=4", "checkpoint_every=2", "resample_noise=false", "async_checkpointing=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, steps: int, nproc: int, timeout: float, mesh: str = "data=2,fsdp=2"):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // nproc}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    procs = []
    for i in range(nproc):
        cmd = [sys.executable, "-c", "import sys; from qarvd_jax.cli import main; sys.exit(main(sys.argv[1:]))", "quantize", "--method", "qat", "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id", str(i), "--mesh", mesh,
               "--steps", str(steps), "--out", str(out), "--num-frames", "6", "--height", "32", "--width", "32",
               *OVERRIDES]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            outputs.append(p.communicate(timeout=left)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-3000:] for p in procs]
        pytest.fail(f"{nproc}-process QAT run did not finish in {timeout:.0f} s (hang?):\n" + "\n----\n".join(logs))
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
def test_two_processes_train_resume_and_export(tmp_path):
    out = tmp_path / "qat"
    codes, logs = _run(out, 2, 2, timeout=420)
    assert codes == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    codes, logs = _run(out, 4, 2, timeout=420)
    assert codes == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert "resumed from step 2 -> step 4" in logs[0]
    assert (out / "quantized").is_dir()
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    from qarvd_jax.quant.checkpoint import load_quantized_model

    _, meta = load_quantized_model(str(out / "quantized"))
    assert meta["method"] == "qat" and meta["steps"] == 4
    # one process cannot continue a 2-process run: a clear error, not another data order
    codes, logs = _run(out, 6, 1, timeout=300, mesh="data=2,fsdp=2")
    assert codes == [2] and "written by 2 processes, this run has 1" in logs[0], logs[0][-3000:]
