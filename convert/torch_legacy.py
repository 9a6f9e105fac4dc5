"""Reader for legacy (pre-1.6, non-zip) ``torch.save`` files, without torch.

Layout: five consecutive pickles/blocks::

    magic number (0x1950a86a20f9469cfc6c) | protocol version (1001) | sys info |
    the object (tensors as persistent ids ('storage', type, key, location, numel, view_metadata)) |
    list of storage keys | per key: int64 element count, then the raw little-endian bytes

The format is recognised by comparing opcodes (:func:`is_legacy_torch_file`, ``pickletools.genops``,
nothing executed). Each pickle is scanned and then parsed with the same allow-list unpickler as the
zip format (:mod:`convert.torch_pickle`), tensors are rebuilt with the same view checks once the raw
data has been read, and every element count is checked against the bytes left in the file before
anything is allocated.
"""

from __future__ import annotations

import collections
import io
import os
import pickletools
import struct

import numpy as np

from convert.torch_pickle import (
    CheckpointFormatError,
    RestrictedUnpickler,
    _BadTensor,
    _rebuild_tensor_v2,
    _short,
    _Storage,
    _StorageType,
    _is_int,
    unpickle,
)

__all__ = ["LEGACY_MAGIC", "is_legacy_torch_file", "load_legacy_torch_file"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_INT_OPS = frozenset({"LONG1", "LONG4", "LONG", "INT", "BININT", "BININT1", "BININT2"})


class _Pending:
    """A storage whose bytes come later in the file."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.storage: _Storage | None = None


class _PendingTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self):
        if not isinstance(self.storage, _Pending):
            return _BadTensor("tensor is not backed by a storage of the file",
                              f"got {type(self.storage).__name__} where a storage belongs")
        if self.storage.storage is None:
            return _BadTensor("tensor storage has no data (truncated file?)", f"storage {self.storage.key}")
        return _rebuild_tensor_v2(self.storage.storage, self.offset, self.size, self.stride)


def _lazy_rebuild(storage, storage_offset, size, stride, *args, **kwargs):
    return _PendingTensor(storage, storage_offset, size, stride)


def _lazy_rebuild_v1(storage, storage_offset, size, stride):  # very old files: no stride trick
    return _PendingTensor(storage, storage_offset, size, stride)


class _LegacyUnpickler(RestrictedUnpickler):
    def __init__(self, file, storages: dict, source: str):
        super().__init__(file, None, source)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _lazy_rebuild
        if (module, name) == ("torch._utils", "_rebuild_tensor"):
            return _lazy_rebuild_v1
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._source}: unsupported legacy persistent id {_short(pid)}")
        _, storage_type, key, location, numel, view_metadata = pid
        if view_metadata is not None:
            raise CheckpointFormatError(f"{self._source}: legacy storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._source}: unsupported storage type {_short(storage_type)}")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise CheckpointFormatError(f"{self._source}: malformed storage record {_short(pid)}")
        if key in self._storages:
            st = self._storages[key]
            if st.dtype != storage_type.dtype or st.numel != numel:
                raise CheckpointFormatError(f"{self._source}: storage {key} is declared twice with different "
                                            "types or sizes")
            return st
        self._storages[key] = _Pending(key, storage_type.dtype, numel)
        return self._storages[key]


def is_legacy_torch_file(path: str | os.PathLike) -> bool:
    """True if the file starts with the legacy magic-number pickle (opcodes compared, nothing executed)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x80"):
        return False
    try:
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(head))]
    except Exception:  # noqa: BLE001 - genops raises ValueError etc. on anything that is not a pickle
        return False
    ops = [(n, a) for n, a in ops if n not in ("PROTO", "FRAME")]
    return len(ops) == 2 and ops[0][0] in _INT_OPS and ops[0][1] == LEGACY_MAGIC and ops[1][0] == "STOP"


def _resolve(obj, source: str, depth: int = 0):
    if depth > 200:
        raise CheckpointFormatError(f"{source}: the pickle nests objects too deeply")
    if isinstance(obj, _PendingTensor):
        return obj.resolve()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v, source, depth + 1)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v, source, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, source, depth + 1) for v in obj)
    return obj


def _read_storages(f, path: str, storages: dict, keys) -> None:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointFormatError(f"{path}: the storage key list is malformed ({_short(keys)})")
    file_size = os.fstat(f.fileno()).st_size
    for key in keys:
        st = storages.get(key)
        if st is None:
            raise CheckpointFormatError(f"{path}: storage key {key!r} was never referenced")
        if st.storage is not None:
            raise CheckpointFormatError(f"{path}: storage {key} appears twice in the key list")
        raw_count = f.read(8)
        if len(raw_count) != 8:
            raise CheckpointFormatError(f"{path}: storage {key} is truncated (no element count)")
        (count,) = struct.unpack("<q", raw_count)
        nbytes = count * st.dtype.itemsize
        left = file_size - f.tell()
        if count < 0 or nbytes > left:
            raise CheckpointFormatError(f"{path}: storage {key} declares {count} elements ({nbytes} bytes) but "
                                        f"only {left} bytes are left; the file is truncated or corrupt")
        if count != st.numel:
            raise CheckpointFormatError(f"{path}: storage {key} holds {count} elements but the pickle declares "
                                        f"{st.numel}")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointFormatError(f"{path}: storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
        st.storage = _Storage(np.frombuffer(raw, dtype=st.dtype), key)


def load_legacy_torch_file(path: str | os.PathLike):
    """Load a legacy ``torch.save`` file; tensors become numpy arrays (read into memory)."""
    path = os.fspath(path)
    storages: dict[str, _Pending] = {}
    with open(path, "rb") as f:

        def load():
            return unpickle(f, _LegacyUnpickler(f, storages, path), path)

        if load() != LEGACY_MAGIC:
            raise CheckpointFormatError(f"{path}: bad legacy magic number")
        load()  # protocol version
        load()  # sys info
        result = load()
        _read_storages(f, path, storages, load())
    try:
        obj = _resolve(result, path)
    except RecursionError:
        raise CheckpointFormatError(f"{path}: the pickle nests objects too deeply") from None
    from convert.torch_pickle import find_bad_tensor

    bad = find_bad_tensor(obj)
    if bad is not None:
        key, tensor = bad
        raise CheckpointFormatError(f"{tensor.problem}: {key} in {path} ({tensor.detail})")
    return obj
