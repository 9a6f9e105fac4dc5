"""Integer linear layer running the :mod:`kernels_pallas` matmuls, and the loader of an integer export.

``IntLinear`` has ``nnx.Linear``'s call interface (``x [..., K] -> y [..., N]``) and computes

    y = Σ_s s_x[s] s_w[s, n] Σ_{k in segment s} (q_x[m, k] - z_x[s]) (q_w[n, k] - z_w[s, n]) + b[n]

with int8 activations ``q_x`` quantized from the float input inside the kernel prologue (static
per-tensor scale), int8 or packed-int4 weights, exact int32 accumulation and a float32 epilogue
(:mod:`kernels_pallas.quant_common`). Dual-scale layers first gather ``x[..., perm]`` (outlier
channels first). Backends:

* ``'xla'``: ``lax.dot_general`` s8 x s8 -> s32 (any device);
* ``'pallas'``: ``pallas_tpu`` on a TPU, ``pallas_gpu`` (Mosaic GPU) on a Hopper GPU; on CPU only
  with ``interpret=True`` (tests; the TPU kernel in the Pallas interpreter);
* ``'pallas_tpu'``, ``'pallas_gpu'``, ``'reference'``: explicit kernel backends.

Layers whose shapes miss the kernel constraints (N % 128, K % 128 for W8 / K % 256 for W4,
``n_outlier`` a multiple of 32 and <= K/2 for W4) run the XLA integer path with the same arrays and the
same epilogue (no padding); :attr:`IntLinear.kernel_backend` says which one a layer uses.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import quant_common as qc
from kernels_pallas import w4a8_matmul, w8a8_matmul
from kernels_pallas.xla_quant_matmul import quant_matmul_xla
from qarvd_jax.quant.integer.export import ARRAY_NAMES, load_export
from qarvd_jax.utils.nnx_io import load_variables

__all__ = ["IntLayerSpec", "IntState", "IntLinear", "int_linear_apply", "resolve_backend", "kernel_constraints_ok",
           "load_integer_model", "layer_kernel_backends", "INT_BACKENDS"]

log = logging.getLogger(__name__)

INT_BACKENDS = ("xla", "pallas", "pallas_tpu", "pallas_gpu", "reference")


class IntState(nnx.Variable):
    """Integer-layer arrays (codes, scales, zero points, column sums, bias, permutation)."""


@dataclass(frozen=True)
class IntLayerSpec:
    """Static (hashable) description of one integer layer."""

    name: str
    in_features: int
    out_features: int
    w_bits: int
    n_outlier: int = 0
    has_bias: bool = True

    @property
    def groups(self) -> int:
        return 2 if self.n_outlier else 1

    @classmethod
    def from_meta(cls, name: str, d: dict) -> "IntLayerSpec":
        return cls(name=name, in_features=int(d["in_features"]), out_features=int(d["out_features"]),
                   w_bits=int(d["w_bits"]), n_outlier=int(d["n_outlier"]), has_bias=bool(d["has_bias"]))


def kernel_constraints_ok(spec: IntLayerSpec) -> bool:
    """Whether the Pallas kernels accept the layer's shapes (else it uses the XLA integer path)."""
    k, n, o = spec.in_features, spec.out_features, spec.n_outlier
    k_align = 256 if spec.w_bits == 4 else 128
    limit = k // 2 if spec.w_bits == 4 else k - 1
    return n % 128 == 0 and k % k_align == 0 and (o == 0 or (o % 32 == 0 and o <= limit))


def resolve_backend(backend: str, interpret: bool = False) -> str:
    """'xla' | 'pallas' | explicit kernel backend -> a :data:`kernels_pallas.quant_common.BACKENDS` name."""
    if backend not in INT_BACKENDS:
        raise ValueError(f"backend must be one of {INT_BACKENDS}, got {backend!r}")
    if backend != "pallas":
        return backend
    platform = jax.default_backend()
    picked = qc.resolve_backend(None)  # TPU -> pallas_tpu, Hopper GPU -> pallas_gpu, else xla
    if picked != "xla":
        return picked
    if interpret and platform == "cpu":
        return "pallas_tpu"  # the Pallas interpreter (tests)
    raise ValueError(f"backend='pallas' needs a TPU or a Hopper GPU (jax.default_backend()={platform!r}); "
                     "use backend='xla' (or interpret=True on CPU, for tests)")


def _segments(spec: IntLayerSpec) -> tuple[int, ...]:
    k, o = spec.in_features, spec.n_outlier
    return (o, k - o) if o else (k,)


def int_linear_apply(x: jax.Array, arrays: dict, spec: IntLayerSpec, *, backend: str, interpret=False,
                     out_dtype=jnp.float32, accumulator_only: bool = False) -> jax.Array:
    """The integer linear on already-permuted 2-D activations (a pure function).

    Args:
      x: [M, K] float (bf16/f16/f32), K in ``perm`` order (outlier channels first); or int8 codes already
        quantized with the export's ``a_scale``/``a_zero`` (signed: unsigned code - 128).
      arrays: the layer's export arrays (see :mod:`qarvd_jax.quant.integer.export`); ``perm`` unused.
      backend: a kernel backend name (``'xla'``, ``'pallas_tpu'``, ``'pallas_gpu'``, ``'reference'``);
        layers that miss the kernel constraints always run :func:`quant_matmul_xla`.
      interpret: Pallas interpret mode (CPU tests).
      accumulator_only: return the exact zero-point-corrected int32 accumulators
        ``sum_k (q_x - z_x)(q_w - z_w)`` per segment, [S, M, N], instead of the scaled output.

    Returns:
      [M, N] ``out_dtype`` (or the accumulators).
    """
    w = arrays["w"]
    bias = arrays.get("bias")
    w4 = spec.w_bits == 4
    if kernel_constraints_ok(spec):
        one = (lambda a: a[0]) if spec.groups == 1 else (lambda a: a)
        op, extra = (w4a8_matmul, {"w_signed": False}) if w4 else (w8a8_matmul, {})
        return op(x, w, one(arrays["w_scale"]), one(arrays["w_zero"]), x_scale=one(arrays["a_scale"]),
                  x_zero=one(arrays["a_zero"]), bias=bias, w_colsum=one(arrays["w_colsum"]),
                  n_outlier=spec.n_outlier, out_dtype=out_dtype, backend=backend, interpret=interpret,
                  accumulator_only=accumulator_only, **extra)
    # Shapes the kernels reject: the XLA integer path with a hand-built (unvalidated) spec.
    mspec = qc.MatmulSpec(m=x.shape[0], n=spec.out_features, k=spec.in_features, n_outlier=spec.n_outlier,
                          weight_bits=spec.w_bits, w_signed=not w4, act="int8" if x.dtype == jnp.int8 else "quantize",
                          per_token=False, has_bias=bias is not None,
                          out_dtype=jnp.dtype(jnp.int32 if accumulator_only else out_dtype),
                          accumulator_only=accumulator_only)
    x_scale = jnp.asarray(arrays["a_scale"], jnp.float32)[:, None]  # (S, 1): per tensor
    w_zero = jnp.asarray(arrays["w_zero"], jnp.int32)
    seg_len = jnp.asarray(_segments(spec), jnp.int32)[:, None]
    qp = qc.QuantParams(x_scale=x_scale, x_inv_scale=1.0 / x_scale,
                        x_zero=jnp.asarray(arrays["a_zero"], jnp.int32)[:, None],
                        w_scale=jnp.asarray(arrays["w_scale"], jnp.float32), w_zero=w_zero,
                        w_czero=jnp.asarray(arrays["w_colsum"], jnp.int32) - seg_len * w_zero,
                        bias=None if bias is None else jnp.asarray(bias, jnp.float32))
    return quant_matmul_xla(x, w, qp, mspec)


class IntLinear(nnx.Module):
    """Integer replacement of an ``nnx.Linear`` (same call: ``x [..., in] -> [..., out]``).

    Args:
      arrays: the layer's export arrays (host or device); held as :class:`IntState` variables.
      spec: its :class:`IntLayerSpec`.
      backend: see the module docstring; interpret: Pallas interpret mode (CPU tests).
      dtype: compute dtype: the input is cast to it and the output has it (as ``nnx.Linear``).
    """

    def __init__(self, arrays: dict, spec: IntLayerSpec, *, backend: str = "xla", interpret: bool = False,
                 dtype=jnp.float32):
        _check_arrays(arrays, spec)
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.dtype = jnp.dtype(dtype)
        self.interpret = bool(interpret)
        wanted = resolve_backend(backend, interpret)
        self.kernel_backend = wanted if kernel_constraints_ok(spec) else "xla"
        for key in ARRAY_NAMES:
            setattr(self, key, IntState(jnp.asarray(arrays[key])) if key in arrays else None)

    @property
    def backend_label(self) -> str:
        """:attr:`kernel_backend`, or ``'xla (shape fallback)'`` when the shapes miss the kernel constraints."""
        return self.kernel_backend if kernel_constraints_ok(self.spec) else "xla (shape fallback)"

    def arrays(self) -> dict:
        """The layer's arrays by name (absent ones left out)."""
        return {n: getattr(self, n)[...] for n in ARRAY_NAMES if getattr(self, n) is not None}

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.spec.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.astype(self.dtype)
        if self.perm is not None:
            x = jnp.take(x, self.perm[...], axis=-1)
        lead = x.shape[:-1]
        y = int_linear_apply(x.reshape(-1, self.in_features), self.arrays(), self.spec, backend=self.kernel_backend,
                             interpret=self.interpret, out_dtype=self.dtype)
        return y.reshape(*lead, self.out_features)


def _check_arrays(arrays: dict, spec: IntLayerSpec) -> None:
    """Shapes and dtypes of a layer's arrays against its spec (ValueError naming the layer)."""
    k, n, s = spec.in_features, spec.out_features, spec.groups
    want = {"w": ((n, k // 2) if spec.w_bits == 4 else (n, k), np.uint8 if spec.w_bits == 4 else np.int8),
            "w_scale": ((s, n), np.float32), "w_zero": ((s, n), np.int32), "w_colsum": ((s, n), np.int32),
            "a_scale": ((s,), np.float32), "a_zero": ((s,), np.int32)}
    if spec.has_bias:
        want["bias"] = ((n,), None)
    if spec.n_outlier:
        want["perm"] = ((k,), np.int32)
    extra = sorted(set(arrays) - set(want))
    if extra:
        raise ValueError(f"{spec.name}: unexpected arrays {extra}")
    for key, (shape, dtype) in want.items():
        if key not in arrays:
            raise ValueError(f"{spec.name}: export lacks {key!r}")
        a = arrays[key]
        if tuple(a.shape) != shape or (dtype is not None and np.dtype(a.dtype) != np.dtype(dtype)):
            raise ValueError(f"{spec.name}: {key} is {np.dtype(a.dtype).name}{tuple(a.shape)}, expected "
                             f"{np.dtype(dtype).name if dtype else 'float'}{shape}")


# ------------------------------------------------------------------------------------------- loader
def _node_at(tree: dict, path: tuple, where: str):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            raise ValueError(f"{where}: export lacks {'/'.join(map(str, path))}")
        node = node[p]
    return node


def load_integer_model(path: str | os.PathLike, backend: str = "xla", dtype: str | None = None, *,
                       interpret: bool = False):
    """Rebuild a CausalWanModel whose quantized linears are :class:`IntLinear` from a `qarvd export` folder.

    Args:
      path: the export folder.
      backend: 'xla' | 'pallas' | 'pallas_tpu' | 'pallas_gpu' | 'reference' (see the module docstring).
      dtype: compute / float-param dtype override (default: the export's); integer arrays are unchanged.
      interpret: Pallas interpret mode (CPU tests only).

    Returns:
      the model (the export's metadata: :func:`~qarvd_jax.quant.integer.export.load_export`).
    """
    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.quant.qlinear import _parent_and_key

    path = os.fspath(path)
    trees, meta = load_export(path)
    resolve_backend(backend, interpret)  # fail early on an unavailable backend
    cfg = WanDiTConfig.from_dict(meta["model_config"])
    if dtype:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    model = nnx.eval_shape(lambda: CausalWanModel(cfg, rngs=nnx.Rngs(0)))
    by_path = {tuple(d["path"]): name for name, d in meta["layers"].items()}
    found, names = Counter(), set()
    for lpath, _ in [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]:
        if lpath not in by_path:
            continue
        name = by_path[lpath]
        if meta["layers"][name].get("method"):  # a method's own integer layer (dvd-quant)
            import inspect

            from qarvd_jax.quant import methods

            make = methods.get(meta["layers"][name]["method"]).integer_module
            kw = ({"backend": backend, "interpret": interpret}
                  if "backend" in inspect.signature(make).parameters else {})  # dvd-quant has kernel backends
            layer = make(_node_at(trees["int"], lpath, path), meta["layers"][name], dtype=cfg.dtype, **kw)
        else:
            spec = IntLayerSpec.from_meta(name, meta["layers"][name])
            layer = IntLinear(_node_at(trees["int"], lpath, path), spec, backend=backend, interpret=interpret,
                              dtype=cfg.dtype)
        parent, key = _parent_and_key(model, lpath)
        if isinstance(key, int):
            parent[key] = layer
        else:
            setattr(parent, key, layer)
        found[layer.backend_label] += 1
        names.add(name)
    missing = sorted(set(meta["layers"]) - names)
    if missing:
        raise ValueError(f"{path}: no linear layer at {missing[:5]} in the model")
    n_have = len(jax.tree.leaves(trees["params"]))
    n_want = len(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    if n_have != n_want:
        raise ValueError(f"{path}: export has {n_have} float params, the model expects {n_want}")
    load_variables(model, nnx.Param, trees["params"], float_dtype=jnp.dtype(cfg.param_dtype), source=path)
    log.info("integer model: %s", ", ".join(f"{v} layers on {k}" for k, v in sorted(found.items())))
    return model


def layer_kernel_backends(model: nnx.Module) -> dict[str, str]:
    """``name -> backend`` of every IntLinear (and method integer layer with a ``layer_name``, e.g.
    dvd-quant's); ``'xla (shape fallback)'`` marks layers whose shapes miss the kernel constraints."""
    out = {n.spec.name: n.backend_label for _, n in nnx.iter_graph(model) if isinstance(n, IntLinear)}
    out.update({n.layer_name: n.backend_label for _, n in nnx.iter_graph(model)
                if getattr(n, "layer_name", None) and hasattr(n, "backend_label")})
    return out

