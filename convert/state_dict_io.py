"""Read and write flat PyTorch-layout state dicts as numpy arrays, without torch.

* :func:`read_state_dict` reads ``.pt``/``.pth``/``.bin`` (torch zip pickle, through the restricted
  unpickler) and ``.safetensors``; tensors are lazy views where the format allows it.
* :func:`write_state_dict` writes ``.safetensors`` (always) or ``.pt`` (only if torch is importable),
  atomically: the data goes to a temporary file in the destination folder, renamed at the end.
* :func:`atomic_output` / :func:`check_destination`: every output of the project goes through them; they
  never replace a folder with a file, a destination that is or holds an input, or a folder that is not
  an artifact of the same kind, and clean up temporaries of interrupted runs.
* :class:`FiniteCheck`: NaN/inf tensors reported by name and count, refused unless allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from convert.torch_pickle import CheckpointFormatError, load_torch_file

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointFormatError",
    "SUPPORTED_FLOAT_DTYPES",
    "TORCH_SUFFIXES",
    "FiniteCheck",
    "atomic_output",
    "check_destination",
    "clean_stale_temporaries",
    "is_saved_tree_dir",
    "make_temp_dir",
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
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError, TypeError, ... on hostile input
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from None


_OWNER_FILE = ".qarvd-owner"


def _owner_line(base: str) -> str:
    return f"{socket.gethostname()}\t{os.getpid()}\t{base}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale_temporaries(dst: str | os.PathLike) -> list[str]:
    """Remove ``.tmp-<name>-*`` folders next to ``dst`` left by a killed run of this host.

    Only folders holding an owner record for ``dst``'s name written on this host by a process that
    no longer runs are removed; anything else (another host's run in progress, user files) stays.
    Returns the removed paths.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    host = socket.gethostname()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".tmp-" + base + "-"):
            continue
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, _OWNER_FILE)) as fh:
                owner_host, pid, owner_base = fh.read().split("\t")
            stale = owner_host == host and owner_base == base and not _pid_alive(int(pid))
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s left by an interrupted run", path)
            removed.append(path)
    return removed


def make_temp_dir(dst: str | os.PathLike) -> str:
    """A new hidden ``.tmp-<name>-*`` folder next to ``dst`` with an owner record (host, pid).

    Stale ones of the same name left by killed runs are removed first. The caller deletes it.
    """
    dst = os.path.abspath(os.fspath(dst))
    clean_stale_temporaries(dst)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(dst) + "-", dir=os.path.dirname(dst))
    try:
        with open(os.path.join(tmp_dir, _OWNER_FILE), "w") as fh:
            fh.write(_owner_line(os.path.basename(dst)))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return tmp_dir


def is_saved_tree_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by Orbax (``_CHECKPOINT_METADATA`` or this project's ``metadata/`` item)."""
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) or (
        os.path.isdir(os.path.join(path, "metadata")) and os.path.isdir(os.path.join(path, "params")))


def check_destination(dst: str | os.PathLike, *, kind: str = "file", overwrite: bool = False,
                      sources: Iterable[str | os.PathLike | None] = (),
                      replaceable: Callable[[str], bool] | None = None, what: str = "") -> None:
    """Refuse a destination that would destroy something the user did not ask to replace.

    Args:
      kind: ``"file"`` or ``"dir"``: what will be written at ``dst``.
      overwrite: an existing artifact of the same kind may be replaced.
      sources: inputs of the command; ``dst`` may not be one of them nor a folder containing one.
      replaceable: for ``kind="dir"``, whether an existing non-empty folder is an artifact of the
        same kind (e.g. :func:`is_saved_tree_dir`); without it only an empty folder is replaced.
      what: name of the artifact for messages (``"an Orbax checkpoint"``).

    Raises:
      OutputError: ``dst`` is or contains a source, is a folder where a file is meant (or the
        reverse), or is a folder that is not an artifact of the same kind.
      FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    from qarvd_jax.errors import OutputError

    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    dst = os.path.abspath(os.fspath(dst))
    real = os.path.realpath(dst)
    for src in sources:
        if src is None:
            continue
        s = os.path.realpath(os.fspath(src))
        if s == real or s.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputError(f"{dst}: the destination is or contains the source {os.fspath(src)}; refusing to "
                              "write over it (choose another destination)")
    if not os.path.lexists(dst):
        return
    if kind == "file" and os.path.isdir(dst):
        raise OutputError(f"{dst} is a folder, but a file is written here: refusing to replace a folder "
                          "(give a file name)")
    if kind == "dir" and not os.path.isdir(dst):
        raise OutputError(f"{dst} is a file, but a folder is written here: refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"destination already exists: {dst} (pass overwrite to replace it)")
    if kind == "dir" and os.listdir(dst) and not (replaceable is not None and replaceable(dst)):
        raise OutputError(f"{dst} is a folder that is not {what or 'an output of the same kind'}: refusing to "
                          "replace it (remove it yourself or choose another destination)")


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False,
                  kind: str | None = None, sources: Iterable[str | os.PathLike | None] = (),
                  replaceable: Callable[[str], bool] | None = None, what: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``dst``; move it to ``dst`` only if the block succeeds.

    ``kind`` is what the block writes at the yielded path (``"file"``, or ``"dir"``; ``is_dir``
    also creates the folder). The destination is checked up front and again before the move with
    :func:`check_destination` (nothing is written, nothing existing is clobbered unless it is an
    artifact of the same kind and ``overwrite`` is set). An existing folder is moved aside, the new
    one moved in, then the old one deleted. The temporary folder is removed on failure, Ctrl-C or
    SIGTERM (``qarvd`` turns it into an exception); one left by a killed run (SIGKILL) is removed by
    the next write to the same destination (:func:`clean_stale_temporaries`).
    """
    from qarvd_jax.errors import OutputError

    kind = kind or ("dir" if is_dir else "file")
    dst = os.path.abspath(os.fspath(dst))
    check = dict(kind=kind, overwrite=overwrite, sources=tuple(sources), replaceable=replaceable, what=what)
    check_destination(dst, **check)
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(f"cannot create the folder {parent} for {dst}: a file is in the way") from e
    tmp_dir = make_temp_dir(dst)
    tmp = os.path.join(tmp_dir, os.path.basename(dst))
    try:
        if is_dir:
            os.makedirs(tmp)
        yield tmp
        if os.path.lexists(dst):
            check_destination(dst, **{**check, "sources": ()})
            if os.path.isdir(dst):
                old = os.path.join(tmp_dir, ".replaced")
                os.replace(dst, old)
                try:
                    os.replace(tmp, dst)
                except BaseException:
                    os.replace(old, dst)
                    raise
                return
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _finite_counts(arr) -> tuple[int, int]:
    a = np.asarray(arr)
    if a.dtype.kind not in "fc" and a.dtype != np.dtype(ml_dtypes.bfloat16):
        return 0, 0
    if np.isfinite(a).all():  # one pass in the common case
        return 0, 0
    return int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))


class FiniteCheck:
    """Counts NaN/inf values tensor by tensor (``add``), then reports or refuses them (``finish``).

    Used by ``convert``, ``outliers`` and ``export``: each tensor is checked as it is read.
    """

    def __init__(self, source: str, allow: bool = False):
        self.source, self.allow = source, allow
        self.bad: list[tuple[str, int, int]] = []

    def add(self, name: str, arr) -> None:
        nan, inf = _finite_counts(arr)
        if nan or inf:
            self.bad.append((name, nan, inf))

    def add_all(self, items: Iterable[tuple[str, Any]]) -> "FiniteCheck":
        for name, arr in items:
            self.add(name, arr)
        return self

    def message(self) -> str:
        shown = ", ".join(f"{n} ({a} NaN, {b} inf)" for n, a, b in self.bad[:8])
        more = f", ... ({len(self.bad) - 8} more)" if len(self.bad) > 8 else ""
        return f"{self.source}: {len(self.bad)} tensor(s) hold non-finite values: {shown}{more}"

    def finish(self) -> list[tuple[str, int, int]]:
        """Raise NonFiniteError if any tensor held NaN/inf (unless allowed: then log a warning)."""
        from qarvd_jax.errors import NonFiniteError

        if self.bad and not self.allow:
            raise NonFiniteError(self.message() + " (pass --allow-nonfinite to continue anyway)")
        if self.bad:
            log.warning("%s (continuing: --allow-nonfinite)", self.message())
        return self.bad


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
