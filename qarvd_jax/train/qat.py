"""Quantization-aware training of the quantized causal Wan DiT, distilled from the full-precision model.

Recipe (``qarvd quantize --method qat``):

1. Student: a float32-master copy of the DiT (compute in ``compute_dtype``) with the Q-ARVD layer
   surgery (dual-scale split), percentile-MSE weight quantizers and chunk-weighted activation
   calibration (:func:`prepare_student`; no AdaRound: QAT learns the steps instead). Training converts
   its dual-scale layers to the fixed-shape mask form (:mod:`qarvd_jax.quant.stackable`), so blocks of
   different outlier counts still stack for ``lax.scan``; checkpoints hold that form, the export the
   original one.
2. Every step (:func:`train_step`, pure and jitted with explicit shardings): sample noise, let the
   full-precision teacher (same graph, quantizer flags off) generate the batch's videos, train the
   quantized model's KV-cache path to reproduce the teacher's flows pass by pass
   (:mod:`qarvd_jax.train.rollout`), with chunk weights from the sensitivity step. AdamW on the
   quantizer steps (LSQ gradients through ``fake_quant``) and optionally the weights, warmup +
   cosine schedule, global-norm clipping.
3. Orbax checkpoints every ``checkpoint_every`` steps and at the end; a rerun of the same command
   resumes from the latest one. ``OUT/quantized`` (``save_quantized``) at the end.

Outputs in ``OUT`` (a local folder or a URL such as ``gs://bucket/run``, written through ``etils.epath``):
``checkpoints/``, ``train_log.jsonl``, ``train_loss.png``, ``quantized/``, ``qat.json``
(the log, plot, resume checks and SIGTERM handling live in :mod:`qarvd_jax.train.run_io`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from qarvd_jax.models.wan.attention import attention_sharding
from qarvd_jax.models.wan.model import block_stack_plan
from qarvd_jax.quant import stackable
from qarvd_jax.quant.qlinear import QuantState, iter_quant_layers, set_quant_flags, with_quant_flags
from qarvd_jax.train import sharding as shd
from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.data import PromptDataset, PromptSource, check_batch_divisible, read_prompts_range
from qarvd_jax.train.rollout import Distiller
from qarvd_jax.train.run_io import (_append_log, _check_resume, _Preemption, _read_log, _write_log, plot_losses,
                                    write_run_json)
from qarvd_jax.train.state import (QATCheckpointer, TrainState, abstract_like, lr_schedule, make_optimizer,
                                   map_block_states, project_scales, trainable_filter)
from qarvd_jax.utils.epaths import check_url_backend, out_path

__all__ = ["initialize_distributed", "validate_mesh", "load_chunk_weights", "prepare_student", "calibrate_student", "train_step",
           "QATTrainer", "QATResult", "run_qat"]

log = logging.getLogger(__name__)



def initialize_distributed(enabled: bool = False, *, coordinator: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300) -> bool:
    """``jax.distributed.initialize()`` when ``enabled`` or ``QARVD_DISTRIBUTED=1``.

    Without ``coordinator`` JAX auto-detects the cluster (TPU pods, SLURM, ...); with
    ``coordinator="HOST:PORT"``, ``num_processes`` and ``process_id`` it joins that cluster (any
    machines, CPU included: CPU collectives use gloo). ``timeout_s`` bounds the wait for the other
    processes. Call before any other JAX work. Returns whether JAX runs distributed.
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not (enabled or explicit or os.environ.get("QARVD_DISTRIBUTED", "") in ("1", "true")):
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    if not jax.distributed.is_initialized():
        kw = {"initialization_timeout": int(timeout_s)}
        if explicit:
            kw.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
            if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)
    log.info("distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
             jax.device_count())
    return True


def validate_mesh(cfg: QATConfig, mesh: Mesh, model_config) -> None:
    """Batch / head / FFN divisibility by the mesh, with the values that would work."""
    check_batch_divisible(cfg.batch_size, mesh, shd.rules_table(cfg.logical_axis_rules).get("batch", ()))
    shd.check_model_divisible(model_config, mesh)


def load_chunk_weights(sensitivity, num_chunks: int) -> tuple[np.ndarray | None, list | None]:
    """omega [K] (mean 1) from a ``sensitivity.json`` path or a sensitivity list (None: uniform), checked
    (finite, >= 0, positive sum, one value per chunk). Returns (omega, sensitivity)."""
    from qarvd_jax.quant.objective import chunk_weights, validate_sensitivity
    from qarvd_jax.quant.sensitivity import load_sensitivity

    if sensitivity is None or (isinstance(sensitivity, str) and not sensitivity):
        return None, None
    if isinstance(sensitivity, (str, os.PathLike)):
        sens = load_sensitivity(os.fspath(sensitivity), num_chunks=num_chunks)
    else:
        sens = validate_sensitivity(sensitivity, num_chunks, "sensitivity")
    return np.asarray(chunk_weights(sens), np.float32), sens


def prepare_student(dit, cfg: QATConfig):
    """A quantized copy of the FP ``dit``: float32 master weights, ``compute_dtype`` compute, QuantLinear
    surgery by the recipe (outliers from the weights). Quantizers are still uninitialised; the
    weights are the full-precision ones, so with flags off this is also the teacher.

    Returns ``(model, layer_configs)``.
    """
    from qarvd_jax.quant.calibration import prepare_quantized_model

    model = fp32_master(dit, cfg)
    layers = prepare_quantized_model(model, cfg.recipe())
    return model, layers


def fp32_master(dit, cfg: QATConfig):
    """A float32-master copy of the FP ``dit`` computing in ``compute_dtype`` with the training attention."""
    from qarvd_jax.models.wan.model import CausalWanModel

    mcfg = dit.config.replace(param_dtype="float32", dtype=cfg.compute_dtype, attention=cfg.attention)
    model = nnx.eval_shape(lambda: CausalWanModel(mcfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                                   else x, nnx.state(dit)))
    return model


def calibrate_student(model, cfg: QATConfig, sampler, calib_embeds: np.ndarray, latent_shape, omega=None) -> None:
    """RTN init of the weight quantizers (percentile MSE), activation ranges from ``calib_embeds``
    generations (weights quantized, activations not), chunk-weighted by ``omega``; flags on. In place."""
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
    from qarvd_jax.quant.calibration import calibrate_rtn

    pipe = CausalInferencePipeline(model, sampler)
    seeds = [cfg.seed + i for i in range(len(calib_embeds))]
    calibrate_rtn(model, pipe, calib_embeds, seeds, latent_shape, cfg.recipe(), omega if cfg.chunk_weighting else None)
    set_quant_flags(model, weights=True, acts=True)


def _put(tree, shardings):
    """Host/single-device arrays onto (possibly multi-process) shardings; every process passes the same values."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


# QATConfig fields the jitted step depends on (besides the schedule length)
_STEP_FIELDS = ("lr", "weight_lr", "train_weights", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay",
                "clip_norm", "min_scale", "target", "resample_noise", "compute_dtype", "remat", "seed",
                "logical_axis_rules", "batch_size", "rollout_gradient", "remat_policy", "scan_layers", "attention")


def _step_key(cfg: QATConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in _STEP_FIELDS) + (cfg.schedule_steps,)


def _attention_sharded(step):
    """``step`` traced inside :func:`~qarvd_jax.models.wan.attention.attention_sharding` of its distiller's
    activation shardings: kernels jax cannot partition (``attention="splash"``) run under ``shard_map`` over
    the mesh and the logical-axis rules."""

    @wraps(step)
    def traced(*args, distiller: Distiller, **kwargs):
        with attention_sharding(distiller.activation_sharding):
            return step(*args, distiller=distiller, **kwargs)

    return traced


@_attention_sharded
def train_step(state: TrainState, frozen: nnx.State, teacher: tuple, batch: dict, *, distiller: Distiller,
               tx: optax.GradientTransformation, cfg: QATConfig, hooks=None, teacher_distiller=None,
               stacked_tx: optax.GradientTransformation | None = None):
    """One QAT step (pure).

    Args:
      state: the :class:`TrainState` (donated). frozen: non-trained student leaves.
      teacher: ``(trainable, frozen)`` states of the full-precision teacher (flags off).
      batch: ``embeds`` [B, Lc, text_dim] float32, ``prompt_id`` [B] int32 (B = global batch).

      hooks / teacher_distiller: a method's :class:`~qarvd_jax.train.method_qat.MethodHooks` (frozen leaves
        of the step, post-update transform, extra metrics) and its full-precision teacher's Distiller.
      stacked_tx: (``per_call``, scanned blocks) ``tx`` on the blocks stacked over a layer axis
        (:meth:`Distiller.stack_state`, ``make_optimizer(stacked_blocks=True)``): the gradient stays stacked
        and the update runs once per stacked leaf instead of once per layer (the same update; a compiled
        step whose size does not grow with the number of layers); the state keeps its per-layer layout.

    Returns:
      ``(new_state, metrics)`` with metrics ``loss`` [], ``chunk_loss`` [K], ``grad_norm`` [], ``lr`` [].
    """
    frozen = frozen if hooks is None else hooks.frozen_at(frozen, state.step)
    key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    b = batch["prompt_id"].shape[0]
    if cfg.resample_noise:
        keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(jnp.arange(b))
    else:
        keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.key(cfg.seed), p))(batch["prompt_id"])
    noise, renoise = distiller.sample_noise(keys)
    traj = (teacher_distiller or distiller).teacher_rollout(teacher, batch["embeds"], noise, renoise)
    if stacked_tx is not None:  # blocks stacked: one update per stacked leaf, back to the per-layer state after
        params = distiller.stack_state(state.trainable)
        (loss, aux), grads = distiller.stacked_loss_and_grad(params, frozen, batch["embeds"], traj)
        updates, opt_state = stacked_tx.update(grads, map_block_states(state.opt_state, distiller.stack_state),
                                               params)
        trainable = project_scales(optax.apply_updates(params, updates), cfg.min_scale)
        trainable = distiller.unstack_state(trainable, like=state.trainable)
        opt_state = jax.tree.unflatten(jax.tree.structure(state.opt_state), jax.tree.leaves(
            map_block_states(opt_state, distiller.unstack_state)))
    else:
        if distiller.rollout_gradient == "per_call":
            (loss, aux), grads = distiller.student_loss_and_grad(state.trainable, frozen, batch["embeds"], traj)
        else:
            (loss, aux), grads = jax.value_and_grad(distiller.student_loss, has_aux=True)(
                state.trainable, frozen, batch["embeds"], traj)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = project_scales(optax.apply_updates(state.trainable, updates), cfg.min_scale)
    metrics = {"loss": loss, "chunk_loss": aux["chunk_loss"], "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(cfg, cfg.lr)(state.step + 1)}
    if hooks is not None:
        trainable = hooks.after_update(trainable, state.step + 1)
        metrics.update(hooks.metrics(trainable, state.step + 1))
    new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                           rng=jax.random.key_data(key))
    return new_state, metrics


class QATTrainer:
    """Shardings, the jitted step and the state of QAT on one mesh.

    Build it from the student model *after* calibration (or before a restore): its ``nnx.Param``
    leaves must still be the full-precision weights, since the teacher is taken from it.

    Args:
      model: quantized student (see :func:`prepare_student`).
      cfg: the QAT config. mesh: ('data', 'fsdp', 'tensor') mesh.
      latent_shape: (F, C, h, w); sampler: the pipeline's InferenceConfig; omega: [K] chunk weights.
      jit_cache: optional dict shared between trainers: runs with the same model structure, step
        settings and mesh reuse one jitted (compiled) step instead of compiling again.
      mask_form: (Q-ARVD's QAT) train the block positions holding dual-scale layers in the mask form
        (:func:`qarvd_jax.quant.stackable.to_mask_form` of a copy of ``model`` sharing its arrays; the
        names are ``mask_layers``), so the blocks share one structure and scan; :meth:`export_model`
        converts back. False: the gathered form (blocks of different outlier counts run in a loop).
    """

    def __init__(self, model, cfg: QATConfig, mesh: Mesh, latent_shape, sampler, omega=None,
                 jit_cache: dict | None = None, abstract: bool = False, hooks=None, mask_form: bool = True):
        self.cfg, self.mesh, self.hooks = cfg, mesh, hooks
        self.rules = shd.rules_table(cfg.logical_axis_rules)
        batch_axes = self.rules.get("batch", ())
        check_batch_divisible(cfg.batch_size, mesh, batch_axes)
        filt = trainable_filter(cfg.train_weights) if hooks is None else hooks.trainable_filter()
        # the gathered layout, for the export (a mask-form layer keeps its original config)
        self.layer_configs = {n: getattr(layer, "unmasked_cfg", layer.cfg) for n, layer in iter_quant_layers(model)}
        if mask_form and hooks is None:
            model = stackable.shallow_copy(model)  # the caller's model stays in the gathered form
            stackable.to_mask_form(model)
        self.mask_layers = stackable.mask_form_layers(model)
        self.graphdef, trainable, frozen = nnx.split(model, filt, ...)
        self.model_config = model.config
        self.trainable_sh = shd.tree_shardings(trainable, mesh, self.rules)
        self.frozen_sh = shd.tree_shardings(frozen, mesh, self.rules)
        self.tx = make_optimizer(cfg, trainable) if hooks is None else hooks.optimizer(trainable)
        opt_shape = jax.eval_shape(self.tx.init, trainable)
        rep = shd.replicated(mesh)
        self.state_sh = TrainState(step=rep, trainable=self.trainable_sh,
                                   opt_state=shd.tree_shardings(opt_shape, mesh, self.rules), rng=rep)
        self.batch_sh = {"embeds": shd.batch_sharding(mesh, self.rules, 3),
                         "prompt_id": shd.batch_sharding(mesh, self.rules, 1)}
        if abstract:  # shapes only (memory planning): nothing is placed on devices
            sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
            trainable, frozen = sds(trainable), sds(frozen)
            self._host_trainable, self._host_frozen = trainable, frozen
            self.frozen = abstract_like(frozen, self.frozen_sh)
            self.teacher = (abstract_like(self._teacher_dtype(trainable), self.trainable_sh), self.frozen)
        else:
            # host numpy copies (not arrays on device 0), for init_state / abstract_state
            trainable, frozen = jax.tree.map(np.asarray, trainable), jax.tree.map(np.asarray, frozen)
            self._host_trainable, self._host_frozen = trainable, frozen
            self.frozen = _put(frozen, self.frozen_sh)
            # the frozen teacher's copy of trained weights is stored in the compute dtype (it computes in it)
            self.teacher = (_put(self._teacher_dtype(trainable), self.trainable_sh),
                            with_quant_flags(self.frozen, False))
        self.distiller = self.make_distiller(self.graphdef, model, latent_shape, sampler, omega, hooks is not None)
        teacher_sh, teacher_distiller = (self.trainable_sh, self.frozen_sh), None
        if hooks is not None:  # a method's teacher: the full-precision graph, not the student with flags off
            self.teacher, teacher_sh, teacher_distiller = hooks.teacher(self, latent_shape, sampler, omega, abstract)
        self.teacher_sh = teacher_sh
        self.stacked_tx = self._stacked_optimizer(trainable)
        key = (self.graphdef, _step_key(cfg), tuple(latent_shape), sampler, None if omega is None else
               tuple(np.asarray(omega, np.float32).tolist()), mesh, None if hooks is None else hooks.key())
        if jit_cache is not None and key in jit_cache:
            self.step_fn = jit_cache[key]
        else:
            step = partial(train_step, distiller=self.distiller, tx=self.tx, cfg=cfg, hooks=hooks,
                           teacher_distiller=teacher_distiller, stacked_tx=self.stacked_tx)
            self.step_fn = jax.jit(step, in_shardings=(self.state_sh, self.frozen_sh, teacher_sh, self.batch_sh),
                                   out_shardings=(self.state_sh, rep), donate_argnums=(0,))
            if jit_cache is not None:
                jit_cache[key] = self.step_fn

    def _stacked_optimizer(self, trainable):
        """The optimiser on the train step's stacked-blocks layout (None: blocks not scanned, block weights
        trained, or a state that does not map onto the per-layer one). Trained block weights keep the
        per-layer update: stacking their Adam moments would cost two more copies of the block weights."""
        d = self.distiller
        if d.rollout_gradient != "per_call" or not d.scanned or "blocks" not in trainable:
            return None
        if any(isinstance(v, nnx.Param) for v in jax.tree.leaves(trainable["blocks"],
                                                                  is_leaf=lambda x: isinstance(x, nnx.Variable))):
            return None
        stacked = jax.eval_shape(d.stack_state, trainable)
        tx = make_optimizer(self.cfg, stacked, stacked_blocks=True) if self.hooks is None else \
            self.hooks.optimizer(stacked)
        want = jax.eval_shape(lambda t: map_block_states(self.tx.init(t), d.stack_state), trainable)
        got = jax.eval_shape(tx.init, stacked)
        same = jax.tree.structure(want) == jax.tree.structure(got) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
        return tx if same else None

    def make_distiller(self, graphdef, model, latent_shape, sampler, omega, step_context: bool) -> Distiller:
        cfg, mesh = self.cfg, self.mesh
        return Distiller(graphdef, model.config, latent_shape, sampler, omega=omega, target=cfg.target,
                         remat=cfg.remat, batch_constraint=lambda nd: shd.batch_sharding(mesh, self.rules, nd),
                         rollout_gradient=cfg.rollout_gradient, block_plan=block_stack_plan(model),
                         scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                         activation_sharding=shd.activation_sharding(mesh, self.rules), step_context=step_context)

    def _teacher_dtype(self, tree):
        if not self.cfg.train_weights:
            return tree
        dt = jnp.dtype(self.cfg.compute_dtype)

        def one(x):
            if jnp.issubdtype(x.dtype, jnp.floating) and len(x.shape) >= 1:
                return jax.ShapeDtypeStruct(x.shape, dt) if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x, dt)
            return x

        return jax.tree.map(one, tree)

    def abstract_step_args(self):
        """Sharded ``ShapeDtypeStruct`` arguments of ``step_fn`` (lower and compile without data)."""
        state, frozen = self.abstract_state()
        b = self.cfg.batch_size
        mc = self.model_config
        batch = {"embeds": jax.ShapeDtypeStruct((b, mc.text_len, mc.text_dim), jnp.float32,
                                                sharding=self.batch_sh["embeds"]),
                 "prompt_id": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self.batch_sh["prompt_id"])}
        teacher = (abstract_like(self._teacher_dtype(self._host_trainable), self.trainable_sh), frozen)
        if self.hooks is not None:
            teacher = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.teacher,
                                   self.teacher_sh)
        return state, frozen, teacher, batch

    def init_state(self) -> TrainState:
        """Step 0: trainable leaves from the model, fresh optimiser state, ``key(seed)``."""
        trainable = _put(self._host_trainable, self.trainable_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(trainable)
        rng = _put(np.asarray(jax.random.key_data(jax.random.key(self.cfg.seed))), self.state_sh.rng)
        step = _put(np.zeros((), np.int32), self.state_sh.step)
        return TrainState(step=step, trainable=trainable, opt_state=opt_state, rng=rng)

    def abstract_state(self):
        """Sharded ``ShapeDtypeStruct`` targets ``(TrainState, frozen)`` for a restore."""
        trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._host_trainable)
        rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                            opt_state=jax.eval_shape(self.tx.init, trainable), rng=rng)
        return abstract_like(shapes, self.state_sh), abstract_like(self._host_frozen, self.frozen_sh)

    def set_frozen(self, frozen: nnx.State) -> None:
        """Use restored frozen leaves (the teacher keeps its full-precision weights)."""
        self.frozen = frozen
        if self.hooks is None:
            self.teacher = (self.teacher[0], with_quant_flags(frozen, False))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.step_fn(state, self.frozen, self.teacher, batch)

    def export_model(self, state: TrainState, fp_config):
        """The trained quantized model on host with ``fp_config``'s dtypes (the deployed model)."""
        from qarvd_jax.models.wan.model import CausalWanModel
        from qarvd_jax.quant.qlinear import install_layers

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            trainable, frozen = multihost_utils.process_allgather((state.trainable, self.frozen), tiled=True)
        else:
            trainable, frozen = jax.device_get((state.trainable, self.frozen))
        trained = nnx.merge(self.graphdef, trainable, frozen)
        if self.hooks is not None:
            return self.hooks.export(trained, fp_config)
        stackable.from_mask_form(trained)  # the trained steps in the gathered layout of layer_configs
        model = nnx.eval_shape(lambda: CausalWanModel(fp_config, rngs=nnx.Rngs(0)))
        install_layers(model, self.layer_configs,
                       {n: np.arange(c.n_outlier) for n, c in self.layer_configs.items() if c.n_outlier})
        for coll, dtype in ((nnx.Param, jnp.dtype(fp_config.param_dtype)), (QuantState, None)):
            target = nnx.state(model, coll)
            pure = nnx.to_pure_dict(nnx.state(trained, coll))
            if dtype is not None:  # Params back to the deployed storage dtype; quantizer state stays float32
                pure = jax.tree.map(lambda x: jnp.asarray(x, dtype), pure)
            nnx.replace_by_pure_dict(target, pure)
            nnx.update(model, target)
        return model


@dataclass
class QATResult:
    """What :func:`run_qat` did: final step, the log entries of this run folder, output paths."""

    step: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    quantized: str | None = None
    state: TrainState | None = None


def run_qat(stack, cfg: QATConfig, source: PromptSource | Sequence[str], *, out_dir: str,
            sensitivity: str | None = None, mesh: Mesh | None = None, return_state: bool = False,
            jit_cache: dict | None = None, profile: tuple[str, int, int] | None = None, method=None) -> QATResult:
    """QAT of ``stack.dit`` into ``out_dir`` (resuming from ``out_dir/checkpoints`` when present).

    Args:
      stack: a :class:`qarvd_jax.workflow.Stack` (FP DiT, cached prompt encoder, latent geometry).
      cfg: :class:`QATConfig` (``cfg.steps`` is the last step to reach).
      source: prompts (a list, or a :class:`PromptSource` for files / TFDS).
      sensitivity: ``sensitivity.json`` from step 1 (chunk weights); None: uniform.
      mesh: device mesh (default ``make_mesh(cfg.mesh)``).
      return_state: keep the final :class:`TrainState` in the result (tests).
      jit_cache: see :class:`QATTrainer` (reuse compiled steps across runs in one process).
      profile: ``(folder, start, stop)``: a ``jax.profiler`` trace of the 0-based steps [start, stop).
      method: ``(name, Config)`` of a QAT method of :mod:`qarvd_jax.quant.methods` (``qvgen``, ``lsq``,
        ``efficientdm``; :mod:`qarvd_jax.train.method_qat`); None: Q-ARVD's QAT.

    Metrics are fetched one step late (the host never waits for the step it just launched). A
    SIGTERM (preemption) saves a checkpoint after the running step and returns without the export;
    rerunning the command resumes there.

    Returns a :class:`QATResult`; writes checkpoints, ``train_log.jsonl``, ``train_loss.png``,
    ``quantized/`` and ``qat.json`` (files on process 0 only).
    """
    from qarvd_jax.quant.checkpoint import save_quantized

    if not isinstance(source, PromptSource):
        source = PromptSource(prompts=tuple(source), max_prompts=cfg.max_prompts)
    mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
    validate_mesh(cfg, mesh, stack.dit.config)  # before calibration and any other heavy work
    out = out_path(out_dir)  # local: absolute; gs://... stays a URL (epath), never a local ./gs: folder
    check_url_backend(out)  # creates the folder; a missing gs:// client fails here, before calibration
    main = jax.process_index() == 0
    latent_shape = stack.latent_shape
    sampler = stack.t2v.pipeline.config
    num_chunks = latent_shape[0] // stack.dit.config.num_frame_per_block
    omega, sens = load_chunk_weights(sensitivity, num_chunks)
    ckpt = QATCheckpointer(out / "checkpoints", keep=cfg.keep_checkpoints,
                           async_save=cfg.async_checkpointing)
    latest = ckpt.latest_step()
    data = PromptDataset.from_source(source, stack.embeds, global_batch=cfg.batch_size, seed=cfg.seed,
                                     preload=cfg.preload_embeddings)
    hooks = None
    if method is not None:
        from qarvd_jax.train.method_qat import MethodHooks

        hooks = MethodHooks(*method, cfg)
        model = hooks.prepare_student(stack, stack.embeds(read_prompts_range(source, 0, max(1, cfg.calib_prompts))))
    else:
        model, _ = prepare_student(stack.dit, cfg)
    if latest is None and hooks is None:
        calib = read_prompts_range(source, 0, max(1, cfg.calib_prompts))
        calibrate_student(model, cfg, sampler, stack.embeds(calib), latent_shape, omega)
    trainer = QATTrainer(model, cfg, mesh, latent_shape, sampler, omega, jit_cache=jit_cache, hooks=hooks)
    del model
    log_path = out / "train_log.jsonl"
    if latest is None:
        state, rows = trainer.init_state(), []
    else:
        abstract_state, abstract_frozen = trainer.abstract_state()
        meta = ckpt.read_meta(latest)
        _check_resume(meta, cfg, ckpt.directory, omega, None if hooks is None else hooks.describe())
        if meta.get("mask_form_layers", 0) != len(trainer.mask_layers):
            raise ValueError(f"{ckpt.directory}: the checkpoint holds {meta.get('mask_form_layers', 0)} dual-scale "
                             f"layers in the mask form, this run trains {len(trainer.mask_layers)} (checkpoints of "
                             f"older versions keep the gathered form); use another --out")
        state, frozen, meta = ckpt.restore(latest, abstract_state, abstract_frozen)
        trainer.set_frozen(frozen)
        if meta["data_position"] != data.data_position(latest):
            raise ValueError(f"checkpoint {latest}: data position {meta['data_position']} != "
                             f"{data.data_position(latest)} expected for batch_size={cfg.batch_size}")
        rows = _read_log(log_path, latest) if main else []  # process 0 owns the log (no read while it rewrites)
        if main:
            log.info("resumed from %s at step %d", ckpt.directory, latest)
    start = int(jax.device_get(state.step))
    if main:
        _write_log(log_path, rows)  # a fresh log, or the old one cut at the restored step

    def meta_for(step: int) -> dict:
        return {"step": step, "data_position": data.data_position(step), "global_batch": cfg.batch_size,
                "schedule_steps": cfg.schedule_steps, "process_count": jax.process_count(),
                "chunk_weights": None if omega is None else [float(v) for v in omega], "config": cfg.to_dict(),
                "method": None if hooks is None else hooks.describe(), "mask_form_layers": len(trainer.mask_layers)}

    saved = latest
    bar = tqdm(total=cfg.steps, initial=start, desc="QAT", disable=not main)
    t0 = time.perf_counter()
    pending = None  # (step, device metrics) logged one step late: no host sync behind the running step

    def flush():
        done, metrics = pending
        m = jax.device_get(metrics)
        row = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "chunk_loss": [float(v) for v in m["chunk_loss"]],
               "data_position": data.data_position(done), "time_s": round(time.perf_counter() - t0, 3),
               **{k: int(m[k]) for k in (hooks.log_keys if hooks is not None else ())}}
        rows.append(row)
        if main:
            _append_log(log_path, row, rows)
            bar.set_postfix(loss=f"{row['loss']:.4g}", gnorm=f"{row['grad_norm']:.3g}")

    stop = _Preemption()
    tracing = False
    try:
        for step in range(start, cfg.steps):
            if profile is not None and step == profile[1]:
                jax.profiler.start_trace(profile[0])
                tracing = True
            batch = data.global_batch_arrays(step, trainer.batch_sh)
            state, metrics = trainer.step(state, batch)
            done = step + 1
            if pending is not None:
                flush()
                pending = None
            if done % cfg.log_every == 0 or done == cfg.steps:
                pending = (done, metrics)
            if tracing and done >= profile[2]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.requested:
                ckpt.save(done, state, trainer.frozen, meta_for(done))
                saved = done
            bar.update(1)
            if stop.requested:
                break
        if pending is not None:
            flush()
    finally:
        stop.restore()
        if tracing:
            jax.profiler.stop_trace()
    bar.close()
    if stop.requested:  # preempted: the checkpoint of this step is saved; rerun the command to resume
        ckpt.close()
        log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume", saved, ckpt.directory)
        return QATResult(step=int(saved), history=rows, resumed_from=latest, quantized=None,
                         state=state if return_state else None)
    final = int(jax.device_get(state.step))
    if saved != final:
        ckpt.save(final, state, trainer.frozen, meta_for(final))
    ckpt.close()
    quant_dir = out / "quantized"
    exported = trainer.export_model(state, stack.dit.config)
    if main:
        if rows:
            (plot_losses if hooks is None else hooks.plot)(rows, out / "train_loss.png")
        meta = {"method": "qat" if hooks is None else hooks.name, "qat": cfg.to_dict(), "sensitivity": sens,
                "steps": final, **({} if hooks is None else {"method_config": hooks.describe()["config"]}),
                "chunk_weights": None if omega is None else omega.tolist()}
        save_quantized(quant_dir, exported, metadata=meta, overwrite=True)  # host arrays, no cross-process sync
        write_run_json(out / "qat.json", {**meta, "mesh": dict(mesh.shape), "resumed_from": latest,
                                          "final_loss": rows[-1]["loss"] if rows else None})
    if jax.process_count() > 1:  # the others wait until OUT/quantized is written
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qarvd_qat_export_done")
    return QATResult(step=final, history=rows, resumed_from=latest, quantized=os.fspath(quant_dir),
                     state=state if return_state else None)
