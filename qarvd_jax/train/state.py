"""Train state, optimiser and Orbax checkpoints of QAT.

The model is split once into ``graphdef`` (static structure) and two ``nnx.State`` trees:

* ``trainable``: quantizer steps ``a_scale`` [G] / ``w_scale`` [G, out] of every QuantLinear, plus
  every ``nnx.Param`` with ``train_weights``; float32 master copies, owned by :class:`TrainState`
  (donated to the jitted step);
* ``frozen``: everything else (weights unless trained, zero points, flags, outlier indices); never
  changes during training.

Checkpoints (``OUT/checkpoints/<step>/``, Orbax ``CheckpointManager``) hold three items: ``state``
(the :class:`TrainState`: step, trainable, optimiser state, RNG key), ``frozen`` and ``meta`` (JSON:
step, data position, global batch, the config). Restoring targets abstract arrays that carry the
run's shardings, so every process reads only its shards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qarvd_jax.quant.qlinear import QuantState
from qarvd_jax.train.config import QATConfig

__all__ = ["SCALE_NAMES", "TrainState", "trainable_filter", "lr_schedule", "make_optimizer", "project_scales",
           "scale_by_layer_block_rms", "map_block_states", "abstract_like", "QATCheckpointer"]

log = logging.getLogger(__name__)

SCALE_NAMES = ("a_scale", "w_scale")


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """Everything that changes during training (a pytree; donated to the train step).

    step: int32 [] completed optimiser steps. trainable: ``nnx.State`` of float32 leaves.
    opt_state: optax state (moments mirror ``trainable``). rng: uint32 [2] raw PRNG key data,
    split once per step for the noise of fresh draws.
    """

    step: jax.Array
    trainable: nnx.State
    opt_state: Any
    rng: jax.Array


def _is_scale(path, x) -> bool:
    return isinstance(x, QuantState) and bool(path) and path[-1] in SCALE_NAMES


def trainable_filter(train_weights: bool):
    """nnx filter of the trained leaves: quantizer steps (+ every ``nnx.Param`` with ``train_weights``)."""
    return nnx.Any(nnx.Param, _is_scale) if train_weights else _is_scale


def _label(path, _x) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if n != "value"]
    return "scale" if names and names[-1] in SCALE_NAMES else "weight"


def lr_schedule(cfg: QATConfig, peak: float) -> optax.Schedule:
    """Linear warmup 0 -> ``peak`` over ``warmup_steps`` (at most ``schedule_steps - 1``), then cosine
    decay to ``min_lr_ratio * peak`` at ``schedule_steps``."""
    total = max(cfg.schedule_steps, 1)
    warmup = min(cfg.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=peak * cfg.min_lr_ratio)


def make_optimizer(cfg: QATConfig, trainable: nnx.State, *,
                   stacked_blocks: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping, then per group:

    * ``scale`` (quantizer steps): Adam with *relative* updates, i.e. the Adam direction times the
      RMS of the layer's step array (``scale_by_param_block_rms``) times ``lr``: steps of very
      different magnitudes (weights ~1e-3, activations ~1e-1) all move by about ``lr`` of their size.
    * ``weight``: AdamW with ``weight_lr`` and ``weight_decay``.

    Both follow the warmup + cosine schedule; step ``n`` (0-based) uses the schedule at ``n + 1`` so
    the first update is not wasted on a zero learning rate.

    ``stacked_blocks``: ``trainable`` holds the blocks stacked over a leading layer axis (the train step's
    layout, :meth:`qarvd_jax.train.rollout.Distiller.stack_state`): the same update, with one RMS per layer
    of a stacked leaf. Its state is :func:`map_block_states` of the per-layer optimiser's state.
    """
    labels = jax.tree_util.tree_map_with_path(_label, trainable)

    def sched(peak):
        base = lr_schedule(cfg, peak)
        return lambda count: base(count + 1)

    rms = scale_by_layer_block_rms() if stacked_blocks else optax.scale_by_param_block_rms()
    scale_tx = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), rms,
                           optax.scale_by_learning_rate(sched(cfg.lr)))
    weight_tx = optax.adamw(sched(cfg.weight_lr), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    groups = {"scale": scale_tx, "weight": weight_tx}
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, optax.multi_transform(groups, labels))


def scale_by_layer_block_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """``optax.scale_by_param_block_rms`` of a tree whose ``blocks`` leaves are stacked [L, ...]: those get
    the RMS of each layer's slice (the per-layer optimiser's block RMS), the other leaves their own."""

    def rms(path, p):
        if not (path and _key(path[0]) == "blocks"):
            return optax.safe_root_mean_squares(p, min_scale)
        axes = tuple(range(1, p.ndim))
        r = jnp.sqrt(jnp.mean(jnp.square(p), axis=axes, keepdims=True))
        q = jnp.where(r <= min_scale, jnp.ones_like(p), p)  # optax's safe form (finite gradients at 0)
        return jnp.where(r <= min_scale, min_scale, jnp.sqrt(jnp.mean(jnp.square(q), axis=axes, keepdims=True)))

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_layer_block_rms needs the params")
        return jax.tree_util.tree_map_with_path(lambda path, u, p: u * rms(path, p), updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _key(k):
    return getattr(k, "key", getattr(k, "name", None))


def map_block_states(tree, fn):
    """``fn`` applied to every ``nnx.State`` of ``tree`` that holds ``blocks`` (a train state, or an optimiser
    state whose moments mirror it); the rest of ``tree`` unchanged."""
    has_blocks = lambda x: isinstance(x, nnx.State) and "blocks" in x  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if has_blocks(x) else x, tree, is_leaf=has_blocks)


def project_scales(trainable: nnx.State, min_scale: float) -> nnx.State:
    """Quantizer steps clipped to ``>= min_scale`` (keeps Δ positive after an update)."""

    def proj(path, x):
        return jnp.maximum(x, min_scale) if _label(path, x) == "scale" else x

    return jax.tree_util.tree_map_with_path(proj, trainable)


def abstract_like(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class QATCheckpointer:
    """Orbax ``CheckpointManager`` under ``directory`` with items ``state``, ``frozen`` and ``meta``.

    ``directory``: a local path (made absolute) or a URL ``etils.epath`` handles (``gs://...``, passed to
    Orbax untouched); ``self.directory`` is its ``epath.Path``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        from qarvd_jax.utils.epaths import out_path

        self._ocp = ocp
        self.directory = out_path(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "frozen", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, frozen: nnx.State, meta: dict) -> None:
        """Save (asynchronously when enabled: device data is copied before this returns)."""
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        frozen=ocp.args.StandardSave(frozen),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state, abstract_frozen) -> tuple[TrainState, nnx.State, dict]:
        """Restore ``step`` into the (sharded) abstract targets."""
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 frozen=ocp.args.StandardRestore(abstract_frozen),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["frozen"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
