"""``qarvd export``: a fake-quantized checkpoint -> packed integer weights + scales (Orbax).

Per quantized layer (``S`` = 1 group, or 2 for dual scale with the outlier group first; ``K`` input
features, ``N`` output features), the export holds, in the signed layout of :mod:`kernels_pallas`:

============  =================  ======  ================================================================
``w``         [N, K] / [N, K/2]  int8    W8: Q-ARVD codes - 128 (-128..127);
                                 uint8   W4: unsigned codes 0..15 packed two per byte along K
                                         (half-split, ``kernels_pallas.int4_pack``, ``w_signed=False``)
``w_scale``   [S, N]             f32     per-output-channel step Δ_w
``w_zero``    [S, N]             int32   zero point in the stored code's frame (W8: z - 128, W4: z)
``w_colsum``  [S, N]             int32   Σ_k of the stored codes over each K segment (kernel epilogue)
``a_scale``   [S]                f32     static per-tensor activation step Δ_a
``a_zero``    [S]                int32   activation zero point - 128 (uint8 grid -> int8)
``bias``      [N]                dtype   (only if the layer has one)
``perm``      [K]                int32   dual scale only: input channel of each stored K position
                                         (outlier channels first); the layer gathers ``x[..., perm]``
============  =================  ======  ================================================================

K is in ``perm`` order, so segment 0 is ``[0, n_outlier)`` and segment 1 the rest. Codes are
``clamp(round(w/Δ) + z, 0, 2^b - 1)`` computed by :func:`qarvd_jax.quant.fake_quant.quantize`, the
fake-quant path's own quantizer, so the dequantized export equals the fake-quantized weights bit for
bit. Non-quantized parameters keep their structure (``nnx.Param`` pure dict) in the export dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import int4_pack
from kernels_pallas.quant_common import weight_colsum
from qarvd_jax.quant.fake_quant import QuantParams, QuantSpec, quantize
from qarvd_jax.quant.recipe import LayerQuantConfig

__all__ = ["INT_FORMAT", "SUPPORTED_W_BITS", "ARRAY_NAMES", "export_layer", "export_model",
           "export_checkpoint", "nonfinite_arrays", "save_export", "load_export", "is_integer_export",
           "resolve_quantized_checkpoint", "layer_bytes", "format_bytes_report"]

INT_FORMAT = "qarvd-jax/integer-wan-dit/v1"
SUPPORTED_W_BITS = (4, 8)
_A_BITS = 8
ARRAY_NAMES = ("w", "w_scale", "w_zero", "w_colsum", "a_scale", "a_zero", "bias", "perm")


# ------------------------------------------------------------------------------------------- one layer
def _check_layer(name: str, state: Mapping[str, Any], cfg: LayerQuantConfig, shape) -> None:
    """Raise ValueError (naming the layer) unless the integer kernels can run it exactly."""
    if cfg.w_spec is None or cfg.a_spec is None:
        raise ValueError(f"{name}: the integer export needs quantized weights and activations "
                         f"(w_spec={cfg.w_spec}, a_spec={cfg.a_spec})")
    bits = cfg.w_spec.bits
    if bits not in SUPPORTED_W_BITS:
        raise ValueError(f"{name}: w_bits={bits} is not supported by the integer kernels "
                         f"(supported: {SUPPORTED_W_BITS})")
    if cfg.a_spec.bits != _A_BITS:
        raise ValueError(f"{name}: a_bits={cfg.a_spec.bits} is not supported by the integer kernels (only 8)")
    if cfg.w_spec != QuantSpec.qarvd_weight(bits, axis=0):
        raise ValueError(f"{name}: weight quantizer {cfg.w_spec} is not per-output-channel asymmetric "
                         "with an integer zero point")
    if cfg.a_spec != QuantSpec.qarvd_activation(_A_BITS):
        raise ValueError(f"{name}: activation quantizer {cfg.a_spec} is not static per-tensor asymmetric "
                         "with an integer zero point")
    for flag in ("w_on", "a_on"):
        if float(np.asarray(state[flag])) != 1.0:
            raise ValueError(f"{name}: quantizer flag {flag}={float(np.asarray(state[flag]))}; export needs "
                             "a checkpoint with every quantizer on (as `qarvd quantize` saves it)")
    k = shape[0]
    if bits == 4 and k % 2:
        raise ValueError(f"{name}: int4 packing needs an even number of input features, got K={k}")


def export_layer(name: str, kernel, bias, state: Mapping[str, Any], cfg: LayerQuantConfig,
                 bias_dtype=None) -> dict[str, np.ndarray]:
    """Integer arrays of one QuantLinear (a pure function of its params and QuantState).

    Args:
      kernel: [K, N] float (Flax layout); bias: [N] or None.
      state: the layer's QuantState values (``QuantLinear.state_dict()``).
      cfg: its LayerQuantConfig. bias_dtype: stored bias dtype (default: the bias's own).

    Returns:
      name -> host array, layouts as in the module docstring.
    """
    kernel = np.asarray(kernel)
    _check_layer(name, state, cfg, kernel.shape)
    k, n = kernel.shape
    bits, dual = cfg.w_spec.bits, bool(cfg.n_outlier)
    w = jnp.asarray(kernel, jnp.float32).T  # [N, K]
    perm = (np.concatenate([np.asarray(state["outlier_idx"]), np.asarray(state["normal_idx"])]).astype(np.int32)
            if dual else np.arange(k, dtype=np.int32))
    if sorted(perm.tolist()) != list(range(k)):
        raise ValueError(f"{name}: outlier_idx/normal_idx are not a permutation of the {k} input channels")
    bounds = [0, cfg.n_outlier, k] if dual else [0, k]
    w_scale = np.asarray(state["w_scale"], np.float32)
    w_zero = np.round(np.asarray(state["w_zero"], np.float32)).astype(np.int32)
    codes = jnp.concatenate([
        quantize(jnp.take(w, perm[lo:hi], axis=1), QuantParams(w_scale[g], w_zero[g].astype(np.float32)),
                 cfg.w_spec)
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))], axis=1)  # [N, K] int32 in [0, 2^b-1]
    if bits == 8:
        w_store, w_zero, signed = np.asarray(codes - 128, np.int8), w_zero - 128, True
    else:
        w_store, signed = np.asarray(int4_pack.pack_int4(codes, signed=False)), False
    colsum = weight_colsum(jnp.asarray(w_store), n_outlier=cfg.n_outlier, packed=bits == 4, signed=signed)
    out = {
        "w": w_store,
        "w_scale": w_scale,
        "w_zero": w_zero,
        "w_colsum": np.asarray(colsum, np.int32).reshape(len(bounds) - 1, n),
        "a_scale": np.asarray(state["a_scale"], np.float32),
        "a_zero": np.round(np.asarray(state["a_zero"], np.float32)).astype(np.int32) - 128,
    }
    if bias is not None:
        out["bias"] = np.asarray(bias, bias_dtype or np.asarray(bias).dtype)
    if dual:
        out["perm"] = perm
    return out


def layer_bytes(arrays: Mapping[str, np.ndarray], in_features: int, out_features: int) -> dict[str, int]:
    """Real byte sizes of one exported layer: ``weight`` (codes), ``total`` (every stored array) and
    ``bf16`` (the layer's kernel + bias in bfloat16)."""
    has_bias = "bias" in arrays
    return {"weight": int(arrays["w"].nbytes), "total": int(sum(a.nbytes for a in arrays.values())),
            "bf16": 2 * (in_features * out_features + (out_features if has_bias else 0))}


# ------------------------------------------------------------------------------------------- the model
def _delete_path(tree: dict, path: tuple) -> dict:
    """Pop the subtree at ``path`` from a nested pure dict (in place); returns it."""
    node = tree
    for p in path[:-1]:
        node = node[p]
    return node.pop(path[-1])


def _set_path(tree: dict, path: tuple, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def _prune_empty(tree):
    if isinstance(tree, dict):
        return {k: v for k, v in ((k, _prune_empty(v)) for k, v in tree.items()) if not (isinstance(v, dict) and not v)}
    return tree


def export_model(model: nnx.Module, dtype: str | None = None, *, progress: bool = False
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Integer export of a quantized CausalWanModel (QuantLinears with their QuantState), in memory.

    Args:
      dtype: storage dtype of the non-quantized float params and the biases (default: the model's
        ``param_dtype``).

    Returns:
      ``(trees, meta)``: ``trees = {"params": float pure dict without the quantized layers,
      "int": pure dict with one array dict per quantized layer at its module path}`` (host numpy);
      ``meta``: format, model_config (``param_dtype`` = ``dtype``), per-layer shapes/bits/bytes, totals.
      ``progress`` shows a tqdm bar over the quantized layers.
    """
    from tqdm.auto import tqdm

    from qarvd_jax.models.wan.params import flax_path_to_torch_name
    from qarvd_jax.quant.qlinear import QuantLinear

    cfg = model.config
    dtype = dtype or cfg.param_dtype
    np_dtype = jnp.dtype(dtype)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    int_tree: dict = {}
    layers: dict[str, dict] = {}
    qlayers = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)]
    from qarvd_jax.quant.methods.model import iter_method_layers

    from qarvd_jax.quant import methods

    no_int = {(layer.method, name) for name, layer in iter_method_layers(model)
              if not hasattr(methods.get(layer.method), "export_integer_layer")}
    if no_int:
        method, name = sorted(no_int)[0]
        raise ValueError(f"method {method!r} has no integer form (layer {name} and {len(no_int) - 1} more); "
                         "`qarvd export` takes rtn (static activations), gptq and qarvd checkpoints")
    for path, node in tqdm(qlayers, desc="export", unit="layer", disable=not progress):
        name = flax_path_to_torch_name(path)
        _delete_path(params, path)
        k, n = node.kernel[...].shape
        bias = node.bias[...] if node.bias is not None else None
        arrays = export_layer(name, node.kernel[...], bias, node.state_dict(), node.cfg, bias_dtype=np_dtype)
        _set_path(int_tree, path, arrays)
        layers[name] = {"path": [p if isinstance(p, int) else str(p) for p in path], "in_features": int(k),
                        "out_features": int(n), "w_bits": node.cfg.w_spec.bits, "a_bits": node.cfg.a_spec.bits,
                        "n_outlier": int(node.cfg.n_outlier), "has_bias": bias is not None,
                        "bytes": layer_bytes(arrays, k, n)}
    for path, node in [(p, n) for p, n in nnx.iter_graph(model) if hasattr(n, "quantized_layer")]:
        name = flax_path_to_torch_name(path)  # method layers with an integer form (dvd-quant)
        _delete_path(params, path)
        arrays, info = methods.get(node.method).export_integer_layer(node, np_dtype)
        _set_path(int_tree, path, arrays)
        layers[name] = {"path": [p if isinstance(p, int) else str(p) for p in path], **info}
    if not layers:
        raise ValueError("the model has no quantized layers (QuantLinear); export needs a `qarvd quantize` "
                         "checkpoint")
    params = _prune_empty(jax.tree.map(lambda a: a.astype(np_dtype) if a.dtype.kind == "f" else a, params))
    other = int(sum(a.nbytes for a in jax.tree.leaves(params)))
    totals = {key: sum(lay["bytes"][key] for lay in layers.values()) for key in ("weight", "total", "bf16")}
    meta = {"format": INT_FORMAT, "model_config": cfg.replace(param_dtype=dtype).to_dict(), "dtype": dtype,
            "layers": layers, "bytes": {"quantized_layers": totals, "other_params": other,
                                        "other_params_dtype": dtype, "export_total": totals["total"] + other}}
    return {"params": params, "int": int_tree}, meta


def resolve_quantized_checkpoint(path: str | os.PathLike) -> str:
    """A `qarvd quantize` checkpoint folder, or its run folder holding ``quantized/``."""
    from qarvd_jax.quant.checkpoint import is_quantized_checkpoint

    path = os.fspath(path)
    if not is_quantized_checkpoint(path) and is_quantized_checkpoint(os.path.join(path, "quantized")):
        return os.path.join(path, "quantized")
    return path


def save_export(dst: str | os.PathLike, trees: Mapping[str, Any], meta: Mapping[str, Any], *,
                overwrite: bool = False) -> str:
    """Write an export atomically (Orbax items ``params`` and ``int`` + JSON ``metadata``)."""
    from qarvd_jax.utils.orbax_io import save_trees

    return save_trees(dst, {"params": trees["params"], "int": trees["int"]}, meta, overwrite=overwrite)


def nonfinite_arrays(model: nnx.Module) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` of every parameter and quantizer state array of ``model`` (for NaN/inf checks)."""
    from qarvd_jax.models.wan.params import flax_path_to_torch_name

    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model))):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        out.append((flax_path_to_torch_name(keys), leaf))
    return out


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                      overwrite: bool = False, allow_nonfinite: bool = False, progress: bool = False
                      ) -> dict[str, Any]:
    """Load a quantized checkpoint (or its run folder), export it to ``dst``; returns the metadata.

    ``dst`` is checked before loading: it may not be (or contain) the source, and an existing one
    is replaced (``overwrite``) only if it is an integer export. NaN/inf in the weights or
    quantizer state are refused, naming the tensors, unless ``allow_nonfinite``.
    """
    from convert.state_dict_io import FiniteCheck, check_destination
    from qarvd_jax.quant.checkpoint import load_quantized_model

    orig = src
    src = resolve_quantized_checkpoint(src)
    check_destination(dst, kind="dir", overwrite=overwrite, sources=[orig, src], replaceable=is_integer_export,
                      what="an integer export")
    model, src_meta = load_quantized_model(src)
    FiniteCheck(os.fspath(src), allow_nonfinite).add_all(nonfinite_arrays(model)).finish()
    trees, meta = export_model(model, dtype, progress=progress)
    from qarvd_jax.utils.epaths import is_url

    meta["source"] = {"checkpoint": os.fspath(src) if is_url(src) else os.path.abspath(src),
                      **{k: v for k, v in src_meta.items() if k not in ("layers", "model_config", "format")}}
    save_export(dst, trees, meta, overwrite=overwrite)
    return meta


def is_integer_export(path: str | os.PathLike) -> bool:
    from qarvd_jax.utils.orbax_io import is_orbax_dir

    return is_orbax_dir(path, "int")


def _numpy_tree(tree):
    """Orbax restores leaves as numpy arrays; make scalars 0-d arrays too."""
    return jax.tree.map(np.asarray, tree)


def load_export(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an export: ``(trees, meta)`` as returned by :func:`export_model` (host numpy arrays)."""
    from qarvd_jax.quant.checkpoint import is_quantized_checkpoint
    from qarvd_jax.utils.orbax_io import check_committed, load_trees

    path = os.fspath(path)
    check_committed(path)
    if not is_integer_export(path):
        hint = (" (it is a fake-quant checkpoint: run `qarvd export` on it first, or use --backend fake)"
                if is_quantized_checkpoint(path) or is_quantized_checkpoint(os.path.join(path, "quantized"))
                else "; produce one with `qarvd export`")
        raise ValueError(f"{path}: not an integer export (no int/ item){hint}")
    trees, meta = load_trees(path, ("params", "int"))
    if meta.get("format") != INT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {INT_FORMAT}")
    return {k: _numpy_tree(v) for k, v in trees.items()}, meta


def _mib(b: int) -> str:
    return f"{b / 2**20:.3f} MiB"


def format_bytes_report(meta: Mapping[str, Any]) -> str:
    """Human-readable byte accounting of an export's metadata."""
    q, b = meta["bytes"]["quantized_layers"], meta["bytes"]
    bits = sorted({lay["w_bits"] for lay in meta["layers"].values()})
    return (f"{len(meta['layers'])} quantized layers (W{'/'.join(map(str, bits))}A8): {_mib(q['total'])} integer "
            f"({_mib(q['weight'])} weight codes + {_mib(q['total'] - q['weight'])} scales/zeros/colsums/bias/perm) "
            f"vs {_mib(q['bf16'])} in bf16 = {q['total'] / q['bf16']:.3f}x (codes alone {q['weight'] / q['bf16']:.3f}x)"
            f"\nother params ({b['other_params_dtype']}): {_mib(b['other_params'])}; "
            f"export total {_mib(b['export_total'])}")
