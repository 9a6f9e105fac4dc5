"""Reader for legacy (pre-1.6, non-zip) ``torch.save`` files, without torch.

Layout: five consecutive pickles/blocks::

    magic number (0x1950a86a20f9469cfc6c) | protocol version (1001) | sys info |
    the object (tensors as persistent ids ('storage', type, key, location, numel, view_metadata)) |
    list of storage keys | per key: int64 element count, then the raw little-endian bytes

Tensors are rebuilt after the raw data has been read, with the same allow-list unpickler as the zip
format (:class:`convert.torch_pickle.RestrictedUnpickler`): anything but tensor-rebuild globals is refused.
"""

from __future__ import annotations

import collections
import pickle
import struct

import numpy as np

from convert.torch_pickle import CheckpointFormatError, RestrictedUnpickler, _StorageType

__all__ = ["LEGACY_MAGIC", "is_legacy_torch_file", "load_legacy_torch_file"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Pending:
    """A storage whose bytes come later in the file."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


class _PendingTensor:
    def __init__(self, storage: _Pending, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def resolve(self, source: str) -> np.ndarray:
        from convert.torch_pickle import _rebuild_tensor_v2

        if self.storage.array is None:
            raise CheckpointFormatError(f"{source}: storage {self.storage.key} has no data (truncated file?)")
        return _rebuild_tensor_v2(self.storage.array, self.offset, self.size, self.stride)


def _lazy_rebuild(storage, storage_offset, size, stride, *args, **kwargs):
    return _PendingTensor(storage, storage_offset, size, stride)


class _LegacyUnpickler(RestrictedUnpickler):
    def __init__(self, file, storages: dict, source: str):
        super().__init__(file, None, source)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _lazy_rebuild
        if (module, name) == ("torch._utils", "_rebuild_tensor"):  # very old files: no stride trick
            return lambda storage, offset, size, stride: _PendingTensor(storage, offset, size, stride)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._source}: unsupported legacy persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if view_metadata is not None:
            raise CheckpointFormatError(f"{self._source}: legacy storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._source}: unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Pending(key, storage_type.dtype, int(numel))
        return self._storages[key]


def is_legacy_torch_file(path: str) -> bool:
    """True if the file starts with the legacy magic-number pickle."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x80"):
        return False
    try:
        return pickle.loads(head[: head.index(b".") + 1]) == LEGACY_MAGIC
    except (ValueError, pickle.UnpicklingError, EOFError):
        return False


def _resolve(obj, source: str):
    if isinstance(obj, _PendingTensor):
        return obj.resolve(source)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v, source)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v, source) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, source) for v in obj)
    return obj


def load_legacy_torch_file(path: str):
    """Load a legacy ``torch.save`` file; tensors become numpy arrays (read into memory)."""
    storages: dict[str, _Pending] = {}
    with open(path, "rb") as f:
        try:
            magic = _LegacyUnpickler(f, storages, path).load()
            if magic != LEGACY_MAGIC:
                raise CheckpointFormatError(f"{path}: bad legacy magic number")
            _LegacyUnpickler(f, storages, path).load()  # protocol version
            _LegacyUnpickler(f, storages, path).load()  # sys info
            result = _LegacyUnpickler(f, storages, path).load()
            keys = _LegacyUnpickler(f, storages, path).load()
            for key in keys:
                st = storages.get(str(key))
                if st is None:
                    raise CheckpointFormatError(f"{path}: storage key {key!r} was never referenced")
                (count,) = struct.unpack("<q", f.read(8))
                nbytes = count * st.dtype.itemsize
                raw = f.read(nbytes)
                if len(raw) != nbytes:
                    raise CheckpointFormatError(f"{path}: storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
                st.array = np.frombuffer(raw, dtype=st.dtype)
        except (EOFError, pickle.UnpicklingError, struct.error) as e:
            raise CheckpointFormatError(f"{path}: corrupt or truncated legacy checkpoint ({e})") from e
    return _resolve(result, path)
