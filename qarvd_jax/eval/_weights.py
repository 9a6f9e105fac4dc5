"""Strict loading of PyTorch-layout state dicts into the metric networks (shared by LPIPS and I3D)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.state_dict_io import read_state_dict

__all__ = ["Slot", "assign_strict", "conv_slots", "read_weights"]


@dataclass(frozen=True)
class Slot:
    """One original tensor: expected torch shape, the NNX variable it fills and the layout map."""

    torch_shape: tuple[int, ...]
    variable: nnx.Variable
    from_torch: Callable[[np.ndarray], np.ndarray]


def conv_slots(prefix: str, conv: nnx.Conv) -> dict[str, Slot]:
    """Slots of an ``nnx.Conv`` (kernel ``[*k, in, out]``) under torch names ``prefix.weight``/``.bias``."""
    k = conv.kernel
    nd = len(k.shape)
    perm = (nd - 1, nd - 2, *range(nd - 2))  # [*k, in, out] -> torch [out, in, *k]
    inv = tuple(int(i) for i in np.argsort(perm))
    out = {f"{prefix}.weight": Slot(tuple(k.shape[i] for i in perm), k, lambda a, p=inv: np.transpose(a, p))}
    if conv.bias is not None:
        out[f"{prefix}.bias"] = Slot(tuple(conv.bias.shape), conv.bias, np.asarray)
    return out


def read_weights(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Read a ``.pt/.pth/.safetensors`` state dict (torch-free); drops a DataParallel ``module.`` prefix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found: {path}")
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def assign_strict(slots: Mapping[str, Slot], state: Mapping[str, np.ndarray], source: str,
                  ignore: Iterable[str] = ()) -> None:
    """Copy ``state`` into ``slots``; every slot must be present with its exact shape.

    Keys of ``state`` without a slot that match a pattern in ``ignore`` (``fnmatch``, e.g.
    ``"classifier.*"``) are skipped; any other key without a slot is an error. Raises ValueError
    listing every missing, unexpected and mis-shaped key of ``source``.
    """
    ignore = tuple(ignore)
    problems = [f"missing {k!r} (expected shape {list(s.torch_shape)})" for k, s in slots.items()
                if k not in state]
    problems += [f"unexpected {k!r} (shape {list(np.shape(v))})" for k, v in state.items()
                 if k not in slots and not any(fnmatch.fnmatchcase(k, p) for p in ignore)]
    problems += [f"{k!r} has shape {list(np.shape(state[k]))}, expected {list(s.torch_shape)}"
                 for k, s in slots.items() if k in state and tuple(np.shape(state[k])) != s.torch_shape]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise ValueError(f"{source}: state dict does not match: {shown}")
    for k, s in slots.items():
        arr = np.asarray(state[k], dtype=np.float32)
        s.variable.set_value(jnp.asarray(s.from_torch(arr)))
