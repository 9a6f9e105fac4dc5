"""Self-Forcing / Wan2.1 DiT checkpoints: PyTorch (.pt/.pth/.safetensors) <-> Orbax.

* :func:`read_dit_checkpoint` reads a Self-Forcing ``.pt`` (``generator_ema`` preferred, else
  ``generator``/``model``; ``model.`` prefix and an optional ``_fsdp_wrapped_module.`` infix
  stripped) or a plain Wan state dict, without torch.
* :func:`save_orbax` / :func:`load_orbax` store the Flax-layout params (source dtype kept) plus
  the model config and the source layout (top-level key, prefix), so
  :func:`export_torch` writes the original key names, shapes and dtypes back bit-exactly.
* :func:`convert` picks the direction from the file types (``qarvd convert SRC DST``).
* :func:`load_model` builds a :class:`CausalWanModel` from any of these formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from convert.state_dict_io import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    CheckpointFormatError,
    FiniteCheck,
    atomic_output,
    check_destination,
    is_saved_tree_dir,
    read_torch_object,
    torch_tensors,
    write_safetensors_streaming,
    write_state_dict,
)
from convert.torch_pickle import release_pages
from qarvd_jax.models.wan import params as wan_params
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.utils.orbax_io import is_orbax_dir, load_trees, save_trees

__all__ = [
    "SourceLayout",
    "read_dit_checkpoint",
    "save_orbax",
    "load_orbax",
    "export_torch",
    "convert",
    "load_model",
    "is_orbax_checkpoint",
]

_TOP_LEVEL_PREFERENCE = ("generator_ema", "generator", "model", "state_dict")
_FSDP_INFIX = "_fsdp_wrapped_module."
ORBAX_FORMAT = "qarvd-jax/wan-dit/v1"


@dataclass(frozen=True)
class SourceLayout:
    """Where the tensors sat in the source file, to write them back the same way."""

    top_level_key: str | None  # e.g. "generator_ema"; None for a flat state dict
    key_prefix: str  # e.g. "model." (Self-Forcing wrapper) or "" (plain Wan)
    dtype: str  # dtype of the floating tensors in the source


def _strip_keys(state: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], str]:
    keys = list(state)
    prefix = "model." if keys and all(k.startswith("model.") for k in keys) else ""
    out = {}
    for k, v in state.items():
        name = k[len(prefix):].replace(_FSDP_INFIX, "")
        if name in out:
            raise CheckpointFormatError(f"{source}: key {k!r} collides with another after stripping prefixes")
        out[name] = v
    return out, prefix


def read_dit_checkpoint(path: str | os.PathLike, *, prefer: str | None = None
                        ) -> tuple[dict[str, np.ndarray], SourceLayout]:
    """Read DiT weights from a PyTorch-format file without torch.

    Args:
      path: ``.pt``/``.pth``/``.bin`` (torch zip) or ``.safetensors``.
      prefer: top-level entry to use in a dict of state dicts (default: ``generator_ema``, then
        ``generator``, ``model``, ``state_dict``).

    Returns:
      ``(state, layout)``: flat CausalWanModel keys (no prefix) -> numpy arrays (lazy views).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from convert.state_dict_io import read_state_dict

        obj: Any = read_state_dict(path)
    elif suffix in TORCH_SUFFIXES:
        obj = read_torch_object(path)
    else:
        raise CheckpointFormatError(f"{path}: unknown checkpoint type {suffix!r} (.pt/.pth/.safetensors)")
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: top-level object is a {type(obj).__name__}, not a dict")
    top = None
    if prefer is not None:
        if not any(isinstance(v, Mapping) for v in obj.values()):
            raise CheckpointFormatError(f"{path}: --prefer {prefer}: the file is a flat state dict without "
                                        "top-level entries")
        if not isinstance(obj.get(prefer), Mapping):
            entries = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))
            raise CheckpointFormatError(f"{path}: --prefer {prefer}: no such state dict in the file (it holds "
                                        f"{entries})")
    if any(isinstance(v, Mapping) for v in obj.values()):
        order = ((prefer,) if prefer else ()) + _TOP_LEVEL_PREFERENCE
        top = next((k for k in order if k in obj and isinstance(obj[k], Mapping)), None)
        if top is None:
            raise CheckpointFormatError(f"{path}: no state dict found; top-level keys {sorted(map(str, obj))}, "
                                        f"expected one of {list(order)}")
        obj = obj[top]
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointFormatError(f"{path}: non-tensor entries in the state dict: {bad[:5]}")
    state, prefix = _strip_keys(obj, path)
    dtypes = sorted({str(v.dtype) for v in state.values()})
    return state, SourceLayout(top, prefix, dtypes[0] if len(dtypes) == 1 else ",".join(dtypes))


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return is_orbax_dir(path, "params")


def save_orbax(dst: str | os.PathLike, params: Mapping, cfg: WanDiTConfig, layout: SourceLayout | None = None,
               *, overwrite: bool = False, extra_metadata: Mapping[str, Any] | None = None) -> str:
    """Write Flax params + config (+ source layout) as an Orbax checkpoint directory, atomically."""
    meta = {"format": ORBAX_FORMAT, "model_config": cfg.to_dict(),
            "source_layout": asdict(layout) if layout else None, **(extra_metadata or {})}
    return save_trees(dst, {"params": params}, meta, overwrite=overwrite)


def load_orbax(path: str | os.PathLike) -> tuple[dict, WanDiTConfig, dict]:
    """Read an Orbax DiT checkpoint as host numpy arrays: ``(params, config, metadata)``."""
    path = os.path.abspath(os.fspath(path))
    if not is_orbax_checkpoint(path):
        raise CheckpointFormatError(f"{path}: not an Orbax checkpoint directory (no params/ folder)")
    trees, meta = load_trees(path, ("params",))
    if meta.get("format") != ORBAX_FORMAT:
        raise CheckpointFormatError(f"{path}: metadata format {meta.get('format')!r} is not {ORBAX_FORMAT}")
    return trees["params"], WanDiTConfig.from_dict(meta["model_config"]), meta


def export_torch(params: Mapping, cfg: WanDiTConfig, dst: str | os.PathLike, layout: SourceLayout | None = None,
                 *, overwrite: bool = False, progress: bool = False) -> str:
    """Write Flax params as a PyTorch-layout ``.safetensors`` (streamed) or ``.pt`` (needs torch).

    Key names get the source prefix back (``model.`` for Self-Forcing); ``.pt`` output is wrapped
    in the source's top-level key (``generator_ema``) when there was one.
    """
    dst = os.fspath(dst)
    prefix = layout.key_prefix if layout else "model."
    suffix = os.path.splitext(dst)[1].lower()
    if suffix in SAFETENSORS_SUFFIXES:
        entries = [(prefix + s.torch_key, s.torch_shape, np.asarray(wan_params._get(params, s.flax_path)).dtype)
                   for s in wan_params.param_specs(cfg)]
        meta = {"qarvd_model_config": json.dumps(cfg.to_dict())}
        with _progress(len(entries), "write", progress) as bar:
            tensors = _counted(wan_params.iter_flax_to_torch(params, cfg, prefix), bar)
            return write_safetensors_streaming(dst, entries, tensors, overwrite=overwrite, metadata=meta)
    if suffix in TORCH_SUFFIXES:
        state = wan_params.flax_to_torch(params, cfg, prefix)
        top = layout.top_level_key if layout else "generator_ema"
        if not top:
            return write_state_dict(state, dst, overwrite=overwrite)
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"writing {dst} needs torch; install it or write .safetensors instead") from e
        with atomic_output(dst, overwrite=overwrite) as tmp:
            torch.save({top: torch_tensors(state)}, tmp)
        return dst
    raise CheckpointFormatError(f"{dst}: output must end in .safetensors or .pt/.pth")


def _host_array(arr: np.ndarray):
    import jax

    return jax.device_put(arr, jax.devices("cpu")[0])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _counted(items, bar):
    for item in items:
        yield item
        bar.update()


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, config: WanDiTConfig | None = None,
            overwrite: bool = False, prefer: str | None = None, allow_nonfinite: bool = False,
            progress: bool = False, num_heads: int | None = None) -> str:
    """Convert between formats; the direction follows the file types.

    * torch/safetensors file -> Orbax directory (``dst`` without a .pt/.safetensors suffix);
    * Orbax directory -> ``.safetensors`` or ``.pt``;
    * torch/safetensors -> torch/safetensors (re-layout through the validated Flax mapping).

    The destination is checked before anything is read (:func:`check_destination`: it may not be
    or contain ``src``, a file may not replace a folder, an existing one needs ``overwrite``).
    Every tensor is checked for NaN/inf as it is converted; any is refused (naming the tensors and
    counts) unless ``allow_nonfinite``. ``progress`` shows a tqdm bar per tensor. Without
    ``config`` the config is inferred from the shapes (``num_heads`` heads, default dim / 128).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    dst_suffix = os.path.splitext(dst)[1].lower()
    dst_is_file = dst_suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
    check_destination(dst, kind="file" if dst_is_file else "dir", overwrite=overwrite, sources=[src],
                      replaceable=is_saved_tree_dir, what="an Orbax checkpoint")
    finite = FiniteCheck(src, allow_nonfinite)
    if is_orbax_checkpoint(src):
        if not dst_is_file:
            raise CheckpointFormatError(f"{src} is already an Orbax checkpoint; give DST a .safetensors/.pt name")
        params, cfg, meta = load_orbax(src)
        finite.add_all(wan_params.iter_flax_to_torch(params, cfg)).finish()
        layout = SourceLayout(**meta["source_layout"]) if meta.get("source_layout") else None
        return export_torch(params, cfg, dst, layout, overwrite=overwrite, progress=progress)
    if not os.path.exists(src):
        raise FileNotFoundError(f"source checkpoint not found: {src}")
    state, layout = read_dit_checkpoint(src, prefer=prefer)
    cfg = config or wan_params.infer_config_from_state_dict(state, **({"num_heads": num_heads} if num_heads else {}))
    names = {id(v): k for k, v in state.items()}
    with _progress(len(state), "convert", progress) as bar:

        def release(arr):  # called once per source tensor after it has been copied
            finite.add(names.get(id(arr), "?"), arr)
            release_pages(arr)
            bar.update()

        # each converted tensor becomes a host jax.Array at once: Orbax serialises those with one
        # transient copy (numpy inputs cost two), so the conversion peaks near two copies of the weights
        params = wan_params.torch_to_flax(state, cfg, source=src, release=release, place=_host_array)
    del state
    finite.finish()
    if dst_is_file:
        return export_torch(params, cfg, dst, layout, overwrite=overwrite, progress=progress)
    return save_orbax(dst, params, cfg, layout, overwrite=overwrite)


def load_params(path: str | os.PathLike, config: WanDiTConfig | None = None, *, prefer: str | None = None
                ) -> tuple[dict, WanDiTConfig]:
    """Flax-layout params (host numpy, source dtype) and config from any supported checkpoint."""
    if is_orbax_checkpoint(path):
        params, cfg, _ = load_orbax(path)
        if config is not None:
            _check_same_arch(config, cfg, path)
            cfg = config
        return params, cfg
    state, _ = read_dit_checkpoint(path, prefer=prefer)
    cfg = config or wan_params.infer_config_from_state_dict(state)
    return wan_params.torch_to_flax(state, cfg, source=os.fspath(path), release=release_pages), cfg


def _check_same_arch(want: WanDiTConfig, got: WanDiTConfig, path) -> None:
    arch = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "patch_size")
    diff = {k: (getattr(got, k), getattr(want, k)) for k in arch if getattr(got, k) != getattr(want, k)}
    if diff:
        raise ValueError(f"{path}: checkpoint config differs from the requested one: "
                         + ", ".join(f"{k} is {a} in the checkpoint, {b} requested" for k, (a, b) in diff.items()))


def load_model(path: str | os.PathLike, config: WanDiTConfig | None = None, *, prefer: str | None = None):
    """Build a :class:`CausalWanModel` with weights from ``path`` cast to ``config.param_dtype``."""
    from qarvd_jax.models.wan.loading import model_from_params

    params, cfg = load_params(path, config, prefer=prefer)
    return model_from_params(params, cfg)
