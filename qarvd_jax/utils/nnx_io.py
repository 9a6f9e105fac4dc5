"""Filling an NNX module's variables from a nested dict of host arrays (checked, cast)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["load_variables"]


def _lookup(tree: Mapping, path, source: str):
    node = tree
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", None))
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"{source} lacks {jax.tree_util.keystr(path)}")
        node = node[key]
    return node


def load_variables(module: nnx.Module, collection, tree: Mapping, *, float_dtype=None, source: str = "params") -> None:
    """Set every ``collection`` variable of ``module`` from ``tree`` (same nesting as
    ``nnx.to_pure_dict``). Shapes must match exactly (ValueError naming the path); floating arrays
    are cast to ``float_dtype`` when given, other dtypes are kept."""
    state = nnx.state(module, collection)

    def load(path, ref):
        arr = np.asarray(_lookup(tree, path, source))
        if arr.shape != tuple(ref.shape):
            raise ValueError(f"{source}: {jax.tree_util.keystr(path)} has shape {arr.shape}, expected {tuple(ref.shape)}")
        cast = float_dtype if float_dtype is not None and arr.dtype.kind in "fV" else arr.dtype
        return jnp.asarray(arr, cast)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(state)))
    nnx.update(module, state)
