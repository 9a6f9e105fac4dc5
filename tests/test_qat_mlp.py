"""The ``mlp`` activation rule: the FFN hidden [B, L, ffn_dim] of the QAT step is constrained to
(batch, context, mlp), so with ``tensor=4`` it is split over ``tensor`` (column-parallel ffn.0, row-parallel
ffn.2). Tiny model on 8 CPU devices, mesh fsdp=2,tensor=4."""

from __future__ import annotations

import collections
import re

import numpy as np

from test_qat import calibrated, cfg, sensitivity, sharded_and_single_step, stack  # noqa: F401  (fixtures)
from test_qat_gathers import abstract_trainer
from extended import extended

MESH = "fsdp=2,tensor=4"
NO_MLP = ("logical_axis_rules=[[batch,data,fsdp],[weight_in,fsdp],[weight_out,tensor],[row_in,tensor],"
          "[row_out,fsdp],[heads,tensor],[mlp]]")


def _gelu_shapes(*overrides) -> collections.Counter:
    trainer, _ = abstract_trainer(MESH, "compute_dtype=float32", *overrides, batch=2)
    hlo = trainer.step_fn.lower(*trainer.abstract_step_args()).compile().as_text()
    return collections.Counter(tuple(int(d) for d in s.split(",")) for s in re.findall(r"= f32\[([\d,]+)\][^\n]* tanh\(", hlo))


@extended("the FFN-hidden sharding rule on the compiled 1.3B-like step (~45 s on one core)")
def test_ffn_hidden_follows_the_mlp_rule():
    """Per-device shapes of the FFN's gelu (tanh): ffn_dim/4 under the default ``mlp -> tensor``; the whole
    ffn_dim when the rule maps ``mlp`` to nothing (the constraint is what decides, not XLA's choice)."""
    ffn = 128  # WanDiTConfig.tiny().ffn_dim (the text embedding's gelu is [.., 16, 16])
    default = _gelu_shapes()
    assert any(s[-1] == ffn // 4 for s in default) and not any(s[-1] == ffn for s in default), default
    unsplit = _gelu_shapes(NO_MLP)
    assert any(s[-1] == ffn for s in unsplit) and not any(s[-1] == ffn // 4 for s in unsplit), unsplit


def test_tensor_parallel_step_matches_unsharded(stack, cfg, calibrated):  # noqa: F811
    """One step on fsdp=2,tensor=4 (FFN hidden and heads on tensor) equals the single-device step (float32).
    Losses rtol 5e-4 (measured 1.2e-4: the row-parallel o / ffn.2 contractions are summed in 4 parts, and
    fake quantizers amplify a rounding-boundary flip), gradient norm rtol 1e-3."""
    _, _, (_, m8), (_, m1) = sharded_and_single_step(stack, cfg.replace(mesh=MESH), calibrated, MESH)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=5e-4)
    np.testing.assert_allclose(m8["chunk_loss"], m1["chunk_loss"], rtol=5e-4)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-3)
