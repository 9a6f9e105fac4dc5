"""Orbax checkpoints of quantized DiTs: weights (``nnx.Param``), quantizer state (``QuantState``) and
metadata (model config, per-layer quantization configs, recipe, sensitivity), restored unchanged."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.quant.qlinear import QuantState, install_layers, iter_quant_layers
from qarvd_jax.quant.recipe import LayerQuantConfig
from qarvd_jax.utils.nnx_io import load_variables
from qarvd_jax.utils.orbax_io import check_committed, is_orbax_dir, load_trees, save_trees

__all__ = ["QUANT_FORMAT", "save_quantized", "load_quantized_model", "is_quantized_checkpoint"]

QUANT_FORMAT = "qarvd-jax/quantized-wan-dit/v1"


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def save_quantized(dst: str | os.PathLike, model: nnx.Module, *, metadata: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str:
    """Save a quantized CausalWanModel (params + QuantState + layer configs) as an Orbax directory; ``dst`` may
    be a URL ``etils.epath`` handles (``gs://...``; uploaded, then committed by a marker file written last,
    :data:`qarvd_jax.utils.orbax_io.COMMIT_MARKER`)."""
    from qarvd_jax.quant.methods.model import method_layers_metadata

    layers = {name: layer.cfg.to_dict() for name, layer in iter_quant_layers(model)}
    method_layers = method_layers_metadata(model)  # layers of methods beyond the QuantLinear layout
    if not layers and not method_layers:
        raise ValueError("the model has no quantized layers; quantize it before saving")
    meta = {"format": QUANT_FORMAT, "model_config": model.config.to_dict(), "layers": layers, **(metadata or {})}
    if method_layers:
        meta["method_layers"] = method_layers
    params = _host(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    quant = _host(nnx.to_pure_dict(nnx.state(model, QuantState)))
    return save_trees(dst, {"params": params, "quant": quant}, meta, overwrite=overwrite)


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return is_orbax_dir(path, "quant")


def load_quantized_model(path: str | os.PathLike, dtype: str | None = None):
    """Rebuild the quantized model saved by :func:`save_quantized`.

    ``dtype`` overrides the model's param/compute dtype (e.g. bfloat16 for inference); the quantizer
    state stays float32. Returns ``(model, metadata)``.
    """
    from qarvd_jax.models.wan.model import CausalWanModel

    path = os.fspath(path)  # a local folder or a URL (gs://...)
    check_committed(path)
    if not is_quantized_checkpoint(path):
        raise ValueError(f"{path}: not a quantized checkpoint (no quant/ item); produce one with `qarvd quantize`")
    trees, meta = load_trees(path, ("params", "quant"))
    if meta.get("format") != QUANT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {QUANT_FORMAT}")
    cfg = WanDiTConfig.from_dict(meta["model_config"])
    if dtype:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    layers = {n: LayerQuantConfig.from_dict(d) for n, d in meta["layers"].items()}
    model = nnx.eval_shape(lambda: CausalWanModel(cfg, rngs=nnx.Rngs(0)))
    placeholders = {n: np.arange(c.n_outlier) for n, c in layers.items() if c.n_outlier}
    install_layers(model, layers, placeholders)
    if meta.get("method_layers"):
        from qarvd_jax.quant.methods.model import install_placeholders

        install_placeholders(model, meta["method_layers"])
    load_variables(model, nnx.Param, trees["params"], float_dtype=jnp.dtype(cfg.param_dtype), source=path)
    load_variables(model, QuantState, trees["quant"], source=path)
    if meta.get("method_layers"):
        from qarvd_jax.quant.methods.model import reset_step_context

        reset_step_context(model)
    return model, meta
