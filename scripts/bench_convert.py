#!/usr/bin/env python
"""Peak host memory of converting a real-size (1.3B) DiT checkpoint: PyTorch -> Orbax -> safetensors.

Writes a synthetic checkpoint with the real Self-Forcing 1.3B key names and shapes (random float32
values, 5.68 GB), then runs each conversion in a fresh subprocess and reports its peak RSS, wall time
and the ratio to the weights' size. ``--format pt`` writes a ``{'generator_ema': {'model.*': ...}}``
torch file (needs torch for *writing* the synthetic input only; the conversion itself never imports
torch); ``--format safetensors`` needs nothing extra.

    python scripts/bench_convert.py --workdir /tmp/bench_convert [--format pt] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.params import param_specs


def _tensors(cfg, dtype, seed=0):
    rng = np.random.default_rng(seed)
    for s in param_specs(cfg):
        yield "model." + s.torch_key, (rng.standard_normal(s.torch_shape, dtype=np.float32) * 0.02).astype(dtype)


def write_synthetic(path: str, fmt: str, dtype) -> int:
    cfg = WanDiTConfig.selfforcing_1_3b()
    if fmt == "safetensors":
        from convert.state_dict_io import write_safetensors_streaming

        entries = [("model." + s.torch_key, s.torch_shape, np.dtype(dtype)) for s in param_specs(cfg)]
        write_safetensors_streaming(path, entries, _tensors(cfg, dtype), overwrite=True)
    else:
        import torch

        from convert.state_dict_io import torch_tensors

        torch.save({"generator_ema": torch_tensors(dict(_tensors(cfg, dtype)))}, path)
    return sum(int(np.prod(s.torch_shape)) for s in param_specs(cfg)) * np.dtype(dtype).itemsize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/qarvd_bench_convert")
    ap.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    src = os.path.join(args.workdir, f"synthetic_1_3b.{args.format}")
    t0 = time.perf_counter()
    nbytes = write_synthetic(src, args.format, dtype)
    print(f"synthetic checkpoint {src}: {nbytes / 2**30:.2f} GiB of weights ({time.perf_counter() - t0:.0f} s)")
    orbax_dir = os.path.join(args.workdir, "orbax")
    back = os.path.join(args.workdir, "back.safetensors")
    for p in (orbax_dir, back):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    rows = []
    for name, cmd in (("torch -> orbax", ["convert", src, orbax_dir, "--preset", "selfforcing_1_3b"]),
                      ("orbax -> safetensors", ["convert", orbax_dir, back])):
        # ru_maxrss of RUSAGE_CHILDREN is a max over all children: run each step in its own parent
        wrapper = [sys.executable, "-c",
                   "import resource,subprocess,sys;subprocess.run(sys.argv[1:],check=True);"
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
                   sys.executable, "-m", "qarvd_jax.cli", *cmd]
        t1 = time.perf_counter()
        out = subprocess.run(wrapper, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        peak = int(out[-1]) / 2**20
        rows.append((name, peak, time.perf_counter() - t1))
    print("| step | peak RSS (GiB) | x weights | seconds |\n|---|---|---|---|")
    for name, peak, sec in rows:
        print(f"| {name} | {peak:.2f} | {peak / (nbytes / 2**30):.2f} | {sec:.0f} |")
    if not args.keep:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
