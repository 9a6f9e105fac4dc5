"""Read and write flat PyTorch-layout state dicts as numpy arrays, without torch.

* :func:`read_state_dict` reads ``.pt``/``.pth``/``.bin`` (torch zip pickle, through the restricted
  unpickler) and ``.safetensors``; tensors are lazy views where the format allows it.
* :func:`write_state_dict` writes ``.safetensors`` (always) or ``.pt`` (only if torch is importable),
  atomically: the data goes to a temporary file in the destination folder, renamed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from convert.torch_pickle import CheckpointFormatError, load_torch_file

__all__ = [
    "CheckpointFormatError",
    "SUPPORTED_FLOAT_DTYPES",
    "TORCH_SUFFIXES",
    "atomic_output",
    "read_state_dict",
    "read_torch_object",
    "write_safetensors_streaming",
    "write_state_dict",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
SUPPORTED_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def read_torch_object(path: str | os.PathLike) -> Any:
    """Unpickle a torch checkpoint of any structure (nested dicts of numpy arrays)."""
    return load_torch_file(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a flat ``{name: array}`` state dict from a ``.pt``/``.pth``/``.safetensors`` file.

    For torch files the top-level object must already be a flat mapping of tensors; model-specific
    unwrapping (``generator_ema``, prefixes) is done by the model's converter.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        obj = load_torch_file(path)
        if not isinstance(obj, Mapping):
            raise CheckpointFormatError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
        if bad:
            raise CheckpointFormatError(f"{path}: entries that are not tensors: {bad[:5]}")
        return dict(obj)
    raise CheckpointFormatError(
        f"{path}: unknown checkpoint suffix {suffix!r}; expected one of "
        f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        out = {}
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``dst``; move it to ``dst`` only if the block succeeds.

    Raises FileExistsError up front when ``dst`` exists and ``overwrite`` is false, so nothing is
    half-written and nothing existing is clobbered.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"destination already exists: {dst} (pass overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(dst) + "-", dir=parent)
    tmp = os.path.join(tmp_dir, os.path.basename(dst))
    try:
        if is_dir:
            os.makedirs(tmp)
        yield tmp
        if os.path.exists(dst):
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            else:
                os.remove(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_state_dict(state: Mapping[str, np.ndarray], dst: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``state`` as ``.safetensors`` or ``.pt`` (chosen from the suffix), atomically.

    Arrays keep their dtype (bfloat16 via ml_dtypes). ``.pt`` needs torch; without it a clear
    ImportError tells the user to pick ``.safetensors``.
    """
    dst = os.fspath(dst)
    suffix = os.path.splitext(dst)[1].lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(f"{dst}: unsupported output suffix {suffix!r}; use .safetensors or .pt")
    if suffix in TORCH_SUFFIXES:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError(f"writing {dst} needs torch; install it or write .safetensors instead") from e
    with atomic_output(dst, overwrite=overwrite) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
        else:
            _save_torch(state, tmp)
    return dst


_SAFETENSORS_DTYPES = {
    "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def write_safetensors_streaming(dst: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                                tensors: Iterator[tuple[str, np.ndarray]], *, overwrite: bool = False,
                                metadata: Mapping[str, str] | None = None) -> str:
    """Write a ``.safetensors`` file one tensor at a time (peak memory: one tensor).

    ``entries`` announces ``(name, shape, dtype)`` of every tensor in file order (the header is
    written first); ``tensors`` then yields them in the same order. A tensor that disagrees with
    its announcement aborts the write (nothing is left at ``dst``). The result is read back by the
    ``safetensors`` library like any other file.
    """
    import json

    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_output(dst, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape, dtype), (got_name, arr) in zip(entries, tensors, strict=True):
            if got_name != name or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {got_name} {arr.shape} {arr.dtype} does not match its header entry "
                                 f"{name} {tuple(shape)} {np.dtype(dtype)}")
            f.write(np.ascontiguousarray(arr).view(np.uint8).data)
    return os.fspath(dst)


def torch_tensors(state: Mapping[str, np.ndarray]) -> dict:
    """numpy arrays -> torch tensors sharing their memory (bfloat16 through a uint16 view). Needs torch."""
    import torch

    tensors = {}
    for k, v in state.items():
        arr = np.ascontiguousarray(v)
        if arr.dtype == ml_dtypes.bfloat16:
            tensors[k] = torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
        else:
            tensors[k] = torch.from_numpy(arr)
    return tensors


def _save_torch(state: Mapping[str, np.ndarray], path: str) -> None:
    import torch

    torch.save(torch_tensors(state), path)
