"""Size of the compiled QAT train step against the number of layers, and the stacked optimiser update.

The blocks run under ``lax.scan`` over stacked per-block states; the optimiser update runs on the same
stacked leaves (``make_optimizer(stacked_blocks=True)``), so the step's program grows with the number of
layers only by the per-layer argument and result buffers, not by one update per layer and leaf (which added
~1.6 s of XLA:CPU compile per block to the 1.3B step; now ~0.65 s).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.pipeline.causal_inference import InferenceConfig
from qarvd_jax.quant.calibration import init_weight_quantizers
from qarvd_jax.quant.qlinear import iter_quant_layers, set_quant_flags
from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.sharding import make_mesh
from test_qat_gathers import abstract_trainer


def _program_lines(layers: int) -> int:
    trainer, _ = abstract_trainer("fsdp=8", layers=layers)
    assert trainer.stacked_tx is not None  # single-scale blocks: scanned, stacked update
    return trainer.step_fn.lower(*trainer.abstract_step_args()).as_text().count("\n")


def test_train_step_program_barely_grows_with_layers():
    """StableHLO of the sharded step (tiny model, fsdp=8): 2 -> 8 blocks adds < 35% (measured: +18%; with
    one optimiser update per layer it was +85%). Trained block weights keep the per-layer update (stacked
    Adam moments of the weights would cost two more copies of them)."""
    two, eight = _program_lines(2), _program_lines(8)
    assert eight < 1.35 * two, (two, eight)
    assert abstract_trainer("fsdp=8", "train_weights=true", layers=2)[0].stacked_tx is None


def _student():
    cfg = QATConfig(compute_dtype="float32", dual_scale=False, hist_bins=256, align=8, batch_size=2, warmup_steps=1,
                    lr_schedule_steps=4, mesh="data=1")
    model, _ = qat_mod.prepare_student(CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(0)), cfg)
    init_weight_quantizers(model, cfg.recipe())
    for _, layer in iter_quant_layers(model):  # plausible activation steps without calibration
        layer.a_scale[...] = jnp.full_like(layer.a_scale[...], 0.05)
        layer.a_zero[...] = jnp.full_like(layer.a_zero[...], 128.0)
    set_quant_flags(model, weights=True, acts=True)
    return model, cfg


def test_stacked_update_equals_per_layer_update():
    """Two steps with the update on stacked leaves equal two with one update per layer (quantizer steps:
    Adam, per-layer RMS, global-norm clipping, projection)."""
    model, cfg = _student()
    sampler = InferenceConfig(denoising_step_list=(1000, 500), context_noise=20.0)
    trainer = qat_mod.QATTrainer(model, cfg, make_mesh("data=1", jax.devices()[:1]), (6, 16, 4, 4), sampler)
    assert trainer.stacked_tx is not None
    batch = {"embeds": jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 32)), jnp.float32),
             "prompt_id": jnp.arange(2, dtype=jnp.int32)}
    runs = []
    for stacked_tx in (trainer.stacked_tx, None):
        step = jax.jit(partial(qat_mod.train_step, distiller=trainer.distiller, tx=trainer.tx, cfg=cfg,
                               stacked_tx=stacked_tx))
        state, metrics = trainer.init_state(), []
        for _ in range(2):
            state, m = step(state, trainer.frozen, trainer.teacher, batch)
            metrics.append(jax.device_get(m))
        runs.append((jax.device_get(state), metrics))
    (s_new, m_new), (s_old, m_old) = runs
    for a, b in zip(m_new, m_old):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert jax.tree.structure(s_new) == jax.tree.structure(s_old)
    for x, y in zip(jax.tree.leaves(s_new), jax.tree.leaves(s_old)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
    w0 = jax.device_get(trainer.init_state().trainable["blocks"][1]["ffn"]["layers"][0]["w_scale"][...])
    assert not np.allclose(s_new.trainable["blocks"][1]["ffn"]["layers"][0]["w_scale"][...], w0)  # it trained
