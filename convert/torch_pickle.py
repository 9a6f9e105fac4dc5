"""Torch-free reader for PyTorch ``torch.save`` zip checkpoints (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``).

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

    <archive>/data.pkl        pickle of the saved object; tensors are persistent ids
    <archive>/data/<key>      raw little-endian bytes of each storage (stored, never compressed)
    <archive>/byteorder       optional, "little" or "big"

Reading never runs code from the file and never reads outside the file's own bytes:

* every pickle is first scanned opcode by opcode (:func:`scan_pickle`, ``pickletools.genops``,
  nothing executed): opcodes ``torch.save`` never writes (INST, OBJ, NEWOBJ, EXT*, out-of-band
  buffers) and BUILD on anything but an ``OrderedDict`` are refused, and nesting deeper than
  :data:`MAX_NESTING` levels is refused (deep tuples crash CPython's hash when used as keys);
* it is then parsed by :class:`RestrictedUnpickler`, which resolves only the handful of globals
  needed to rebuild tensors and plain containers and raises :class:`UnsafeCheckpointError` for
  anything else;
* a tensor view must lie inside its storage: non-negative int offset/sizes/strides, no stride 0
  on a dimension larger than 1, no self-overlap, last element before the storage's end (Python
  ints, no overflow); a storage must be backed by real bytes of an uncompressed zip entry, and
  ``data.pkl`` is capped at :data:`MAX_PICKLE_BYTES`.

Every problem raises :class:`CheckpointFormatError` naming the file (and the tensor). Storages are
memory-mapped, so reading a 5.7 GB checkpoint costs no memory until a tensor is touched. Tensors
come back as numpy arrays (``ml_dtypes.bfloat16`` for bf16), read-only views on the mapped file.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import reprlib
import struct
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from qarvd_jax.errors import UserError

__all__ = [
    "release_pages",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "scan_pickle",
    "STORAGE_DTYPES",
    "MAX_PICKLE_BYTES",
    "MAX_NESTING",
]

MAX_PICKLE_BYTES = 128 << 20  # data.pkl of the 1.3B Self-Forcing checkpoint: ~0.2 MB
MAX_NESTING = 200  # container nesting; real checkpoints stay below 10
MAX_NDIM = 64
MAX_VIEW_FACTOR = 16  # all views of one storage together: at most this many times its size


class CheckpointFormatError(UserError):
    """The file is not a readable PyTorch checkpoint (truncated, wrong format, bad dtype, ...)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle references a global outside the tensor-rebuild allow-list (or an opcode torch never uses)."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40


def _short(obj) -> str:
    """Bounded repr of untrusted data for error messages (never recurses deeply)."""
    try:
        return _REPR.repr(obj)
    except Exception:  # noqa: BLE001 - a hostile object's repr may raise anything
        return f"<{type(obj).__name__}>"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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


class _Storage:
    """A storage read from the file (1-D array); only these can back a tensor view."""

    __slots__ = ("array", "key", "viewed")

    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key, self.viewed = array, key, 0

    def __repr__(self) -> str:
        return f"<storage {self.key}: {self.array.size} x {self.array.dtype}>"


class _BadTensor:
    """Placeholder for a tensor whose view was refused; reported with its key after unpickling."""

    __slots__ = ("problem", "detail")

    def __init__(self, problem: str, detail: str):
        self.problem, self.detail = problem, detail


def _view_problem(storage: _Storage, offset, size, stride) -> tuple[str, str] | None:
    """Why the view ``(offset, size, stride)`` of ``storage`` is refused, or None if it is sound."""
    n = storage.array.size
    detail = (f"offset {_short(offset)}, size {_short(size)}, stride {_short(stride)}, storage {storage.key} of "
              f"{n} elements")
    if not _is_int(offset) or offset < 0:
        return "tensor view has an offset that is not a non-negative int", detail
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
        return "tensor view needs size and stride tuples of the same length", detail
    if len(size) > MAX_NDIM:
        return f"tensor view has more than {MAX_NDIM} dimensions", detail
    if not all(_is_int(v) and v >= 0 for v in (*size, *stride)):
        if any(_is_int(v) and v < 0 for v in stride):
            return "tensor view has a negative stride", detail
        return "tensor view has sizes or strides that are not non-negative ints", detail
    numel = math.prod(size)
    if numel == 0:
        return ("tensor view declares an absurd empty shape", detail) if any(s > 2**31 for s in size) else None
    if any(st == 0 and s > 1 for s, st in zip(size, stride)):
        return "tensor view has stride 0 on a dimension larger than 1 (torch.save never writes one)", detail
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))  # Python ints: no overflow
    if last >= n:
        return "tensor view runs past its storage", detail
    if numel > last - offset + 1:
        return "tensor view overlaps itself (more elements than the storage span it covers)", detail
    storage.viewed += numel
    if storage.viewed > MAX_VIEW_FACTOR * n + 4096:
        return (f"tensor views of one storage add up to more than {MAX_VIEW_FACTOR}x its size (sizes not backed "
                "by real bytes)", detail)
    return None


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Numpy equivalent of ``torch._utils._rebuild_tensor_v2``: a validated strided view of the storage.

    Returns a :class:`_BadTensor` instead of raising, so the error can name the tensor's key.
    """
    if not isinstance(storage, _Storage):
        return _BadTensor("tensor is not backed by a storage of the file",
                          f"got {type(storage).__name__} where a storage belongs")
    bad = _view_problem(storage, storage_offset, size, stride)
    if bad:
        return _BadTensor(*bad)
    arr = storage.array
    size, stride = tuple(size), tuple(stride)
    if math.prod(size) == 0:
        return np.zeros(size, dtype=arr.dtype)
    item = arr.dtype.itemsize
    return np.lib.stride_tricks.as_strided(arr[storage_offset:], shape=size,
                                           strides=tuple(st * item for st in stride), writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (``encode(str, "latin1")``) and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointFormatError(f"unsupported _codecs.encode call ({_short(encoding)})")
    return text.encode("latin-1")


# --------------------------------------------------------------------------------- opcode scan
_ATOMS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "PERSID"})
_TEXT = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                   "SHORT_BINSTRING"})
_REFUSED_OPCODES = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER",
                              "READONLY_BUFFER"})
_ORDERED_DICT = ("g", "collections", "OrderedDict")


def scan_pickle(stream, source: str) -> None:
    """Check a pickle opcode by opcode without executing it (``pickletools.genops``).

    Refuses opcodes ``torch.save`` never writes, BUILD on anything but an ``OrderedDict``, and
    container nesting deeper than :data:`MAX_NESTING`. ``stream`` is bytes or a binary file
    positioned at the pickle (left after its STOP opcode).

    Raises:
      UnsafeCheckpointError, CheckpointFormatError: naming ``source`` and the byte position.
    """
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(stream)
    stack: list[tuple[int, Any]] = []  # (nesting depth, kind) of each value the unpickler would hold
    marks: list[list] = []
    memo: dict[Any, tuple[int, Any]] = {}
    pos = 0

    def deepen(depth: int) -> int:
        if depth > MAX_NESTING:
            raise CheckpointFormatError(f"{source}: the pickle nests containers deeper than {MAX_NESTING} levels "
                                        f"(byte {pos}); refusing it")
        return depth

    def pop_mark() -> list:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    def grow_top(items) -> None:
        d, k = stack[-1]
        stack[-1] = (deepen(max([d] + [i[0] + 1 for i in items])), k)

    try:
        with warnings.catch_warnings():  # genops warns about odd escapes in protocol-0 strings
            warnings.simplefilter("ignore", DeprecationWarning)
            ops = list(pickletools.genops(stream))
        for op, arg, pos in ops:
            name = op.name
            if name in _REFUSED_OPCODES:
                raise UnsafeCheckpointError(f"{source}: refusing pickle opcode {name} at byte {pos}: torch.save "
                                            "never writes it (a pickle that needs it may execute code)")
            if name in _ATOMS:
                stack.append((0, ("s", arg) if name in _TEXT and isinstance(arg, str) and len(arg) < 256 else None))
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append((0, ("g", module, attr)))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                ok = module[1] and attr[1] and module[1][0] == "s" and attr[1][0] == "s"
                stack.append((0, ("g", module[1][1], attr[1][1]) if ok else None))
            elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append((1, None))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise IndexError
                items = stack[-n:]
                del stack[-n:]
                stack.append((deepen(1 + max(i[0] for i in items)), None))
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = pop_mark()
                stack.append((deepen(1 + max((i[0] for i in items), default=0)), None))
            elif name == "APPEND":
                grow_top([stack.pop()])
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                grow_top([key, value])
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                grow_top(pop_mark())
            elif name == "BUILD":
                state = stack.pop()
                if stack[-1][1] != "od":
                    raise UnsafeCheckpointError(f"{source}: refusing pickle opcode BUILD at byte {pos} on an object "
                                                "that is not an OrderedDict (torch.save only sets OrderedDict "
                                                "metadata this way)")
                grow_top([state])
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                stack.append((args[0], "od" if func[1] == _ORDERED_DICT else None))
            elif name == "BINPERSID":
                stack.pop()
                stack.append((0, None))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise CheckpointFormatError(f"{source}: corrupt pickle: memo entry {arg} read before it is "
                                                f"written (byte {pos})")
                stack.append(memo[arg])
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PROTO", "FRAME", "STOP"):
                pass
            else:
                raise UnsafeCheckpointError(f"{source}: refusing unknown pickle opcode {name} at byte {pos}")
    except CheckpointFormatError:
        raise
    except IndexError:
        raise CheckpointFormatError(f"{source}: corrupt pickle: stack underflow at byte {pos}") from None
    except Exception as e:  # noqa: BLE001 - genops raises ValueError/struct.error/... on malformed input
        raise CheckpointFormatError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from None


# --------------------------------------------------------------------------------- unpickler
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only knows how to rebuild tensors and plain containers.

    Use :func:`unpickle` (scan first, then this) rather than calling ``load`` directly.

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
        ("_codecs", "encode"): _codecs_encode,
    }

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 (torch's default) names builtins the Python 2 way
            module = "builtins"
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _TORCH_DTYPE_NAMES[name]
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, np.dtype(np.uint8))
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load global '{str(module)[:80]}.{str(name)[:80]}': only "
            f"tensor-rebuild globals are allowed (a checkpoint that needs it may execute code when unpickled)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._source}: unsupported persistent id {_short(pid)}")
        _, storage_type, key, location, numel = pid
        if isinstance(storage_type, np.dtype):  # torch >= 2 may pickle a torch.dtype directly
            storage_type = _StorageType(str(storage_type), storage_type)
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._source}: unsupported storage type {_short(storage_type)}")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise CheckpointFormatError(f"{self._source}: malformed storage record {_short(pid)} (key and location "
                                        "must be strings, the element count a non-negative int)")
        return self._load_storage(storage_type, key, numel)


def find_bad_tensor(obj) -> tuple[str, _BadTensor] | None:
    """The first refused tensor reachable from ``obj`` and its key path (iterative, cycle-safe)."""
    todo: list[tuple[Any, str]] = [(obj, "")]
    seen: set[int] = set()
    while todo:
        node, path = todo.pop()
        if isinstance(node, _BadTensor):
            return path or "<top level>", node
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            todo.extend((v, f"{path}/{k}" if path else str(k)) for k, v in reversed(list(node.items()))
                        if isinstance(k, (str, int)))
            todo.extend((k, f"{path}/<key>") for k in node if not isinstance(k, (str, int)))
        elif isinstance(node, (list, tuple)):
            todo.extend((v, f"{path}/{i}" if path else str(i)) for i, v in reversed(list(enumerate(node))))
        elif isinstance(node, (set, frozenset)):
            todo.extend((v, f"{path}/<set item>") for v in node)
        elif isinstance(node, slice):
            todo.extend((v, f"{path}/<slice>") for v in (node.start, node.stop, node.step))
    return None


def unpickle(stream, unpickler: RestrictedUnpickler, source: str):
    """Scan, then unpickle one pickle from ``stream`` (seekable); any failure -> CheckpointFormatError."""
    start = stream.tell()
    scan_pickle(stream, source)
    stream.seek(start)
    try:
        obj = unpickler.load()
    except CheckpointFormatError as e:
        if source in str(e):
            raise
        raise type(e)(f"{source}: {e}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{source}: the pickle nests objects too deeply") from None
    except Exception as e:  # noqa: BLE001 - hostile pickles raise TypeError/KeyError/MemoryError/...
        raise CheckpointFormatError(f"{source}: corrupt or truncated checkpoint ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from None
    bad = find_bad_tensor(obj)
    if bad is not None:
        key, tensor = bad
        raise CheckpointFormatError(f"{tensor.problem}: {key} in {source} ({tensor.detail})")
    return obj


def _stored_entry_offset(fileobj, info: zipfile.ZipInfo, source: str) -> int:
    """Absolute byte offset of an uncompressed entry's data inside the zip file."""
    fileobj.seek(info.header_offset)
    header = fileobj.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"{source}: bad local zip header for entry {info.filename}")
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


def _open_zip(path: str):
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return None
    except Exception as e:  # noqa: BLE001 - zipfile raises ValueError/OSError/struct.error/... on hostile input
        raise CheckpointFormatError(f"{path}: not a readable zip archive ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from None


def load_torch_file(path: str | os.PathLike, *, mmap_storages: bool = True) -> Any:
    """Load a ``torch.save`` checkpoint (zip, or the legacy pre-1.6 format) without importing torch.

    Args:
      path: ``.pt``/``.pth``/``.bin``/``.ckpt`` file.
      mmap_storages: map storages from the file lazily (default) instead of reading them into memory.

    Returns:
      The unpickled object with every tensor replaced by a numpy array (read-only view).

    Raises:
      FileNotFoundError: the path does not exist.
      CheckpointFormatError: not a checkpoint, truncated file, unknown storage dtype, a tensor view
        outside its storage, a compressed storage, ... (the message names the file and tensor).
      UnsafeCheckpointError: the pickle references a disallowed global or opcode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    zf = _open_zip(path)
    if zf is None:
        from convert.torch_legacy import is_legacy_torch_file, load_legacy_torch_file

        if is_legacy_torch_file(path):
            return load_legacy_torch_file(path)
        raise CheckpointFormatError(f"{path}: not a PyTorch zip checkpoint (nor a legacy torch.save file)")
    with zf:
        try:
            return _load_zip(zf, path, mmap_storages)
        except CheckpointFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure of a hostile archive is a format error
            raise CheckpointFormatError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: "
                                        f"{str(e)[:200]})") from None


def _load_zip(zf: zipfile.ZipFile, path: str, mmap_storages: bool) -> Any:
    names = zf.namelist()
    pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl_names:
        raise CheckpointFormatError(f"{path}: zip archive has no data.pkl; not a torch.save checkpoint")
    pkl_name = pkl_names[0]
    prefix = pkl_name[: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        with zf.open(prefix + "byteorder") as fh:
            byteorder = fh.read(16).decode("ascii", errors="replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder {byteorder!r}")
    pkl_info = zf.getinfo(pkl_name)
    if pkl_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{path}: data.pkl declares {pkl_info.file_size} bytes, more than the "
                                    f"{MAX_PICKLE_BYTES} a checkpoint needs; refusing it")
    with zf.open(pkl_name) as f:
        pkl = f.read(MAX_PICKLE_BYTES + 1)  # bounded even if the declared size lies
    if len(pkl) > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{path}: data.pkl inflates past {MAX_PICKLE_BYTES} bytes; refusing it")
    file_size = os.path.getsize(path)

    with open(path, "rb") as raw_file:
        mapped = None
        if mmap_storages and file_size > 0:
            mapped = mmap.mmap(raw_file.fileno(), 0, access=mmap.ACCESS_READ)
            _MAPPINGS[_base_address(mapped)] = mapped
        cache: dict[str, tuple[_Storage, _StorageType, int]] = {}

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
            if key in cache:
                st, typ, n = cache[key]
                if typ.dtype != storage_type.dtype or n != numel:
                    raise CheckpointFormatError(f"{path}: storage {key} is declared twice with different types or "
                                                f"sizes ({typ.name} x {n}, {storage_type.name} x {numel})")
                return st
            entry = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(entry)
            except KeyError:
                raise CheckpointFormatError(f"{path}: storage entry {entry!r} is missing (truncated file?)") from None
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise CheckpointFormatError(
                    f"{path}: storage entry {entry!r} is compressed or encrypted; torch.save stores storages "
                    "uncompressed, so this file was repacked or forged: refusing to inflate it")
            dtype = storage_type.dtype
            nbytes = numel * dtype.itemsize if storage_type.name != "UntypedStorage" else numel
            if info.file_size < nbytes or info.compress_size < nbytes:
                raise CheckpointFormatError(
                    f"{path}: storage {key} holds {info.file_size} bytes, expected {nbytes} "
                    f"({numel} x {dtype}); the file is truncated or corrupt")
            offset = _stored_entry_offset(raw_file, info, path)
            if offset + nbytes > file_size:
                raise CheckpointFormatError(f"{path}: storage {key} runs past the end of the file (truncated)")
            count = nbytes // dtype.itemsize
            if mapped is not None:
                arr = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
            else:
                raw_file.seek(offset)
                arr = np.frombuffer(raw_file.read(nbytes), dtype=dtype, count=count)
            if byteorder == "big" and dtype.itemsize > 1:
                arr = arr.byteswap()
            st = _Storage(arr, key)
            cache[key] = (st, storage_type, numel)
            return st

        stream = io.BytesIO(pkl)
        return unpickle(stream, RestrictedUnpickler(stream, load_storage, path), path)
