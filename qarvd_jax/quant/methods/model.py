"""Model-level quantization through rules: collect each layer's calibration inputs with the streaming
pipeline, then run the chosen method's ``quantize_layer`` per layer and install the result.

Rules (:class:`MethodRule`) match PyTorch module paths (``blocks.3.ffn.0``; ``fnmatch``, ``*``
crosses dots); the first match decides the method and its config overrides (``w_bits``, ``a_bits``,
any ``Config`` field), so mixed precision and mixed methods are a rule list. Unmatched layers stay
full precision. Calibration inputs are taken from the full-precision model (not sequentially from
already-quantized layers), on every model call of every chunk: the S denoising passes and the
context pass (``steps`` 0..S), cross-attention K/V once per video (step 0).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qarvd_jax.quant.calibration import _layer_name
from qarvd_jax.quant.methods.base import MethodLinear, QuantizedLayer, layer_weight_bytes

__all__ = ["Calibration", "MethodRule", "default_rules", "collect_layer_inputs", "quantize_model_with_rules",
           "install_layer", "iter_method_layers"]

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Calibration videos: prompt embeddings [n, L, text_dim], one seed per video, latents
    ``latent_shape`` (F, C, h, w), the sampler (None: Self-Forcing defaults), the chunk sensitivity
    (Q-ARVD chunk weights; others ignore it), and the per-layer row budget: at most
    ``tokens_per_call`` rows of every recorded call and ``max_tokens`` rows in all (random, seeded; while
    recording a layer never holds more than 2 x ``max_tokens`` rows). ``layer_group``: record and quantize
    this many layers per generation pass (None: all at once), bounding host memory on the real model."""

    prompt_embeds: np.ndarray
    seeds: Sequence[int]
    latent_shape: tuple[int, int, int, int]
    sampler: Any = None
    sensitivity: Sequence[float] | None = None
    tokens_per_call: int | None = 256
    max_tokens: int | None = 4096
    seed: int = 0
    layer_group: int | None = None


@dataclass(frozen=True)
class MethodRule:
    """Layers matching ``pattern`` use ``method`` (None: the calling method) with ``overrides``
    (``(("w_bits", 4), ("a_bits", None))``) applied to its config; ``skip=True`` keeps them FP."""

    pattern: str
    method: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    skip: bool = False

    @classmethod
    def make(cls, pattern: str, method: str | None = None, *, skip: bool = False, **overrides) -> "MethodRule":
        return cls(pattern, method, tuple(sorted(overrides.items())), skip)


def default_rules(config) -> tuple[MethodRule, ...]:
    """One rule per pattern of ``config.layers`` (default every transformer-block linear)."""
    return tuple(MethodRule(p) for p in getattr(config, "layers", ("blocks.*",)))


def _torch_name(path) -> str:
    from qarvd_jax.models.wan.params import flax_path_to_torch_name

    return flax_path_to_torch_name(tuple(path))


def _linears(model) -> list[tuple[tuple, str, nnx.Linear]]:
    return [(p, _torch_name(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]


def iter_method_layers(model):
    """``(pytorch_name, MethodLinear)`` in module order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, MethodLinear):
            yield _torch_name(path), node


def _set_module(model, path: tuple, module) -> None:
    node = model
    for p in path[:-1]:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    if isinstance(path[-1], int):
        node[path[-1]] = module
    else:
        setattr(node, path[-1], module)


class _Rows:
    """Per-layer row store with a per-call and total budget (seeded subsampling)."""

    def __init__(self, cal: Calibration):
        self.cal = cal
        self.x: dict[str, list[np.ndarray]] = {}
        self.steps: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, x: np.ndarray, step: int) -> None:
        x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        k = self.cal.tokens_per_call
        if k is not None and x.shape[0] > k:
            rng = np.random.default_rng([self.cal.seed, len(self.x.get(name, ())), zlib.crc32(name.encode())])
            x = x[np.sort(rng.choice(x.shape[0], k, replace=False))]
        self.x.setdefault(name, []).append(x)
        self.steps.setdefault(name, []).append(np.full((x.shape[0],), step, np.int32))
        m = self.cal.max_tokens
        if m is not None and sum(len(v) for v in self.x[name]) > 2 * m:
            xs, ss = self.get(name)
            self.x[name], self.steps[name] = [xs], [ss]

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        x, s = np.concatenate(self.x[name]), np.concatenate(self.steps[name])
        m = self.cal.max_tokens
        if m is not None and x.shape[0] > m:
            rng = np.random.default_rng([self.cal.seed, zlib.crc32(name.encode())])
            rows = np.sort(rng.choice(x.shape[0], m, replace=False))
            x, s = x[rows], s[rows]
        return x, s


def collect_layer_inputs(model, names: Sequence[str], cal: Calibration, *, desc: str = "calibration inputs"
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (x [n, in] float32, steps [n] int32)`` for the full-precision linears ``names`` of a
    copy of ``model`` (the model itself is not modified)."""
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
    from qarvd_jax.quant.qlinear import quantize_model, set_collect
    from qarvd_jax.quant.recipe import QuantRule

    work = nnx.clone(model)
    quantize_model(work, tuple(QuantRule(n, None, None, dual_scale=False, reconstruct=False) for n in names))
    set_collect(work, True)
    pipe = CausalInferencePipeline(work, cal.sampler)
    rows = _Rows(cal)
    for emb, seed in tqdm(list(zip(cal.prompt_embeds, cal.seeds)), desc=desc, leave=False):
        emb = jnp.asarray(emb, jnp.dtype(model.config.dtype))[None]
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 << 20), (1, *cal.latent_shape),
                                  jnp.dtype(model.config.dtype))
        for rec in pipe.stream(noise, emb, seed=seed):
            for path, leaf in jax.tree_util.tree_flatten_with_path(rec.extras["intermediates"])[0]:
                leaf = np.asarray(leaf)  # [S+1, ...(sow tuple), B, T, C] stacked over passes
                for s in range(leaf.shape[0]):
                    rows.add(_layer_name(path), leaf[s], s)
        for path, leaf in jax.tree_util.tree_flatten_with_path(pipe.last_cross_intermediates)[0]:
            rows.add(_layer_name(path), np.asarray(leaf), 0)
    missing = [n for n in names if n not in rows.x]
    if missing:
        raise ValueError(f"no calibration inputs were recorded for {missing[:5]}")
    return {n: rows.get(n) for n in names}


def install_layer(model, path: tuple, linear: nnx.Linear, layer: QuantizedLayer, name: str = "") -> None:
    """Replace ``linear`` (at ``path``) by the method's module: a :class:`QuantLinear` when the method
    maps the layer onto that layout (``to_quant_linear``), else a :class:`MethodLinear`."""
    from qarvd_jax.quant import methods
    from qarvd_jax.quant.qlinear import QuantLinear

    m = methods.get(layer.method)
    as_q = getattr(m, "to_quant_linear", None)
    conv = as_q(layer) if as_q is not None else None
    if conv is not None:
        cfg, state = conv
        q = QuantLinear(linear, dataclasses.replace(cfg, name=name))
        q.kernel = nnx.Param(jnp.asarray(layer.kernel, linear.kernel[...].dtype))
        for k, v in state.items():
            getattr(q, k)[...] = jnp.asarray(v, jnp.float32)
    else:
        dt = linear.kernel[...].dtype
        layer = QuantizedLayer(layer.method, jnp.asarray(layer.kernel, dt),
                               None if layer.bias is None else jnp.asarray(layer.bias, dt), layer.state, layer.static)
        q = MethodLinear(layer, linear.dtype, linear.precision)
    _set_module(model, path, q)


def resolve_rules(model, rules, method_name: str, config) -> dict[str, tuple[tuple, nnx.Linear, str, Any]]:
    """``name -> (path, linear, method, config)`` of every linear a non-skip rule matches."""
    from qarvd_jax.quant import methods

    out = {}
    for path, name, lin in _linears(model):
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None or rule.skip:
            continue
        mname = rule.method or method_name
        m = methods.get(mname)
        base = config if mname == method_name else m.Config(
            **{k: getattr(config, k) for k in ("w_bits", "a_bits") if hasattr(config, k)})
        cfg = dataclasses.replace(base, **dict(rule.overrides)) if rule.overrides else base
        out[name] = (path, lin, mname, cfg)
    return out


def quantize_model_with_rules(model, calibration: Calibration | Mapping[str, Any] | None, config, rules,
                              method_name: str) -> dict:
    """Quantize ``model`` in place, layer by layer, as ``rules`` say. Returns a summary
    ``{"method", "config", "layers": {name: {"method", "w_bits", "a_bits", "config"}}}``."""
    from qarvd_jax.quant import methods

    rules = tuple(rules) if rules is not None else default_rules(config)
    plan = resolve_rules(model, rules, method_name, config)
    if not plan:
        raise ValueError(f"no linear layer matches the rules {[r.pattern for r in rules]}")
    needs = [n for n, (_, _, m, cfg) in plan.items() if methods.get(m).needs_calibration(cfg)]
    if needs and calibration is None:
        raise ValueError(f"{method_name}: these layers need calibration data: {needs[:5]}")
    given = isinstance(calibration, Mapping)
    names = list(plan)
    size = (None if given or calibration is None else calibration.layer_group) or len(names)
    fp = model if size >= len(names) or given else nnx.clone(model)  # every group records the FP model
    summary = {}
    bar = tqdm(total=len(names), desc=f"quantize ({method_name})", leave=False)
    for i in range(0, len(names), size):
        group = names[i:i + size]
        want = [n for n in group if n in needs]
        if given:
            inputs = {n: (v if isinstance(v, tuple) else (v, None)) for n, v in calibration.items()}
        else:
            inputs = collect_layer_inputs(fp, want, calibration) if want else {}
        for name in group:
            path, lin, mname, cfg = plan[name]
            x, steps = inputs.get(name, (None, None))
            bias = lin.bias[...] if lin.bias is not None else None
            layer = methods.get(mname).quantize_layer(lin.kernel[...], bias, x, cfg, steps=steps)
            install_layer(model, path, lin, layer, name)
            summary[name] = {"method": mname, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
                             "config": dataclasses.asdict(cfg)}
            bar.update(1)
        del inputs
    bar.close()
    return {"method": method_name, "config": dataclasses.asdict(config), "layers": summary}


def model_weight_bytes(model) -> int:
    """Deployed bytes of the DiT: quantized layers by their method's ``weight_bytes``, every other
    parameter at 16 bits."""
    from qarvd_jax.quant import methods
    from qarvd_jax.quant.qlinear import iter_quant_layers

    total = 0
    counted = set()
    for _, layer in iter_quant_layers(model):
        k = layer.kernel[...]
        bits = layer.cfg.w_spec.bits if layer.cfg.w_spec is not None else None
        st = {n: v for n, v in layer.state_dict().items() if n not in ("outlier_idx", "normal_idx")}
        total += layer_weight_bytes(k.shape[0], k.shape[1], bits, st, has_bias=layer.bias is not None)
        counted.update({id(layer.kernel), id(layer.bias)})
    for _, layer in iter_method_layers(model):
        total += methods.get(layer.method).weight_bytes(layer.quantized_layer())
        counted.update({id(layer.kernel), id(layer.bias)})
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and id(var) not in counted:
            total += int(np.prod(var[...].shape)) * 2  # 16-bit deployment of the other params
    return int(total)


# ------------------------------------------------------------------------------------- checkpoints
def method_layers_metadata(model) -> dict[str, dict]:
    """``name -> {"method", "static", "state", "bias"}`` of every MethodLinear (JSON-ready; ``state``
    maps each state array to ``[shape, dtype]``) for :func:`~qarvd_jax.quant.checkpoint.save_quantized`."""
    from qarvd_jax.quant.methods.base import static_to_dict

    out = {}
    for name, layer in iter_method_layers(model):
        q = layer.quantized_layer()
        out[name] = {"method": layer.method, "static": static_to_dict(layer.static),
                     "state": {n: [list(np.shape(v)), str(jnp.asarray(v).dtype)] for n, v in q.state.items()},
                     "bias": layer.bias is not None}
    return out


def install_placeholders(model, meta: Mapping[str, dict]) -> None:
    """Replace the linears named in ``meta`` (from :func:`method_layers_metadata`) by abstract
    MethodLinears of the saved shapes, to be filled by ``load_variables``."""
    from qarvd_jax.quant.methods.base import static_from_dict

    found = set()
    for path, name, lin in _linears(model):
        if name not in meta:
            continue
        m = meta[name]
        kshape = tuple(lin.kernel.shape)
        dt = lin.kernel.dtype
        static = static_from_dict(m["static"])
        state = {n: (tuple(s), d) for n, (s, d) in m["state"].items()}

        def build(m=m, kshape=kshape, dt=dt, static=static, state=state, lin=lin):
            layer = QuantizedLayer(m["method"], jnp.zeros(kshape, dt),
                                   jnp.zeros((kshape[1],), dt) if m["bias"] else None,
                                   {n: jnp.zeros(s, d) for n, (s, d) in state.items()}, static)
            return MethodLinear(layer, lin.dtype, lin.precision)

        _set_module(model, path, nnx.eval_shape(build))
        found.add(name)
    missing = sorted(set(meta) - found)
    if missing:
        raise ValueError(f"no linear layer named {missing[:5]} in the model")


def reset_step_context(model) -> None:
    """Concrete zero step/chunk indices in every MethodLinear (after an abstract restore)."""
    from qarvd_jax.quant.methods.base import StepContext

    for _, layer in iter_method_layers(model):
        layer.step_index = StepContext(jnp.zeros((), jnp.int32))
        layer.chunk_index = StepContext(jnp.zeros((), jnp.int32))
