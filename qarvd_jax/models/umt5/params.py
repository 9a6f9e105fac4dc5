"""Original umT5 checkpoint names <-> the NNX parameter tree.

The key layout is that of ``models_t5_umt5-xxl-enc-bf16.pth`` (``T5Encoder.state_dict()``; 242
tensors for umT5-XXL). Linear weights are PyTorch ``[out, in]`` and become NNX kernels ``[in, out]``;
embeddings and norm weights keep their layout:

=============================================  ==========================================
original key                                   NNX path
=============================================  ==========================================
``token_embedding.weight`` [V, D]              ``token_embedding.embedding``
``blocks.{i}.norm1.weight`` [D]                ``blocks[i].norm1.weight``
``blocks.{i}.attn.{q,k,v}.weight`` [Da, D]     ``blocks[i].attn.{q,k,v}.kernel`` [D, Da]
``blocks.{i}.attn.o.weight`` [D, Da]           ``blocks[i].attn.o.kernel`` [Da, D]
``blocks.{i}.norm2.weight`` [D]                ``blocks[i].norm2.weight``
``blocks.{i}.ffn.gate.0.weight`` [F, D]        ``blocks[i].ffn.gate.kernel`` [D, F] (GELU branch)
``blocks.{i}.ffn.fc1.weight`` [F, D]           ``blocks[i].ffn.fc1.kernel`` [D, F]
``blocks.{i}.ffn.fc2.weight`` [D, F]           ``blocks[i].ffn.fc2.kernel`` [F, D]
``blocks.{i}.pos_embedding.embedding.weight``  ``blocks[i].pos_embedding.embedding.embedding`` [32, H]
``norm.weight`` [D]                            ``norm.weight``
=============================================  ==========================================

(``shared_pos=True`` configs have one top-level ``pos_embedding.embedding.weight`` instead.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.umt5.config import UMT5Config
from qarvd_jax.models.umt5.model import UMT5Encoder

__all__ = [
    "ParamSpec",
    "umt5_param_specs",
    "validate_state_dict",
    "load_state_dict_into",
    "load_umt5",
    "iter_torch_state_dict",
    "to_torch_state_dict",
]


@dataclass(frozen=True)
class ParamSpec:
    """Where one original tensor lives in the NNX tree.

    ``path`` is a tuple of attribute names / list indices; ``torch_shape`` the checkpoint shape;
    ``transpose`` is true for Linear weights (``[out, in]`` <-> kernel ``[in, out]``).
    """

    path: tuple[str | int, ...]
    torch_shape: tuple[int, ...]
    transpose: bool = False


def umt5_param_specs(config: UMT5Config) -> dict[str, ParamSpec]:
    """``{original key: ParamSpec}`` for every tensor of the encoder, in checkpoint order."""
    d, da, f = config.dim, config.dim_attn, config.dim_ffn
    pos_shape = (config.num_buckets, config.num_heads)
    specs: dict[str, ParamSpec] = {
        "token_embedding.weight": ParamSpec(("token_embedding", "embedding"), (config.vocab_size, d)),
    }
    if config.shared_pos:
        specs["pos_embedding.embedding.weight"] = ParamSpec(("pos_embedding", "embedding", "embedding"), pos_shape)
    for i in range(config.num_layers):
        p, b = f"blocks.{i}.", ("blocks", i)
        specs[p + "norm1.weight"] = ParamSpec(b + ("norm1", "weight"), (d,))
        for name in "qkv":
            specs[p + f"attn.{name}.weight"] = ParamSpec(b + ("attn", name, "kernel"), (da, d), True)
        specs[p + "attn.o.weight"] = ParamSpec(b + ("attn", "o", "kernel"), (d, da), True)
        specs[p + "norm2.weight"] = ParamSpec(b + ("norm2", "weight"), (d,))
        specs[p + "ffn.gate.0.weight"] = ParamSpec(b + ("ffn", "gate", "kernel"), (f, d), True)
        specs[p + "ffn.fc1.weight"] = ParamSpec(b + ("ffn", "fc1", "kernel"), (f, d), True)
        specs[p + "ffn.fc2.weight"] = ParamSpec(b + ("ffn", "fc2", "kernel"), (d, f), True)
        if not config.shared_pos:
            specs[p + "pos_embedding.embedding.weight"] = ParamSpec(
                b + ("pos_embedding", "embedding", "embedding"), pos_shape)
    specs["norm.weight"] = ParamSpec(("norm", "weight"), (d,))
    return specs


def _get_variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{'.'.join(map(str, path))} is not an nnx.Variable ({type(node).__name__})")
    return node


def validate_state_dict(state: Mapping[str, Any], config: UMT5Config) -> None:
    """Raise ValueError unless ``state`` has exactly the expected keys and shapes for ``config``.

    Only shapes are read, so a memory-mapped checkpoint is not paged in.
    """
    specs = umt5_param_specs(config)
    missing = [k for k in specs if k not in state]
    unexpected = sorted(k for k in state if k not in specs)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError("umT5 state dict does not match the config (" + "; ".join(parts) + ")")
    for key, spec in specs.items():
        shape = tuple(np.shape(state[key]))
        if shape != spec.torch_shape:
            raise ValueError(f"umT5 state dict: {key} has shape {list(shape)}, expected {list(spec.torch_shape)}")
        dtype = np.dtype(getattr(state[key], "dtype", np.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"umT5 state dict: {key} has non-float dtype {dtype}")


def load_state_dict_into(model: UMT5Encoder, state: Mapping[str, Any]) -> UMT5Encoder:
    """Copy every tensor of an original-layout ``state`` into ``model`` (in place), one at a time.

    Validates all keys and shapes first. Each tensor is converted to the model's ``param_dtype``
    on the host and put on the device before the next one is touched, so with a memory-mapped
    checkpoint the peak overhead is about one tensor. Works on an abstract model from
    ``nnx.eval_shape`` too (its ShapeDtypeStruct values are replaced).
    """
    config = model.config
    validate_state_dict(state, config)
    dtype = config.param_dtype
    for key, spec in umt5_param_specs(config).items():
        arr = np.asarray(state[key])
        if spec.transpose:
            arr = arr.T
        arr = np.ascontiguousarray(arr, dtype=dtype)
        _get_variable(model, spec.path).set_value(jnp.asarray(arr))
        del arr
    return model


def load_umt5(path: str | os.PathLike | Mapping[str, Any], config: UMT5Config | None = None,
              dtype: Any = None, *, compute_dtype: Any = None) -> UMT5Encoder:
    """Build a :class:`UMT5Encoder` from an original checkpoint without random initialisation.

    Args:
      path: ``.pth``/``.pt``/``.safetensors`` file in the original layout (read memory-mapped via
        :func:`convert.state_dict_io.read_state_dict`), or an already loaded ``{key: array}``.
      config: model config; default :meth:`UMT5Config.umt5_xxl`.
      dtype: parameter dtype (overrides ``config.param_dtype``). Keep ``bfloat16`` for the real
        checkpoint (11.4 GB); ``float32`` doubles that.
      compute_dtype: overrides ``config.compute_dtype``.

    Raises:
      ValueError: a key is missing or unexpected, or a shape differs (naming the key and shapes).
    """
    config = config or UMT5Config.umt5_xxl()
    changes = {}
    if dtype is not None:
        changes["param_dtype"] = dtype
    if compute_dtype is not None:
        changes["compute_dtype"] = compute_dtype
    if changes:
        config = config.replace(**changes)
    if isinstance(path, Mapping):
        state = path
    else:
        from convert.state_dict_io import read_state_dict

        state = read_state_dict(path)
    validate_state_dict(state, config)  # before building anything
    model = nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))
    return load_state_dict_into(model, state)


def iter_torch_state_dict(model: UMT5Encoder, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(original key, array)`` one tensor at a time, in original layout (see module doc).

    ``dtype=None`` keeps the parameter dtype (bf16 stays bf16, so a bf16 round trip is bit-exact).
    """
    for key, spec in umt5_param_specs(model.config).items():
        value = _get_variable(model, spec.path).get_value()
        if not hasattr(value, "__array__"):
            raise ValueError(f"{key}: parameter is abstract ({type(value).__name__}); load weights first")
        arr = np.asarray(value)
        if spec.transpose:
            arr = arr.T
        yield key, np.ascontiguousarray(arr, dtype=None if dtype is None else np.dtype(jnp.dtype(dtype)))


def to_torch_state_dict(model: UMT5Encoder, dtype: Any = None) -> dict[str, np.ndarray]:
    """The full original-layout state dict (a host copy of every parameter; 11.4 GB for umT5-XXL in
    bf16; use :func:`iter_torch_state_dict` to stream instead)."""
    return dict(iter_torch_state_dict(model, dtype))
