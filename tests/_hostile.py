"""Builders of hostile (and valid) checkpoint payloads for the security tests; everything is made in code."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def op_int(n: int) -> bytes:
    """LONG1 opcode for any Python int."""
    b = pickle.encode_long(n)
    return b"\x8a" + bytes([len(b)]) + b


def op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def storage_pid(key: str, numel: int, storage: str = "FloatStorage", legacy: bool = False) -> bytes:
    """The persistent id of a storage, then BINPERSID."""
    items = [op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"), op_int(numel)]
    if legacy:
        items.append(b"N")
    return op_tuple(*items) + b"Q"


def tensor(pid: bytes, offset, size, stride, *, raw_args: bytes | None = None) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``; ``raw_args`` replaces
    the offset/size/stride opcodes (type confusions)."""
    def val(v):
        if isinstance(v, bytes):
            return v
        if isinstance(v, (tuple, list)):
            return op_tuple(*(val(x) for x in v))
        return op_int(v)

    args = raw_args if raw_args is not None else val(offset) + val(size) + val(stride)
    return (op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + args + b"\x89"
            + op_global("collections", "OrderedDict") + b")R" + b"tR")


def state_dict(items: dict[str, bytes]) -> bytes:
    """A pickled dict ``{name: <value opcodes>}`` (protocol 2)."""
    body = b"".join(op_str(k) + v for k, v in items.items())
    return b"\x80\x02}(" + body + b"u."


def nested(outer: str, inner: bytes) -> bytes:
    """``{outer: <inner dict opcodes without PROTO/STOP>}``."""
    return b"\x80\x02}(" + op_str(outer) + inner + b"u."


def dict_body(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(op_str(k) + v for k, v in items.items()) + b"u"


def write_zip(path, pkl: bytes, storages: dict[str, bytes] | None = None, *, compress_storages: bool = False,
              compress_pkl: bool = False, prefix: str = "archive") -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"{prefix}/data.pkl"), pkl,
                    compress_type=zipfile.ZIP_DEFLATED if compress_pkl else zipfile.ZIP_STORED)
        for key, data in (storages or {}).items():
            zf.writestr(zipfile.ZipInfo(f"{prefix}/data/{key}"), data,
                        compress_type=zipfile.ZIP_DEFLATED if compress_storages else zipfile.ZIP_STORED)
        zf.writestr(f"{prefix}/version", "3\n")
    return str(path)


def legacy_bytes(obj_pkl: bytes, storages: list[tuple[str, int, bytes]], *, keys: list[str] | None = None) -> bytes:
    """A legacy torch.save file: magic, protocol, sys info, the object pickle, keys, then per key
    ``(declared count, raw bytes)``."""
    out = io.BytesIO()
    out.write(pickle.dumps(LEGACY_MAGIC, protocol=2))
    out.write(pickle.dumps(1001, protocol=2))
    out.write(pickle.dumps({"little_endian": True, "type_sizes": {"int": 4}}, protocol=2))
    out.write(obj_pkl)
    out.write(pickle.dumps(keys if keys is not None else [k for k, _, _ in storages], protocol=2))
    for _, count, data in storages:
        out.write(struct.pack("<q", count))
        out.write(data)
    return out.getvalue()


def system_call(marker) -> bytes:
    """``os.system("touch MARKER")`` as REDUCE (protocol 2)."""
    return op_global("os", "system") + op_tuple(op_str(f"touch {marker}")) + b"R"
