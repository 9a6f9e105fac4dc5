"""Collectives of the sharded QAT train step (tiny model, 8 CPU devices, bf16 compute, abstract inputs).

Weight gathers: the HLO right after XLA's SPMD partitioner (dumped with ``xla_dump_hlo_pass_re``) is read,
not the final optimised HLO: XLA:CPU has no bf16 matmul, and its float normalisation upcasts the bf16 dot
operands to f32 and moves that convert ahead of the all-gather, so the optimised CPU program shows f32
gathers of values that are bf16 (on TPU / GPU the bf16 gather stays).
"""

from __future__ import annotations

import collections
import glob
import os
import re

import jax
import pytest
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import InferenceConfig
from qarvd_jax.quant.qlinear import quantize_model
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import load_qat_config
from qarvd_jax.train.sharding import make_mesh

_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^\n]*all-gather\(")


def abstract_trainer(mesh_spec: str, *overrides: str, batch: int = 8, layers: int | None = None):
    cfg = load_qat_config(None, [f"batch_size={batch}", f"mesh={mesh_spec}", "dual_scale=false",
                                 "compute_dtype=bfloat16", *overrides])
    base = WanDiTConfig.tiny() if layers is None else WanDiTConfig.tiny().replace(num_layers=layers)
    model = qat_mod.fp32_master(CausalWanModel(base, rngs=nnx.Rngs(0)), cfg)
    quantize_model(model, cfg.recipe().rules(), outliers={})
    return qat_mod.QATTrainer(model, cfg, make_mesh(mesh_spec), (6, base.in_dim, 4, 4), InferenceConfig(),
                              abstract=True), base


def partitioned_hlo(trainer, tmp_path) -> str:
    """The train step's HLO right after SPMD partitioning (collectives placed, dtypes not yet normalised)."""
    dump = str(tmp_path / "dump")
    trainer.step_fn.lower(*trainer.abstract_step_args()).compile(
        compiler_options={"xla_dump_to": dump, "xla_dump_hlo_pass_re": "spmd-partitioning"})
    files = glob.glob(os.path.join(dump, "*train_step*after_spmd-partitioning*.txt"))
    assert len(files) == 1, files
    return open(files[0]).read()


def kernel_shapes(base: WanDiTConfig) -> set[tuple[int, ...]]:
    """[in, out] of every linear layer of the model."""
    model = nnx.eval_shape(lambda: CausalWanModel(base, rngs=nnx.Rngs(0)))
    shapes = set()
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        if "kernel" in jax.tree_util.keystr(path):
            shapes.add(tuple(x.shape))
    return shapes


@pytest.mark.parametrize("train_weights", [False, True])
def test_weight_gathers_are_per_layer_in_the_compute_dtype(tmp_path, train_weights):
    """fsdp=8, bf16 compute, float32 masters: every all-gather of a weight moves bf16 and one layer's kernel
    (its [in, out] or [out, in]), never float32 and never a stacked [layers, ...] array."""
    trainer, base = abstract_trainer("fsdp=8", f"train_weights={str(train_weights).lower()}")
    hlo = partitioned_hlo(trainer, tmp_path)
    gathers = collections.Counter((dt, tuple(int(d) for d in shape.split(",") if d))
                                  for dt, shape in _GATHER.findall(hlo))
    kernels = kernel_shapes(base) | {s[::-1] for s in kernel_shapes(base)}
    weight = {k: n for k, n in gathers.items() if len(k[1]) >= 2 and k[1] in kernels}
    assert sum(weight.values()) >= 2 * base.num_layers * 6  # q, k, v, o, ffn.0, ffn.2 of every block (fwd + bwd)
    assert {dt for dt, _ in weight} == {"bf16"}, weight
    stacked = [k for k in gathers if len(k[1]) >= 3 and k[1][0] == base.num_layers and k[1][1:] in kernels]
    assert not stacked, stacked
    other = {k: n for k, n in gathers.items() if k not in weight}
    assert all(dt == "bf16" or len(shape) <= 1 for dt, shape in other), other  # f32 only for 1-D vectors
