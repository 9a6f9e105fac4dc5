"""Small Orbax helpers: named pytrees of host arrays + JSON metadata in one checkpoint directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["save_trees", "load_trees", "is_orbax_dir"]


def is_orbax_dir(path: str | os.PathLike, item: str = "params") -> bool:
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, item))


def save_trees(dst: str | os.PathLike, trees: Mapping[str, Any], metadata: Mapping[str, Any], *,
               overwrite: bool = False) -> str:
    """Write ``trees`` (name -> pytree of arrays) and ``metadata`` (JSON) atomically to ``dst``."""
    import orbax.checkpoint as ocp

    from convert.state_dict_io import atomic_output, is_saved_tree_dir

    if "metadata" in trees:
        raise ValueError("'metadata' is reserved for the JSON item")
    with atomic_output(dst, overwrite=overwrite, kind="dir", replaceable=is_saved_tree_dir,
                       what="an Orbax checkpoint") as tmp:
        # host arrays written by this process alone: no barrier with the other processes of a multi-host
        # run (which would wait forever for processes that do not call save_trees)
        me = jax.process_index()
        mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        handlers = {k: ocp.PyTreeCheckpointHandler(multiprocessing_options=mp) for k in trees}
        handler = ocp.CompositeCheckpointHandler(
            composite_options=ocp.CompositeOptions(multiprocessing_options=mp),
            metadata=ocp.JsonCheckpointHandler(multiprocessing_options=mp), **handlers)
        ckpt = ocp.Checkpointer(handler, multiprocessing_options=mp)
        args = {k: ocp.args.PyTreeSave(v) for k, v in trees.items()}
        ckpt.save(tmp, args=ocp.args.Composite(metadata=ocp.args.JsonSave(dict(metadata)), **args))
        ckpt.close()
    return os.fspath(dst)


def _int_keys(tree):
    """Orbax stores dict keys as strings; turn numeric ones back into list indices."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def load_trees(path: str | os.PathLike, names: tuple[str, ...]) -> tuple[dict[str, Any], dict]:
    """Read the named pytrees as host numpy arrays, plus the JSON metadata."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    handlers = {n: ocp.PyTreeCheckpointHandler() for n in names}
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler(metadata=ocp.JsonCheckpointHandler(), **handlers))
    items = ckpt.metadata(path).item_metadata
    args = {}
    for name in names:
        if name not in items or items[name] is None:
            raise ValueError(f"{path}: checkpoint has no '{name}' item")
        tree_meta = getattr(items[name], "tree", items[name])
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
        args[name] = ocp.args.PyTreeRestore(restore_args=restore_args)
    out = ckpt.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore(), **args))
    ckpt.close()
    return {n: _int_keys(out[n]) for n in names}, dict(out["metadata"])
