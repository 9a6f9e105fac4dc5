"""Building a CausalWanModel from a Flax param dict (any dtype) and extracting it back."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan.model import CausalWanModel
from qarvd_jax.utils.nnx_io import load_variables

__all__ = ["abstract_model", "model_from_params", "model_params"]


def abstract_model(cfg: WanDiTConfig) -> CausalWanModel:
    """A model with shape-only parameters (no memory, no RNG work): a target for loading."""
    return nnx.eval_shape(lambda: CausalWanModel(cfg, rngs=nnx.Rngs(0)))


def model_from_params(params: Mapping, cfg: WanDiTConfig) -> CausalWanModel:
    """Instantiate the model with ``params`` (nested Flax dict) cast to ``cfg.param_dtype``.

    Shapes are checked against the config; a mismatch raises ValueError naming the path.
    """
    model = abstract_model(cfg)
    load_variables(model, nnx.Param, params, float_dtype=jnp.dtype(cfg.param_dtype))
    return model


def model_params(model: CausalWanModel) -> dict:
    """Nested Flax param dict (host numpy) of a model, the inverse of :func:`model_from_params`."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
