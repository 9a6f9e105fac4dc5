"""Per-device memory of QAT and calibration at a real geometry, from compiled programs (no data).

Compiles the real QAT train step (``QATTrainer.step_fn``) with abstract inputs (sharded
``jax.ShapeDtypeStruct``), for a model preset, a latent geometry, a mesh (simulated CPU devices) and a
number of videos per device, and prints ``memory_analysis()`` of the compiled program (per-device
argument, temp and total bytes) beside an analytic breakdown (weights, optimiser, caches,
activations). Calibration: the host bytes of the recorded layer inputs under the planned layer groups
(``calib_memory_gb``; :func:`qarvd_jax.quant.calibration.plan_calibration`) and the device bytes of one
compiled calibration call (a quantized ``forward_chunk``).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/plan_memory.py \\
        --preset selfforcing_1_3b --mesh fsdp=8 --json plan.json

``--method qvgen|lsq|efficientdm`` plans that QAT method's step (:mod:`qarvd_jax.train.method_qat`: full
fine-tune student with the method's layers, separate full-precision teacher; method ``Config`` fields go
with the ``key=value`` overrides, e.g. ``w_bits=3 a_bits=3``) instead of Q-ARVD's QAT (``qat``, default);
the calibration plan is Q-ARVD's and is skipped for the methods.

``--dual-scale`` plans Q-ARVD's default ``dual_scale=true`` (the planner's default stays ``dual_scale=false``):
every eligible block layer gets K outlier input channels, K a multiple of the recipe's ``align`` drawn per
layer and block from ``--dual-seed`` (0 = single-scale, up to ``--dual-max-groups`` x align, at most half the
channels), so blocks differ; QAT trains them in the mask form (:mod:`qarvd_jax.quant.stackable`), scanned.
The JSON then also has ``qat.dual_scale`` (layer counts, K values, whether the blocks are scanned).

``--json FILE`` writes ``{"qat": {"per_device_bytes": {"arguments", "temp", "total" (= arguments + temp),
"output", "alias", "peak" (XLA's peak_memory_in_bytes)}, "mesh": {...},
"videos_per_device": n, "method": ..., ...}, "calibration": {"host_bytes": H, "device_bytes": D, ...}}``.
Figures are XLA:CPU's buffer assignment (see docs/benchmarks.md for the caveats).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

GIB = 1024 ** 3


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="selfforcing_1_3b", help="WanDiTConfig preset (selfforcing_1_3b, tiny)")
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks (quick checks)")
    p.add_argument("--latent", default=None, help="latent frames,height,width (default: 21,60,104 for the 1.3B "
                   "preset = 480x832 px; 6,4,4 for tiny)")
    p.add_argument("--mesh", default="", help="mesh, e.g. fsdp=8 or data=2,fsdp=4 (default: all devices on fsdp)")
    p.add_argument("--videos-per-device", type=int, default=1)
    p.add_argument("--config", default=None, help="QAT config YAML")
    p.add_argument("--method", default="qat", choices=["qat", "qvgen", "lsq", "efficientdm"],
                   help="the QAT step to plan: Q-ARVD's QAT (default) or a QAT method of qarvd_jax.quant.methods")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--calib-prompts", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--dual-scale", action="store_true", help="plan dual_scale=true with synthetic outlier counts "
                   "per layer and block (K a multiple of align, from --dual-seed)")
    p.add_argument("--dual-seed", type=int, default=0, help="seed of the synthetic outlier counts (--dual-scale)")
    p.add_argument("--dual-max-groups", type=int, default=4, help="K is at most this many x align (--dual-scale)")
    p.add_argument("--count-gathers", action="store_true", help="also count the compiled step's all-gathers by "
                   "dtype, in the entry computation and in loop bodies (weights gathered per layer or whole)")
    p.add_argument("overrides", nargs="*", help="QATConfig key=value overrides (with --method: also the method's "
                   "Config fields)")
    return p.parse_args(argv)


def build(args):
    """(trainer, model, cfg, mesh, latent_shape, sampler) with abstract weights."""
    import jax
    from flax import nnx

    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.pipeline.causal_inference import InferenceConfig
    from qarvd_jax.quant.qlinear import quantize_model
    from qarvd_jax.train import sharding as shd
    from qarvd_jax.train.config import load_qat_config
    from qarvd_jax.train.qat import QATTrainer

    base = getattr(WanDiTConfig, args.preset)()
    if args.layers:
        base = base.replace(num_layers=args.layers)
    latent = args.latent or ("21,60,104" if base.dim >= 1024 else "6,4,4")
    f, h, w = (int(v) for v in latent.split(","))
    latent_shape = (f, base.in_dim, h, w)
    mesh_spec = args.mesh or f"fsdp={jax.device_count()}"
    mesh = shd.make_mesh(mesh_spec)
    method_overrides, qat_overrides = [], list(args.overrides)
    if args.method != "qat":
        from qarvd_jax.train.method_qat import split_overrides

        method_overrides, qat_overrides = split_overrides(args.method, args.overrides)
    rules = shd.rules_table(load_qat_config(args.config, qat_overrides).logical_axis_rules)
    shards = math.prod(mesh.shape[a] for a in rules.get("batch", ()))
    if args.dual_scale and args.method != "qat":
        raise SystemExit("--dual-scale plans Q-ARVD's QAT (--method qat)")
    overrides = [f"batch_size={args.videos_per_device * shards}", f"mesh={mesh_spec}",
                 f"dual_scale={'true' if args.dual_scale else 'false'}", *qat_overrides]
    cfg = load_qat_config(args.config, overrides)
    mcfg = base.replace(param_dtype="float32", dtype=cfg.compute_dtype, attention=cfg.attention)
    sampler = InferenceConfig()
    if args.method == "qat":
        model = nnx.eval_shape(lambda: CausalWanModel(mcfg, rngs=nnx.Rngs(0)))
        outliers = synthetic_outliers(model, cfg.recipe(), args.dual_seed, args.dual_max_groups) \
            if args.dual_scale else {}
        quantize_model(model, cfg.recipe().rules(), outliers=outliers)
        trainer = QATTrainer(model, cfg, mesh, latent_shape, sampler, abstract=True)
    else:
        from qarvd_jax.quant.methods import load_method_config
        from qarvd_jax.train.method_qat import MethodHooks

        hooks = MethodHooks(args.method, load_method_config(args.method, None, method_overrides), cfg)
        model = hooks.abstract_student(base)
        trainer = QATTrainer(model, cfg, mesh, latent_shape, sampler, abstract=True, hooks=hooks)
    return trainer, model, cfg, mesh, latent_shape, sampler, mcfg


def synthetic_outliers(model, recipe, seed: int, max_groups: int) -> dict:
    """``name -> sorted outlier channels`` for the dual-scale-eligible block layers: K = align x j, j uniform in
    [0, max_groups] per layer and block (deterministic from ``seed``), capped at half the input channels."""
    import zlib

    import numpy as np
    from flax import nnx

    from qarvd_jax.models.wan.params import flax_path_to_torch_name
    from qarvd_jax.quant.recipe import match_rule

    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Linear):
            continue
        name = flax_path_to_torch_name(path)
        rule = match_rule(name, recipe.rules())
        if rule is None or not rule.dual_scale or not name.startswith("blocks."):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        k = min(recipe.align * int(rng.integers(0, max_groups + 1)), node.in_features // 2)
        if k:
            out[name] = np.sort(rng.choice(node.in_features, k, replace=False)).astype(np.int32)
    return out


def dual_scale_summary(trainer) -> dict:
    """What the planned step trains: dual-scale layers (gather form), the mask form's layers, scanned or not."""
    ks = [c.n_outlier for c in trainer.layer_configs.values() if c.n_outlier]
    return {"dual_scale_layers": len(ks), "layers": len(trainer.layer_configs), "k_min": min(ks, default=0),
            "k_max": max(ks, default=0), "k_distinct": len(set(ks)), "mask_form_layers": len(trainer.mask_layers),
            "scanned": bool(trainer.distiller.scanned)}


def analytic(trainer, cfg, mcfg, mesh, latent_shape, vpd: int) -> dict:
    """Back-of-the-envelope per-device bytes (the compiled figures are the reference)."""
    import jax
    import numpy as np

    size = lambda t: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
    fsdp = mesh.shape["fsdp"] * mesh.shape["tensor"]
    f, c, h, w = latent_shape
    fsl = mcfg.frame_seq_length(h, w)
    cache = 2 * mcfg.num_layers * f * fsl * mcfg.num_heads * mcfg.head_dim * np.dtype(mcfg.dtype).itemsize
    opt = size(jax.eval_shape(trainer.tx.init, trainer._host_trainable))
    block_in = mcfg.num_layers * mcfg.num_frame_per_block * fsl * mcfg.dim * np.dtype(mcfg.dtype).itemsize
    out = {"weights_sharded": size(trainer._host_frozen) // fsdp + size(trainer._host_trainable) // fsdp,
           "optimizer_sharded": opt // fsdp,
           "kv_caches_teacher_and_student": 2 * cache * vpd,
           "block_inputs_saved": block_in * vpd}
    if trainer.hooks is not None:  # a method's separate full-precision teacher (compute dtype)
        out["teacher_weights_sharded"] = size(trainer.teacher) // fsdp
    return out


def count_gathers(hlo: str) -> dict:
    """All-gathers of the compiled HLO by dtype: ``{"entry": {...}, "loops": {...}}``."""
    import collections
    import re

    comps = re.split(r"\n(?=\S.*\{\n)", hlo)
    entry = "".join(c for c in comps if c.startswith("ENTRY"))
    find = lambda text: collections.Counter(re.findall(r"= (\w+)\[[\d,]*\][^\n]*all-gather\(", text))
    ent, total = find(entry), find(hlo)
    return {"entry": dict(ent), "loops": dict(total - ent)}


def compile_qat(trainer, gathers: bool = False) -> tuple[dict, float]:
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(*trainer.abstract_step_args()).compile()
    ma = compiled.memory_analysis()
    a, t = int(ma.argument_size_in_bytes), int(ma.temp_size_in_bytes)
    out = {"arguments": a, "temp": t, "total": a + t, "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "peak": int(getattr(ma, "peak_memory_in_bytes", 0) or 0)}
    if gathers:
        out["all_gathers"] = count_gathers(compiled.as_text())
    return out, time.perf_counter() - t0


def calibration(model, cfg, mcfg, latent_shape, sampler, prompts: int) -> dict:
    """Host bytes of the planned calibration groups; device bytes of one compiled calibration call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qarvd_jax.quant.calibration import plan_calibration

    f, c, h, w = latent_shape
    fsl = mcfg.frame_seq_length(h, w)
    num_chunks = f // mcfg.num_frame_per_block
    calls = num_chunks * (len(sampler.denoising_step_list) + 1)
    plan = plan_calibration(model, cfg.recipe(), videos=prompts, calls_per_video=calls,
                            tokens_per_call=mcfg.num_frame_per_block * fsl, frames_per_call=mcfg.num_frame_per_block)
    # one calibration call on device: the quantized model (deployed dtype) over one chunk, KV cache
    dmodel_cfg = mcfg.replace(param_dtype=mcfg.dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(mcfg.dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) and x.ndim >= 2 else x.dtype), state)
    fc = mcfg.num_frame_per_block

    def call(state, x, t, ctx):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(1, f, fsl)
        return m.forward_chunk(x, t, m.cross_kv(ctx), cache, 0)[0]

    args = (state, jax.ShapeDtypeStruct((1, fc, c, h, w), jnp.dtype(mcfg.dtype)),
            jax.ShapeDtypeStruct((1, fc), jnp.float32), jax.ShapeDtypeStruct((1, mcfg.text_len, mcfg.text_dim),
                                                                            jnp.float32))
    del dmodel_cfg
    ma = jax.jit(call).lower(*args).compile().memory_analysis()
    dev = int(ma.argument_size_in_bytes + ma.temp_size_in_bytes)
    return {"host_bytes": int(plan.peak_bytes), "device_bytes": dev, "budget_bytes": int(plan.budget_bytes),
            "groups": len(plan.groups), "max_tokens": plan.max_tokens,
            "all_at_once_bytes": int(plan.total_bytes)}


def _ensure_devices(mesh: str) -> None:
    """Simulated CPU devices for the mesh when XLA_FLAGS does not set a count (before jax starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if mesh and "xla_force_host_platform_device_count" not in flags and "jax" not in sys.modules:
        n = math.prod(int(part.split("=")[1]) for part in mesh.split(",") if "=" in part)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    args = _parse(argv if argv is not None else sys.argv[1:])
    _ensure_devices(args.mesh)
    import jax

    trainer, model, cfg, mesh, latent_shape, sampler, mcfg = build(args)
    qat, secs = compile_qat(trainer, args.count_gathers)
    out = {"qat": {"per_device_bytes": {k: qat[k] for k in ("arguments", "temp", "total", "output", "alias", "peak")},
                   "mesh": dict(mesh.shape),
                   "videos_per_device": args.videos_per_device, "compile_s": round(secs, 1),
                   "analytic_bytes": analytic(trainer, cfg, mcfg, mesh, latent_shape, args.videos_per_device),
                   "preset": args.preset, "layers": mcfg.num_layers, "latent_shape": list(latent_shape),
                   "devices": jax.device_count(), "backend": jax.default_backend(),
                   "rollout_gradient": cfg.rollout_gradient, "method": args.method,
                   **({} if trainer.hooks is None else {"method_config": trainer.hooks.describe()["config"]})}}
    if args.dual_scale:
        out["qat"]["dual_scale"] = dual_scale_summary(trainer)
    label = "QAT" if args.method == "qat" else f"{args.method} QAT"
    print(f"{label} step, mesh {dict(mesh.shape)}, {args.videos_per_device} video(s)/device, compiled in {secs:.0f} s")
    for k in ("arguments", "output", "temp", "total", "peak"):
        print(f"  {k:>10}: {qat[k] / GIB:8.2f} GiB per device")
    if "all_gathers" in qat:
        out["qat"]["all_gathers"] = qat["all_gathers"]
        print(f"  all-gathers by dtype: entry {qat['all_gathers']['entry']}, loop bodies {qat['all_gathers']['loops']}")
    for k, v in out["qat"]["analytic_bytes"].items():
        print(f"  analytic {k}: {v / GIB:.2f} GiB")
    if args.dual_scale:
        print(f"  dual scale: {out['qat']['dual_scale']}")
    if args.method != "qat" and not args.skip_calibration:
        print(f"calibration: not planned for --method {args.method} (the planner covers Q-ARVD's calibration)")
    elif not args.skip_calibration:
        cal = calibration(model, cfg, mcfg, latent_shape, sampler, args.calib_prompts)
        out["calibration"] = cal
        print(f"calibration: host {cal['host_bytes'] / GIB:.2f} GiB ({cal['groups']} layer groups, budget "
              f"{cal['budget_bytes'] / GIB:.1f} GiB, all at once {cal['all_at_once_bytes'] / GIB:.1f} GiB), "
              f"device {cal['device_bytes'] / GIB:.2f} GiB per call")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
