"""Torch-free reader for PyTorch ``torch.save`` zip checkpoints (``.pt`` / ``.pth``).

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

    <archive>/data.pkl        pickle of the saved object; tensors are persistent ids
    <archive>/data/<key>      raw little-endian bytes of each storage
    <archive>/byteorder       optional, "little" or "big"

The pickle is parsed with :class:`RestrictedUnpickler`, which resolves only the handful of
globals needed to rebuild tensors and plain containers, and raises
:class:`UnsafeCheckpointError` for anything else, so a malicious pickle cannot execute code.
Storages are memory-mapped (zip entries written by torch are stored uncompressed), so reading a
5.7 GB checkpoint costs no memory until a tensor is touched.

Tensors come back as numpy arrays (``ml_dtypes.bfloat16`` for bf16), views on the mapped file.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import weakref
import zipfile
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "release_pages",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "STORAGE_DTYPES",
]


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, wrong format, bad dtype, ...)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle references a global outside the tensor-rebuild allow-list."""


# torch storage class name -> numpy dtype
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# torch.dtype attribute names that may appear as globals (e.g. in UntypedStorage metadata)
_TORCH_DTYPE_NAMES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Numpy equivalent of ``torch._utils._rebuild_tensor_v2``: a strided view of the storage."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    numel = int(np.prod(size)) if size else 1
    if numel == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
    if storage_offset < 0 or last >= storage.size:
        raise CheckpointFormatError(
            f"tensor view (offset {storage_offset}, size {size}, stride {stride}) runs past its storage "
            f"of {storage.size} elements: the checkpoint is truncated or corrupt")
    base = storage[storage_offset:]
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(st * item for st in stride),
                                           writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only knows how to rebuild tensors and plain containers.

    Args:
      file: the ``data.pkl`` stream.
      load_storage: callback ``(storage_type, key, numel) -> np.ndarray`` for persistent ids.
      source: file name used in error messages.
    """

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
    }

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _TORCH_DTYPE_NAMES[name]
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, np.dtype(np.uint8))
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load global '{module}.{name}': only tensor-rebuild globals are "
            f"allowed (a checkpoint that needs it may execute code when unpickled)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, np.dtype):  # torch >= 2 may pickle a torch.dtype directly
            storage_type = _StorageType(str(storage_type), storage_type)
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._source}: unsupported storage type {storage_type!r}")
        return self._load_storage(storage_type, str(key), int(numel))


def _stored_entry_offset(fileobj, info: zipfile.ZipInfo) -> int:
    """Absolute byte offset of an uncompressed entry's data inside the zip file."""
    fileobj.seek(info.header_offset)
    header = fileobj.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"bad local zip header for entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


# base address -> mmap of every file mapped by load_torch_file; weak, so a mapping is forgotten
# when the last array viewing it dies
_MAPPINGS: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()


def _base_address(mm: mmap.mmap) -> int:
    return np.frombuffer(mm, np.uint8).__array_interface__["data"][0]


def release_pages(arr: np.ndarray) -> None:
    """Drop the file pages under a memory-mapped tensor from this process's resident set.

    Call it once a tensor has been copied/converted: the pages are clean (read-only file data),
    so the kernel simply re-reads them if the tensor is touched again. No-op for other arrays.
    """
    ptr = arr.__array_interface__["data"][0]
    for base, mm in list(_MAPPINGS.items()):
        if base <= ptr < base + len(mm):
            page = mmap.PAGESIZE
            start = ((ptr - base) // page) * page
            end = min(len(mm), ptr - base + arr.nbytes)
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            return


def load_torch_file(path: str | os.PathLike, *, mmap_storages: bool = True) -> Any:
    """Load a ``torch.save`` zip checkpoint without importing torch.

    Args:
      path: ``.pt``/``.pth`` file.
      mmap_storages: map storages from the file lazily (default) instead of reading them into memory.

    Returns:
      The unpickled object with every tensor replaced by a numpy array (read-only view).

    Raises:
      FileNotFoundError: the path does not exist.
      CheckpointFormatError: not a zip checkpoint, truncated file, unknown storage dtype.
      UnsafeCheckpointError: the pickle references a disallowed global.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        from convert.torch_legacy import is_legacy_torch_file, load_legacy_torch_file

        if is_legacy_torch_file(path):
            return load_legacy_torch_file(path)
        raise CheckpointFormatError(f"{path}: not a PyTorch zip checkpoint ({e})") from e
    with zf:
        names = zf.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl_names:
            raise CheckpointFormatError(f"{path}: zip archive has no data.pkl; not a torch.save checkpoint")
        pkl_name = pkl_names[0]
        prefix = pkl_name[: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{path}: unknown byteorder {byteorder!r}")

        raw_file = open(path, "rb")
        mapped = None
        if mmap_storages and os.path.getsize(path) > 0:
            mapped = mmap.mmap(raw_file.fileno(), 0, access=mmap.ACCESS_READ)
            _MAPPINGS[_base_address(mapped)] = mapped
        cache: dict[str, np.ndarray] = {}

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            if key in cache:
                return cache[key]
            entry = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(entry)
            except KeyError as e:
                raise CheckpointFormatError(f"{path}: storage entry {entry!r} is missing (truncated file?)") from e
            dtype = storage_type.dtype
            nbytes = numel * dtype.itemsize if storage_type.name != "UntypedStorage" else numel
            if info.file_size < nbytes:
                raise CheckpointFormatError(
                    f"{path}: storage {key} holds {info.file_size} bytes, expected {nbytes} "
                    f"({numel} x {dtype}); the file is truncated or corrupt")
            if mapped is not None and info.compress_type == zipfile.ZIP_STORED:
                offset = _stored_entry_offset(raw_file, info)
                if offset + nbytes > len(mapped):
                    raise CheckpointFormatError(f"{path}: storage {key} runs past the end of the file (truncated)")
                arr = np.frombuffer(mapped, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
            else:
                arr = np.frombuffer(zf.read(entry), dtype=dtype, count=nbytes // dtype.itemsize)
            if byteorder == "big" and dtype.itemsize > 1:
                arr = arr.byteswap()
            cache[key] = arr
            return arr

        try:
            with zf.open(pkl_name) as f:
                data = io.BytesIO(f.read())
            return RestrictedUnpickler(data, load_storage, path).load()
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error) as e:
            raise CheckpointFormatError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
        finally:
            raw_file.close()
