"""PyTorch ``Wan2.1_VAE.pth`` state dict <-> :class:`WanVAE` parameters.

Names are exactly the original ``WanVAE_.state_dict()`` keys (e.g.
``decoder.upsamples.4.residual.2.weight``), in the original order. Layout conversions (all exact):

=====================  ===========================  ==========================
original               torch shape                  NNX parameter
=====================  ===========================  ==========================
CausalConv3d weight    ``[out, in, kT, kH, kW]``    ``kernel [kT, kH, kW, in, out]``
Conv2d weight          ``[out, in, kH, kW]``        ``kernel [kH, kW, in, out]``
conv bias              ``[out]``                    ``bias [out]``
RMS_norm gamma         ``[C,1,1,1]`` / ``[C,1,1]``  ``gamma [C]``
=====================  ===========================  ==========================

Torch sub-module names map to NNX attributes: ``residual.{0,2,3,6}`` -> ``norm1, conv1, norm2, conv2``,
``resample.1`` -> ``conv``, ``head.{0,2}`` -> ``head_norm, head_conv``; the rest is the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.state_dict_io import read_state_dict
from qarvd_jax.models.wan_vae.config import WanVAEConfig
from qarvd_jax.models.wan_vae.layers import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMSNorm
from qarvd_jax.models.wan_vae.model import Decoder3d, Encoder3d, WanVAE

__all__ = [
    "TorchParam",
    "load_wan_vae",
    "torch_modules",
    "torch_param_specs",
    "to_torch_state_dict",
    "wan_vae_from_state_dict",
]


@dataclass(frozen=True)
class TorchParam:
    """One original tensor: its name and shape, the NNX variable holding it, and the two layout maps."""

    name: str
    torch_shape: tuple[int, ...]
    variable: nnx.Variable
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]


def _children(m: Any) -> list[tuple[str, Any]]:
    """Direct sub-modules of ``m`` under their torch names, in torch registration order."""
    if isinstance(m, WanVAE):
        return [("encoder", m.encoder), ("conv1", m.conv1), ("conv2", m.conv2), ("decoder", m.decoder)]
    if isinstance(m, (Encoder3d, Decoder3d)):
        stages = ("downsamples", m.downsamples) if isinstance(m, Encoder3d) else ("upsamples", m.upsamples)
        middle = [(f"middle.{i}", b) for i, b in enumerate(m.middle)]
        body = [(f"{stages[0]}.{i}", b) for i, b in enumerate(stages[1])]
        body = middle + body if isinstance(m, Decoder3d) else body + middle
        return [("conv1", m.conv1), *body, ("head.0", m.head_norm), ("head.2", m.head_conv)]
    if isinstance(m, ResidualBlock):
        out = [("residual.0", m.norm1), ("residual.2", m.conv1), ("residual.3", m.norm2), ("residual.6", m.conv2)]
        return out + ([("shortcut", m.shortcut)] if m.shortcut is not None else [])
    if isinstance(m, AttentionBlock):
        return [("norm", m.norm), ("to_qkv", m.to_qkv), ("proj", m.proj)]
    if isinstance(m, Resample):
        return [("resample.1", m.conv)] + ([("time_conv", m.time_conv)] if m.time_conv is not None else [])
    return []


def torch_modules(model: WanVAE) -> dict[str, Any]:
    """Every NNX sub-module by its torch module path (``''`` is the model itself)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, m: Any):
        out[prefix] = m
        for name, child in _children(m):
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def _leaf_params(prefix: str, m: Any) -> Iterator[TorchParam]:
    if isinstance(m, (CausalConv3d, nnx.Conv)):
        k = m.kernel
        nd = len(k.shape)
        perm = (nd - 1, nd - 2, *range(nd - 2))  # [*spatial, in, out] -> [out, in, *spatial]
        inv = tuple(int(i) for i in np.argsort(perm))
        yield TorchParam(f"{prefix}.weight", tuple(k.shape[i] for i in perm), k,
                         lambda a, p=perm: np.transpose(a, p), lambda a, p=inv: np.transpose(a, p))
        yield TorchParam(f"{prefix}.bias", tuple(m.bias.shape), m.bias, np.asarray, np.asarray)
    elif isinstance(m, RMSNorm):
        shape = (m.dim, 1, 1) if m.images else (m.dim, 1, 1, 1)
        yield TorchParam(f"{prefix}.gamma", shape, m.gamma, lambda a, s=shape: np.reshape(a, s),
                         lambda a, d=m.dim: np.reshape(a, (d,)))


def torch_param_specs(model: WanVAE) -> dict[str, TorchParam]:
    """``{torch name: TorchParam}`` for every parameter, in the original state-dict order."""
    specs = {}
    for path, m in torch_modules(model).items():
        for spec in _leaf_params(path, m):
            specs[spec.name] = spec
    n_vars = len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    if n_vars != len(specs):  # guards the mapping against modules it does not know
        raise RuntimeError(f"torch mapping covers {len(specs)} of {n_vars} NNX parameters")
    return specs


def wan_vae_from_state_dict(state_dict: Mapping[str, np.ndarray], config: WanVAEConfig) -> WanVAE:
    """Build a :class:`WanVAE` from an original state dict (strict: every key, every shape).

    Raises ValueError naming each missing key (with its expected shape), unexpected key (with its
    shape) or key with the wrong shape (checkpoint shape and expected shape).
    """
    model = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
    specs = torch_param_specs(model)
    problems = [f"missing key {k!r} (expected shape {list(s.torch_shape)})"
                for k, s in specs.items() if k not in state_dict]
    problems += [f"unexpected key {k!r} (shape {list(np.shape(v))})"
                 for k, v in state_dict.items() if k not in specs]
    problems += [f"wrong shape for {k!r}: checkpoint {list(np.shape(state_dict[k]))}, expected "
                 f"{list(s.torch_shape)}" for k, s in specs.items()
                 if k in state_dict and tuple(np.shape(state_dict[k])) != s.torch_shape]
    if problems:
        raise ValueError(f"state dict does not match WanVAE({config.dim=}, {config.z_dim=}): "
                         + "; ".join(problems))
    for k, spec in specs.items():
        arr = np.asarray(state_dict[k])
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise ValueError(f"{k!r}: expected a floating-point tensor, got dtype {arr.dtype}")
        spec.variable.set_value(jnp.asarray(spec.from_torch(arr), dtype=config.param_dtype))
    return model


def load_wan_vae(path: str | os.PathLike, config: WanVAEConfig | None = None, dtype: Any = None
                 ) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` (or a same-layout ``.pth``/``.safetensors``) into a :class:`WanVAE`.

    Args:
      path: checkpoint file, read without torch.
      config: architecture; defaults to :meth:`WanVAEConfig.wan21`.
      dtype: if given, both the parameter and the compute dtype (like torch's ``.to(dtype)``);
        otherwise the config's ``param_dtype`` / ``dtype``.
    """
    config = WanVAEConfig.wan21() if config is None else config
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    return wan_vae_from_state_dict(read_state_dict(path), config)


def to_torch_state_dict(model: WanVAE) -> dict[str, np.ndarray]:
    """The inverse of :func:`wan_vae_from_state_dict`: ``{original name: array in torch layout}``
    in the original order and the parameters' own dtype (bit-exact round trip)."""
    return {k: np.ascontiguousarray(s.to_torch(np.asarray(s.variable.get_value())))
            for k, s in torch_param_specs(model).items()}
