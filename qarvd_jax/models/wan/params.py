"""Parameter mapping between PyTorch CausalWanModel state dicts and the Flax NNX model.

PyTorch key (without the wrapper's ``model.`` prefix)    Flax path (``/``-joined)            transform
``patch_embedding.weight`` [dim, C, pt, ph, pw]            ``patch_embedding/kernel`` [C*pt*ph*pw, dim]  patch
``text_embedding.{0,2}.weight`` [out, in]                  ``text_embedding/layers/{0,2}/kernel`` [in, out]  linear
``time_embedding.{0,2}``, ``time_projection.1``            ``.../layers/N/kernel``              linear
``blocks.i.{self,cross}_attn.{q,k,v,o}.weight``            ``blocks/i/..../kernel``             linear
``blocks.i.{self,cross}_attn.norm_{q,k}.weight``           ``.../norm_{q,k}/scale``             identity
``blocks.i.norm3.{weight,bias}``                           ``blocks/i/norm3/{scale,bias}``      identity
``blocks.i.ffn.{0,2}.weight``                              ``blocks/i/ffn/layers/{0,2}/kernel`` linear
``blocks.i.modulation`` [1, 6, dim], ``head.modulation``   same                                 identity
``head.head.weight``                                       ``head/head/kernel``                 linear
biases ``*.bias``                                          ``*/bias``                           identity

Every transform is a pure transpose/reshape, so PyTorch -> Flax -> PyTorch is bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from qarvd_jax.models.wan.config import WanDiTConfig

__all__ = [
    "ParamSpec",
    "param_specs",
    "torch_to_flax",
    "flax_to_torch",
    "iter_flax_to_torch",
    "flax_path_to_torch_name",
    "infer_config_from_state_dict",
]

_SEQUENTIAL = re.compile(r"^(text_embedding|time_embedding|time_projection|blocks\.\d+\.ffn)\.(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class ParamSpec:
    """One tensor: its PyTorch key and shape, Flax path and shape, and the transform kind."""

    torch_key: str
    torch_shape: tuple[int, ...]
    flax_path: tuple[str | int, ...]
    flax_shape: tuple[int, ...]
    kind: str  # "linear" | "patch" | "identity"


def _linear(key_base: str, path: tuple, din: int, dout: int) -> list[ParamSpec]:
    return [ParamSpec(f"{key_base}.weight", (dout, din), path + ("kernel",), (din, dout), "linear"),
            ParamSpec(f"{key_base}.bias", (dout,), path + ("bias",), (dout,), "identity")]


def param_specs(cfg: WanDiTConfig) -> list[ParamSpec]:
    """Every tensor of a CausalWanModel with this config, in PyTorch state-dict order."""
    d, pt = cfg.dim, cfg.patch_size
    cin = cfg.in_dim * cfg.patch_features
    specs = [ParamSpec("patch_embedding.weight", (d, cfg.in_dim, *pt), ("patch_embedding", "kernel"), (cin, d),
                       "patch"),
             ParamSpec("patch_embedding.bias", (d,), ("patch_embedding", "bias"), (d,), "identity")]
    specs += _linear("text_embedding.0", ("text_embedding", "layers", 0), cfg.text_dim, d)
    specs += _linear("text_embedding.2", ("text_embedding", "layers", 2), d, d)
    specs += _linear("time_embedding.0", ("time_embedding", "layers", 0), cfg.freq_dim, d)
    specs += _linear("time_embedding.2", ("time_embedding", "layers", 2), d, d)
    specs += _linear("time_projection.1", ("time_projection", "layers", 1), d, 6 * d)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        p = ("blocks", i)
        specs.append(ParamSpec(f"{b}.modulation", (1, 6, d), p + ("modulation",), (1, 6, d), "identity"))
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                specs += _linear(f"{b}.{attn}.{proj}", p + (attn, proj), d, d)
            if cfg.qk_norm:
                for nrm in ("norm_q", "norm_k"):
                    specs.append(ParamSpec(f"{b}.{attn}.{nrm}.weight", (d,), p + (attn, nrm, "scale"), (d,),
                                           "identity"))
            if attn == "self_attn" and cfg.cross_attn_norm:
                specs.append(ParamSpec(f"{b}.norm3.weight", (d,), p + ("norm3", "scale"), (d,), "identity"))
                specs.append(ParamSpec(f"{b}.norm3.bias", (d,), p + ("norm3", "bias"), (d,), "identity"))
        specs += _linear(f"{b}.ffn.0", p + ("ffn", "layers", 0), d, cfg.ffn_dim)
        specs += _linear(f"{b}.ffn.2", p + ("ffn", "layers", 2), cfg.ffn_dim, d)
    specs.append(ParamSpec("head.modulation", (1, 2, d), ("head", "modulation"), (1, 2, d), "identity"))
    specs += _linear("head.head", ("head", "head"), d, cfg.patch_features * cfg.out_dim)
    return specs


def _to_flax(arr: np.ndarray, spec: ParamSpec) -> np.ndarray:
    if spec.kind == "linear":
        return np.ascontiguousarray(arr.T)
    if spec.kind == "patch":
        return np.ascontiguousarray(arr.reshape(arr.shape[0], -1).T)
    return np.ascontiguousarray(arr)


def _to_torch(arr: np.ndarray, spec: ParamSpec) -> np.ndarray:
    arr = np.asarray(arr)
    if spec.kind == "linear":
        return np.ascontiguousarray(arr.T)
    if spec.kind == "patch":
        return np.ascontiguousarray(arr.T.reshape(spec.torch_shape))
    return np.ascontiguousarray(arr)


def _set(tree: dict, path: tuple, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    node = tree
    for p in path:
        if p not in node:
            raise KeyError("/".join(map(str, path)))
        node = node[p]
    return node


def torch_to_flax(state: Mapping[str, np.ndarray], cfg: WanDiTConfig, *, source: str = "state dict",
                  release: Callable[[np.ndarray], None] | None = None,
                  place: Callable[[np.ndarray], object] | None = None) -> dict:
    """Map a flat PyTorch state dict (no ``model.`` prefix) to the nested Flax param dict.

    Dtypes are kept (the caller casts). Raises ValueError naming every missing key, unexpected key
    and shape that contradicts ``cfg`` (all problems at once), and for unsupported dtypes.
    ``release(src)``, if given, is called on each source tensor once it has been copied (e.g. to
    drop memory-mapped pages), so converting holds about one copy of the weights; ``place(arr)``, if
    given, turns each converted array into its final container (e.g. a host jax.Array) right away.
    """
    specs = param_specs(cfg)
    expected = {s.torch_key for s in specs}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} total)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                        f"({len(unexpected)} total)")
    for s in specs:
        if s.torch_key in state:
            arr = state[s.torch_key]
            if tuple(arr.shape) != s.torch_shape:
                problems.append(f"{s.torch_key}: shape {tuple(arr.shape)} contradicts the config "
                                f"(expected {s.torch_shape})")
            if arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16":
                problems.append(f"{s.torch_key}: unsupported dtype {arr.dtype} (need float32/bfloat16/float16)")
    if problems:
        raise ValueError(f"{source} does not match the CausalWanModel config: " + "; ".join(problems))
    out: dict = {}
    for s in specs:
        src = state[s.torch_key]
        arr = _to_flax(src, s)
        if release is not None:
            if np.may_share_memory(arr, src):
                arr = arr.copy()
            release(src)
        _set(out, s.flax_path, arr if place is None else place(arr))
    return out


def iter_flax_to_torch(params: Mapping, cfg: WanDiTConfig, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch_key, array)`` one tensor at a time (bounded memory when writing)."""
    for s in param_specs(cfg):
        try:
            arr = _get(params, s.flax_path)
        except KeyError as e:
            raise ValueError(f"Flax params lack {e.args[0]} (PyTorch key {s.torch_key})") from None
        if tuple(np.shape(arr)) != s.flax_shape:
            raise ValueError(f"Flax param {'/'.join(map(str, s.flax_path))}: shape {tuple(np.shape(arr))}, "
                             f"expected {s.flax_shape}")
        yield prefix + s.torch_key, _to_torch(np.asarray(arr), s)


def flax_to_torch(params: Mapping, cfg: WanDiTConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested Flax params -> flat PyTorch state dict with the original names, shapes and dtypes."""
    return dict(iter_flax_to_torch(params, cfg, prefix))


def flax_path_to_torch_name(path: tuple) -> str:
    """Flax module path (e.g. ``('blocks', 3, 'ffn', 'layers', 0)``) -> PyTorch name ``blocks.3.ffn.0``."""
    parts = [str(p) for p in path if p != "layers"]
    return ".".join(parts)


def infer_config_from_state_dict(state: Mapping[str, np.ndarray], **overrides) -> WanDiTConfig:
    """Guess a config from tensor shapes. ``num_heads`` cannot be read from shapes: it defaults to
    dim/128 (Wan's head_dim) unless given in ``overrides``."""
    try:
        pw = state["patch_embedding.weight"]
        dim, in_dim, *patch = pw.shape
        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
        kw = dict(dim=dim, in_dim=in_dim, patch_size=tuple(patch),
                  ffn_dim=state["blocks.0.ffn.0.weight"].shape[0], num_layers=len(layers),
                  text_dim=state["text_embedding.0.weight"].shape[1],
                  freq_dim=state["time_embedding.0.weight"].shape[1],
                  out_dim=state["head.head.weight"].shape[0] // int(np.prod(patch)),
                  qk_norm="blocks.0.self_attn.norm_q.weight" in state,
                  cross_attn_norm="blocks.0.norm3.weight" in state)
    except KeyError as e:
        raise ValueError(f"cannot infer the model config: key {e.args[0]} is missing") from None
    if layers != list(range(len(layers))):
        raise ValueError(f"block indices are not contiguous: {layers}")
    if "num_heads" not in overrides:
        if dim % 128:
            raise ValueError(f"cannot infer num_heads for dim={dim}; pass it explicitly")
        kw["num_heads"] = dim // 128
    kw.update(overrides)
    return WanDiTConfig(**kw)
