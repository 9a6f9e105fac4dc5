"""QAT methods of :mod:`qarvd_jax.quant.methods` (``qvgen``, ``lsq``, ``efficientdm``) on the sharded trainer.

:class:`MethodHooks` plugs a method into :func:`qarvd_jax.train.qat.run_qat` / :class:`~qarvd_jax.train.qat.QATTrainer`
(same mesh, logical-axis shardings, per-call distillation objective, Orbax checkpoints and resume); only
what differs from Q-ARVD's QAT lives here:

* student: a float32-master copy of the DiT quantized by the method's ``quantize_model`` (its
  ``quantize_layer`` returns each layer at initialisation; calibration videos only when the method's
  ``needs_calibration``);
* teacher: the frozen full-precision DiT as its own graph (:class:`MethodLinear` layers have no
  quantizer flags to switch off), in the compute dtype, sharded by the same rules;
* trained leaves: every ``nnx.Param`` when the config's ``train_weights`` (else the module's ``TRAIN_PARAMS``;
  full fine-tune) plus the layer
  state leaves the module's ``param_group(name)`` puts in a group; AdamW per group with the module's
  ``learning_rates(config)`` (``weight`` for Params), the QATConfig warm-up + cosine schedule, betas and
  eps, weight decay on Params only, global-norm clipping;
* every step: the step context (pass and chunk index) is written into each call
  (``Distiller(step_context=True)``), the module's ``train_hooks`` fill frozen per-step leaves
  (``frozen_layer``: QVGen's γ) and transform the layer states after the update (``trained_layer``:
  re-SVD at rank-decay boundaries; steps are projected to ``>= min_scale``), and add integer
  metrics (``layer_metrics``, max-reduced for ``*_rank``, summed otherwise; logged as ``log_keys``);
* export: ``finalize_layer`` of every layer (QVGen: Φ removed; EfficientDM: LoRA merged), Params back
  to the deployed dtype; ``OUT/quantized`` is a normal method checkpoint.

``OUT/train_log.jsonl`` rows gain the hooks' ``log_keys`` (QVGen: ``phi_rank``, ``phi_params`` after the
step); ``OUT/train_loss.png`` shows the loss and, when logged, the Φ rank.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qarvd_jax.train import sharding as shd
from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.state import abstract_like, lr_schedule

__all__ = ["MethodHooks", "map_layer_states", "is_qat_method", "split_overrides", "train_method_copy"]


def is_qat_method(name: str) -> bool:
    from qarvd_jax.quant import methods

    return bool(getattr(methods.get(name), "QAT", False))


def split_overrides(name: str, overrides) -> tuple[list[str], list[str]]:
    """``KEY=VALUE`` items -> (method Config items, QATConfig items); a key of neither is an error."""
    from qarvd_jax.quant import methods

    mf = set(methods.get(name).Config.__dataclass_fields__)
    qf = set(QATConfig.__dataclass_fields__)
    mine, qat = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in mf:
            mine.append(item)
        elif key in qf:
            qat.append(item)
        else:
            raise ValueError(f"override {item!r}: {key!r} is neither a {name} Config field nor a QATConfig field")
    return mine, qat


def map_layer_states(tree, fn):
    """Apply ``fn(dict name -> array) -> dict`` to the ``q_<name>`` leaves of every MethodLinear of ``tree``
    (an ``nnx.State`` or pure dict; leaves grouped by their parent path). Same structure back."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    groups: dict[tuple, dict[str, int]] = {}
    for i, (path, _) in enumerate(leaves):
        names = shd._names(path)
        if names and isinstance(names[-1], str) and names[-1].startswith("q_"):
            groups.setdefault(tuple(names[:-1]), {})[names[-1][2:]] = i
    out = [x for _, x in leaves]
    for idx in groups.values():
        new = fn({k: out[i] for k, i in idx.items()})
        for k, i in idx.items():
            out[i] = new[k]
    return jax.tree_util.tree_unflatten(treedef, out)


def _layer_dicts(tree) -> list[dict]:
    found = []
    map_layer_states(tree, lambda st: found.append(st) or st)
    return found


class MethodHooks:
    """A QAT method's hooks for the trainer (see the module docstring).

    Args:
      name: method name (``qvgen``, ``lsq``, ``efficientdm``); config: its ``Config``; cfg: the QATConfig.
    """

    def __init__(self, name: str, config, cfg: QATConfig):
        from qarvd_jax.quant import methods

        self.module = methods.get(name)
        self.name = self.module.NAME
        if not getattr(self.module, "QAT", False):
            raise ValueError(f"method {self.name!r} is not a QAT method (post-training: use `qarvd quantize "
                             f"--method {self.name}` without training)")
        if cfg.rollout_gradient != "per_call":
            raise ValueError(f"{self.name}: rollout_gradient={cfg.rollout_gradient!r}; QAT methods train with the "
                             f"per_call objective (rollout_gradient=per_call)")
        self.config, self.cfg = config, cfg
        make = getattr(self.module, "train_hooks", None)
        # schedules over the lr schedule's length (lr_schedule_steps or steps): a resumed/extended run keeps them
        self.layer_hooks = make(config, cfg.schedule_steps) if make is not None else None
        self.log_keys = tuple(getattr(self.layer_hooks, "log_keys", ()))
        self.fp_model = None

    def describe(self) -> dict:
        return {"name": self.name, "config": json_ready(dataclasses.asdict(self.config))}

    def key(self) -> tuple:
        return (self.name, self.config, self.cfg.schedule_steps)

    # ------------------------------------------------------------------------------ student / teacher
    def prepare_student(self, stack, calib_embeds):
        """The quantized float32-master student (the FP master copy is kept as the teacher)."""
        from qarvd_jax.quant.methods.model import Calibration
        from qarvd_jax.train.qat import fp32_master

        model = fp32_master(stack.dit, self.cfg)
        self.fp_model = nnx.clone(model)
        cal = None
        if self.module.needs_calibration(self.config):
            cal = Calibration(np.asarray(calib_embeds), [self.cfg.seed + i for i in range(len(calib_embeds))],
                              tuple(stack.latent_shape), stack.t2v.pipeline.config)
        self.module.quantize_model(model, cal, self.config)
        return model

    def abstract_student(self, model_config):
        """Shapes only (memory planning, ``scripts/plan_memory.py``): the quantized float32-master student of
        ``model_config`` as an ``nnx.eval_shape`` model; the teacher is kept abstract too. Layers that need
        calibration get zero inputs (their activation steps are computed eagerly on them; only shapes matter)."""
        from qarvd_jax.models.wan.model import CausalWanModel
        from qarvd_jax.quant.methods.model import default_rules, resolve_rules

        mcfg = model_config.replace(param_dtype="float32", dtype=self.cfg.compute_dtype, attention=self.cfg.attention)
        make = lambda: CausalWanModel(mcfg, rngs=nnx.Rngs(0))  # noqa: E731
        self.fp_model = nnx.eval_shape(make)
        cal = None
        if self.module.needs_calibration(self.config):
            plan = resolve_rules(self.fp_model, default_rules(self.config), self.name, self.config)
            cal = {n: np.zeros((16, lin.kernel.shape[0]), np.float32) for n, (_, lin, _, _) in plan.items()}

        def build():
            model = make()
            with jax.ensure_compile_time_eval():  # calibration-only arithmetic on the concrete zero inputs
                self.module.quantize_model(model, cal, self.config)
            return model

        return nnx.eval_shape(build)

    def teacher(self, trainer, latent_shape, sampler, omega, abstract: bool):
        """``(states, shardings, Distiller)`` of the full-precision teacher (Params in the compute dtype)."""
        from qarvd_jax.train.qat import _put

        if self.fp_model is None:
            raise RuntimeError("MethodHooks.teacher before prepare_student")
        graphdef, params, rest = nnx.split(self.fp_model, nnx.Param, ...)
        dt = jnp.dtype(self.cfg.compute_dtype)
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt if jnp.issubdtype(x.dtype, jnp.floating)
                                                               else x.dtype), params) if abstract else \
            jax.tree.map(lambda x: np.asarray(x, dt) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x),
                         params)
        rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if abstract else np.asarray(x), rest)
        sh = (shd.tree_shardings(params, trainer.mesh, trainer.rules), shd.tree_shardings(rest, trainer.mesh,
                                                                                          trainer.rules))
        states = (abstract_like(params, sh[0]), abstract_like(rest, sh[1])) if abstract else \
            (_put(params, sh[0]), _put(rest, sh[1]))
        distiller = trainer.make_distiller(graphdef, self.fp_model, latent_shape, sampler, omega, False)
        self.fp_model = None  # the teacher now lives on the devices
        return states, sh, distiller

    # ------------------------------------------------------------------------------ optimiser
    def trainable_filter(self):
        from qarvd_jax.quant import lsq_quant
        from qarvd_jax.quant.qlinear import QuantState

        names = {"q_" + n for n in lsq_quant.TRAINABLE if self.module.param_group(n) is not None}
        is_state = lambda path, x: isinstance(x, QuantState) and bool(path) and path[-1] in names  # noqa: E731
        full = getattr(self.config, "train_weights", getattr(self.module, "TRAIN_PARAMS", False))
        return nnx.Any(nnx.Param, is_state) if full else is_state

    def _label(self, path, _x) -> str:
        leaf = shd._names(path)[-1]
        return self.module.param_group(leaf[2:]) if isinstance(leaf, str) and leaf.startswith("q_") else "weight"

    def optimizer(self, trainable) -> optax.GradientTransformation:
        """Global-norm clip, then AdamW per group (weight decay on ``weight`` only), warm-up + cosine."""
        cfg = self.cfg
        labels = jax.tree_util.tree_map_with_path(self._label, trainable)
        lrs = self.module.learning_rates(self.config)

        def sched(peak):
            base = lr_schedule(cfg, peak)
            return lambda count: base(count + 1)

        groups = {g: optax.adamw(sched(lr), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay if g == "weight" else 0.0)
                  for g, lr in lrs.items()}
        chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
        return optax.chain(*chain, optax.multi_transform(groups, labels))

    # ------------------------------------------------------------------------------ per step (traced)
    def frozen_at(self, frozen, step):
        if self.layer_hooks is None or not hasattr(self.layer_hooks, "frozen_layer"):
            return frozen
        return map_layer_states(frozen, lambda st: self.layer_hooks.frozen_layer(st, step))

    def after_update(self, trainable, new_step):
        lo = self.cfg.min_scale

        def one(st):
            st = {k: (jnp.maximum(v, lo) if k in ("w_scale", "a_scale") else v) for k, v in st.items()}
            if self.layer_hooks is not None and hasattr(self.layer_hooks, "trained_layer"):
                st = self.layer_hooks.trained_layer(st, new_step)
            return st

        return map_layer_states(trainable, one)

    def metrics(self, trainable, step) -> dict:
        if not self.log_keys:
            return {}
        per = [self.layer_hooks.layer_metrics(st, step) for st in _layer_dicts(trainable)]
        out = {}
        for k in self.log_keys:
            vals = jnp.stack([jnp.asarray(p[k], jnp.int32) for p in per]) if per else jnp.zeros((1,), jnp.int32)
            out[k] = jnp.max(vals) if k.endswith("_rank") else jnp.sum(vals)
        return out

    # ------------------------------------------------------------------------------ export / plots
    def export(self, trained, fp_config):
        """The deployed model on host: finalized method layers, Params in ``fp_config.param_dtype``."""
        from qarvd_jax.models.wan.model import CausalWanModel
        from qarvd_jax.quant.methods.base import MethodLinear, QuantizedLayer
        from qarvd_jax.quant.methods.model import _set_module

        model = nnx.eval_shape(lambda: CausalWanModel(fp_config, rngs=nnx.Rngs(0)))
        dt = jnp.dtype(fp_config.param_dtype)
        finalize = getattr(self.module, "finalize_layer", lambda lyr: lyr)
        for path, node in list(nnx.iter_graph(trained)):
            if not isinstance(node, MethodLinear):
                continue
            lyr = finalize(node.quantized_layer())
            lyr = QuantizedLayer(lyr.method, np.asarray(lyr.kernel, dt), None if lyr.bias is None else
                                 np.asarray(lyr.bias, dt), {k: np.asarray(v) for k, v in lyr.state.items()},
                                 lyr.static)
            target = model
            for p in path:
                target = target[p] if isinstance(p, int) else getattr(target, p)
            _set_module(model, path, MethodLinear(lyr, target.dtype, target.precision))
        params = nnx.state(model, nnx.Param)
        pure = jax.tree.map(lambda x: np.asarray(x, dt), nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
        nnx.replace_by_pure_dict(params, pure)
        nnx.update(model, params)
        return model

    def plot(self, rows: list[dict], path: str) -> None:
        """Loss (log) and, when logged, the Φ rank against the step."""
        from qarvd_jax.train.run_io import plot_losses

        plot_losses(rows, path, title=f"{self.name}: loss and Φ rank", rank_key="phi_rank")


def json_ready(d):
    if isinstance(d, dict):
        return {k: json_ready(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_ready(v) for v in d]
    return d


def train_method_copy(stack, name: str, config, steps: int, prompts, *, out_dir: str, qat_config: QATConfig | None = None,
                      seed: int = 0, sensitivity=None):
    """``qarvd compare``'s QAT run: train ``name`` for ``steps`` steps on ``prompts`` into ``out_dir`` (resumes
    there) and return the deployed model (loaded back from ``out_dir/quantized``)."""
    from qarvd_jax.quant.checkpoint import load_quantized_model
    from qarvd_jax.train.qat import run_qat

    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1 for the QAT method {name}")
    cfg = (qat_config or QATConfig()).replace(steps=int(steps), seed=seed)
    res = run_qat(stack, cfg, list(prompts), out_dir=out_dir, sensitivity=sensitivity, method=(name, config))
    model = load_quantized_model(res.quantized)
    return model[0] if isinstance(model, tuple) else model
