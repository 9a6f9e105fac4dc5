"""``qarvd compare``: quantizer variants side by side on the same calibration data, seeds and prompts.

Per method and bit setting: quantize a copy of the full-precision DiT (same calibration prompts and
seeds for all), generate the evaluation prompts with the same seeds, evaluate against the
full-precision videos (:func:`qarvd_jax.eval.report.evaluate_folders`). A method that fails is
reported in its row (``error``) and the run goes on. Outputs in ``DIR``::

    compare.json   {"fp": {"task_score", "weight_bytes", ...},
                    "results": [{"method", "w_bits", "a_bits", "kv_cache", "latent_psnr", "psnr", "ssim",
                                 "latent_mse_per_chunk", "latent_psnr_per_chunk", "weight_bytes",
                                 "quantize_seconds", "task_score", "error"}, ...]}
    compare.md     table sorted by quality (latent PSNR, then PSNR; failed rows last)
    quality.png    latent PSNR per bit setting, one line per method
    error_per_chunk.png   latent MSE per chunk, one line per (method, bits)
    fp/  runs/<method>-w<W>a<A>[-kv<FMT>]/{videos,latents,eval}   (QAT methods: also train/, its train_log.jsonl)

QAT methods (``qvgen``, ``lsq``, ``efficientdm``: modules with ``QAT = True``) are trained for the same
``steps`` budget each on the calibration prompts (:func:`qarvd_jax.train.method_qat.train_method_copy`,
``qat_config`` the QATConfig; ``quantize_seconds`` then includes the training).

KV-cache formats (``kv_formats``, ``--kv bf16,int8,fp8,int4``): every (method, bits) runs with every
format, and each quantized format also runs alone (``method`` ``"fp"``, full-precision weights), all
against the same reference (full-precision weights, bf16 cache).

``task_score`` is the testbed's task score (:mod:`qarvd_jax.testbed.score`, in [0, 1]) of the run's
videos when the stack is the testbed (``--preset testbed``); null for any other model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

__all__ = ["parse_bits", "parse_method_overrides", "run_compare", "write_compare_markdown", "plot_compare",
           "RESULT_KEYS"]

log = logging.getLogger(__name__)

RESULT_KEYS = ("method", "w_bits", "a_bits", "kv_cache", "latent_psnr", "psnr", "ssim", "latent_mse_per_chunk",
               "latent_psnr_per_chunk", "weight_bytes", "quantize_seconds", "task_score", "error")


def parse_bits(spec: str) -> list[tuple[int, int | None]]:
    """``"w8a8,w4a8,w4a16"`` -> ``[(8, 8), (4, 8), (4, None)]`` (a16: full-precision activations)."""
    out = []
    for item in (s.strip().lower() for s in spec.split(",")):
        m = re.fullmatch(r"w(\d+)a(\d+)", item)
        if not m:
            raise ValueError(f"bit setting {item!r} is not wNaM (e.g. w4a8, w4a16 for FP activations)")
        w, a = int(m.group(1)), int(m.group(2))
        if not 2 <= w <= 16 or not 2 <= a <= 16:
            raise ValueError(f"bit setting {item!r}: widths must be in [2, 16]")
        out.append((w, None if a == 16 else a))
    if not out:
        raise ValueError("no bit setting given")
    return out


def parse_method_overrides(items: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """``["gptq.act_order=true", "iters=50"]`` -> per-method ``key=value`` lists; an item without a
    ``METHOD.`` prefix applies to every method that has that field."""
    out: dict[str, list[str]] = {n: [] for n in names}
    shared = []
    for item in items:
        key = item.split("=", 1)[0]
        if "." in key:
            meth, rest = item.split(".", 1)
            if meth not in out:
                raise ValueError(f"override {item!r}: {meth!r} is not one of the compared methods {list(names)}")
            out[meth].append(rest)
        else:
            shared.append(item)
    for n in names:
        from qarvd_jax.quant.methods import get

        fields = set(get(n).Config.__dataclass_fields__)
        out[n] = [s for s in shared if s.split("=", 1)[0] in fields] + out[n]
    return out


def _run_dir(method: str, w: int, a: int | None, kv: str = "bf16") -> str:
    return f"{method}-w{w}a{a or 16}" + ("" if kv == "bf16" else f"-kv{kv}")


def _quality_key(row: Mapping) -> tuple:
    def v(k):
        x = row.get(k)
        return -np.inf if x is None else float(x)

    return (row.get("error") is None, v("latent_psnr"), v("psnr"))


def run_compare(stack, method_names: Sequence[str], bits: Sequence[tuple[int, int | None]], prompts: Sequence[str],
                calib_prompts: Sequence[str], *, seed: int, out_dir: str,
                overrides: Mapping[str, Sequence[str]] | None = None, config_files: Mapping[str, str] | None = None,
                sensitivity=None, progress: bool = True, kv_formats: Sequence[str] = ("bf16",), steps: int = 20,
                qat_config=None) -> dict:
    """Run the comparison (see the module docstring); returns the compare.json dict."""
    import dataclasses

    from qarvd_jax.models.wan.kv_quant import check_kv_format

    from qarvd_jax.eval.report import evaluate_folders
    from qarvd_jax.pipeline.text_to_video import TextToVideo
    from qarvd_jax.quant.methods import get, load_method_config
    from qarvd_jax.quant.methods.model import model_weight_bytes
    from qarvd_jax.workflow import quantize_copy, write_json

    overrides = overrides or {}
    config_files = config_files or {}
    os.makedirs(out_dir, exist_ok=True)
    gen = stack.gen
    geom = dict(seed=seed, num_frames=gen.num_frames, height=gen.height, width=gen.width)
    fp_dir = os.path.join(out_dir, "fp")
    stack.t2v.run(list(prompts), fp_dir, **geom, settings={"method": "fp"})
    fp_bytes = int(sum(int(np.prod(v.shape)) * 2 for v in _params(stack.dit)))
    testbed = getattr(stack.t2v, "model_name", None) == "testbed"
    fp = {"task_score": _task_score(fp_dir) if testbed else None, "weight_bytes": fp_bytes,
          "num_prompts": len(prompts), "calibration_prompts": list(calib_prompts), "seed": seed, "dir": fp_dir,
          "note": ("task_score: the testbed task score" if testbed else "task_score: null (only the testbed "
                   "has a task score)") + "; weight_bytes: every DiT param at 16 bits"}
    results = []
    kv_formats = [check_kv_format(f, "--kv") for f in kv_formats] or ["bf16"]
    jobs = [("fp", 16, None, kv) for kv in kv_formats if kv != "bf16"]  # each cache format alone
    jobs += [(m, w, a, kv) for m in method_names for w, a in bits for kv in kv_formats]
    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress)
    for mname, w, a, kv in bar:
        bar.set_postfix_str(f"{mname} w{w}a{a or 16} kv {kv}")
        row = {k: None for k in RESULT_KEYS}
        row.update(method=mname, w_bits=w, a_bits=a, kv_cache=kv)
        run_dir = os.path.join(out_dir, "runs", _run_dir(mname, w, a, kv))
        try:
            t0 = time.perf_counter()
            if mname == "fp":
                name, model = "fp", stack.dit
            else:
                name = get(mname).NAME
                row["method"] = name
                cfg = load_method_config(name, config_files.get(mname), [
                    f"w_bits={w}", f"a_bits={'null' if a is None else a}", *overrides.get(mname, ())])
                if getattr(get(name), "QAT", False):  # the same --steps budget for every QAT method
                    from qarvd_jax.train.method_qat import train_method_copy

                    model = train_method_copy(stack, name, cfg, steps, calib_prompts, seed=seed, sensitivity=sensitivity,
                                              out_dir=os.path.join(run_dir, "train"), qat_config=qat_config)
                else:
                    model, _ = quantize_copy(stack, name, cfg, calib_prompts, seed=seed, sensitivity=sensitivity)
            row["quantize_seconds"] = round(time.perf_counter() - t0, 3)
            row["weight_bytes"] = fp_bytes if mname == "fp" else model_weight_bytes(model)
            sampler = dataclasses.replace(stack.t2v.pipeline.config, kv_cache=kv)
            t2v = TextToVideo(model, stack.t2v.vae, stack.t2v.encode_prompts, sampler, vae_config=stack.t2v.vae_config,
                              model_name=stack.t2v.model_name)
            t2v.run(list(prompts), run_dir, **geom, settings={"method": name, "w_bits": w, "a_bits": a, "kv_cache": kv})
            agg = evaluate_folders(fp_dir, run_dir, os.path.join(run_dir, "eval"), progress=False)["aggregate"]
            row.update(latent_psnr=agg["latent_psnr"], psnr=agg["psnr"], ssim=agg["ssim"],
                       latent_mse_per_chunk=agg["latent_mse_per_chunk"],
                       latent_psnr_per_chunk=agg.get("latent_psnr_per_chunk"),
                       task_score=_task_score(run_dir) if testbed else None)
            del model, t2v
        except Exception as e:  # noqa: BLE001 - a failing method is reported in its row, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"
            log.warning("compare: %s w%sa%s kv %s failed: %s", mname, w, a or 16, kv, row["error"])
            log.debug("%s", traceback.format_exc())
        results.append(row)
    report = {"fp": fp, "results": results}
    write_json(os.path.join(out_dir, "compare.json"), report)
    write_compare_markdown(report, os.path.join(out_dir, "compare.md"))
    plot_compare(report, out_dir)
    return report


def _task_score(folder: str):
    from qarvd_jax.testbed.score import score_folder

    scored = score_folder(folder)
    return None if scored is None else round(scored["task_score"], 4)


def _params(model):
    from flax import nnx

    return [v[...] for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_compare_markdown(report: Mapping, path: str) -> None:
    """The results as a table sorted by quality (best first; failed runs last)."""
    rows = sorted(report["results"], key=_quality_key, reverse=True)
    fp = report["fp"]
    lines = ["# qarvd compare", "",
             f"Full precision: {fp['num_prompts']} prompts, seed {fp['seed']}, weights "
             f"{fp['weight_bytes'] / 2 ** 20:.3f} MiB (16-bit); task_score: "
             f"{_fmt(fp['task_score'])}" + ("" if fp["task_score"] is not None else " (only the testbed has one)")
             + ".", "",
             "Sorted by latent PSNR vs full precision (dB), then pixel PSNR.", "",
             "| rank | method | W/A | latent PSNR | PSNR | SSIM | final-chunk latent MSE | weights MiB | "
             "quantize s | KV cache | task score | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        mse = r.get("latent_mse_per_chunk")
        wb = r.get("weight_bytes")
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {i} | {r['method']} | W{r['w_bits']}A{r['a_bits'] or 16} | {_fmt(r.get('latent_psnr'), 2)} | "
                     f"{_fmt(r.get('psnr'), 2)} | {_fmt(r.get('ssim'), 4)} | "
                     f"{_fmt(mse[-1], 6) if mse else '-'} | {_fmt(wb / 2 ** 20 if wb else None, 3)} | "
                     f"{_fmt(r.get('quantize_seconds'), 1)} | {r.get('kv_cache') or 'bf16'} | "
                     f"{_fmt(r.get('task_score'))} | {err or '-'} |")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def plot_compare(report: Mapping, out_dir: str) -> None:
    """quality.png (latent PSNR per bit setting per method) and error_per_chunk.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r.get("error") is None and r.get("latent_psnr") is not None]
    settings = list(dict.fromkeys(f"W{r['w_bits']}A{r['a_bits'] or 16}" for r in report["results"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    kv = lambda r: "" if (r.get("kv_cache") or "bf16") == "bf16" else f" kv {r['kv_cache']}"
    for m in dict.fromkeys(r["method"] + kv(r) for r in ok):
        pts = [(settings.index(f"W{r['w_bits']}A{r['a_bits'] or 16}"), r["latent_psnr"]) for r in ok
               if r["method"] + kv(r) == m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xticks(range(len(settings)), settings)
    _finish_plot(plt, fig, ax, "bit setting", "latent PSNR vs FP (dB)", "quality per bit setting", bool(ok), 8,
                 os.path.join(out_dir, "quality.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        mse = r.get("latent_mse_per_chunk") or []
        ax.plot(range(len(mse)), mse, marker=".", label=f"{r['method']} W{r['w_bits']}A{r['a_bits'] or 16}{kv(r)}")
    ax.set_yscale("log")
    _finish_plot(plt, fig, ax, "chunk", "latent MSE vs FP", "error per chunk", bool(ok), 6,
                 os.path.join(out_dir, "error_per_chunk.png"))


def _finish_plot(plt, fig, ax, xlabel: str, ylabel: str, title: str, legend: bool, legend_size: int, path: str):
    """Labels, optional legend, then save and close."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_compare(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
