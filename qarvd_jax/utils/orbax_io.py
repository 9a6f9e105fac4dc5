"""Small Orbax helpers: named pytrees of host arrays + JSON metadata in one checkpoint directory.

The directory may be a URL ``etils.epath`` handles (``gs://bucket/run/quantized``): it is written to a
local temporary folder, copied up file by file, and committed by :data:`COMMIT_MARKER`, written last.
Object stores have no atomic rename, so the marker is what makes an upload complete: a copy cut short
(preemption, a lost connection) has none, and reading it is a clear error instead of a half-read model.
Local directories are atomic by rename (``convert.state_dict_io.atomic_output``) and carry no marker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["COMMIT_MARKER", "save_trees", "load_trees", "is_orbax_dir", "check_committed"]

COMMIT_MARKER = "qarvd_commit_success.txt"  # written last into an uploaded (URL) checkpoint directory


def is_orbax_dir(path: str | os.PathLike, item: str = "params") -> bool:
    """Whether ``path`` (local or URL) is a checkpoint directory holding ``item``; an upload without its
    :data:`COMMIT_MARKER` counts too, so that :func:`load_trees` can name the problem."""
    from qarvd_jax.utils.epaths import is_url, out_path

    if not is_url(path):
        return os.path.isdir(path) and os.path.isdir(os.path.join(path, item))
    p = out_path(path)
    return p.is_dir() and (p / item).is_dir()


def check_committed(path) -> None:
    """A URL directory holding checkpoint items must carry :data:`COMMIT_MARKER` (its upload finished);
    anything else (a local path, a URL that is no checkpoint) is left to the caller's own checks."""
    from qarvd_jax.utils.epaths import is_url, out_path

    if not is_url(path):
        return
    p = out_path(path)
    if p.is_dir() and any((p / n).exists() for n in ("metadata", "params")) and not (p / COMMIT_MARKER).exists():
        raise ValueError(f"{path}: incomplete upload (no {COMMIT_MARKER}; the copy was interrupted before it "
                         "finished): write the checkpoint again")


def _save_url(dst, trees, metadata, overwrite: bool, replaceable, what: str) -> str:
    """Save locally into a temporary folder, then copy up to the URL ``dst`` with the commit marker last.
    Replacing an existing directory first removes its marker, so a replacement cut short is never read
    as the old or the new checkpoint."""
    import tempfile

    from qarvd_jax.errors import OutputError
    from qarvd_jax.utils.epaths import copy_tree, out_path

    target = out_path(dst)
    if target.exists():
        if not overwrite:
            raise OutputError(f"{target} exists; choose another path or overwrite it")
        if not replaceable(target):
            raise OutputError(f"{target} exists and is not {what}; not replacing it")
        if (target / COMMIT_MARKER).exists():
            (target / COMMIT_MARKER).unlink()
        target.rmtree()
    with tempfile.TemporaryDirectory(prefix="qarvd-upload-") as tmp:
        local = save_trees(os.path.join(tmp, "ckpt"), trees, metadata)
        copy_tree(local, target)
    (target / COMMIT_MARKER).write_text("the upload of this checkpoint directory finished\n")
    return os.fspath(target)


def save_trees(dst: str | os.PathLike, trees: Mapping[str, Any], metadata: Mapping[str, Any], *,
               overwrite: bool = False) -> str:
    """Write ``trees`` (name -> pytree of arrays) and ``metadata`` (JSON) atomically to ``dst`` (a local
    path, or a URL: uploaded, then committed by :data:`COMMIT_MARKER`)."""
    import orbax.checkpoint as ocp

    from convert.state_dict_io import atomic_output, is_saved_tree_dir
    from qarvd_jax.utils.epaths import is_url

    if "metadata" in trees:
        raise ValueError("'metadata' is reserved for the JSON item")
    if is_url(dst):
        first = next(iter(trees))
        return _save_url(dst, trees, metadata, overwrite, lambda p: (p / first).is_dir(), "a checkpoint with "
                         f"a {first}/ item")
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
    """Read the named pytrees as host numpy arrays, plus the JSON metadata (``path`` local or a URL)."""
    import orbax.checkpoint as ocp

    from qarvd_jax.utils.epaths import is_url, out_path

    check_committed(path)
    path = out_path(path) if is_url(path) else os.path.abspath(os.fspath(path))
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
