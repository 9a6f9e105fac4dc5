"""Property-based fuzzing of the checkpoint readers (hypothesis, bounded): whatever the bytes, reading
never crashes or hangs, returns or raises only the project's CheckpointFormatError."""

import json
import os
import struct
import zipfile

import numpy as np
import pytest
from _hostile import dict_body, legacy_bytes, op_global, op_int, op_str, op_tuple, storage_pid, tensor, write_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.state_dict_io import read_state_dict
from convert.torch_pickle import CheckpointFormatError, load_torch_file

FUZZ = settings(max_examples=150, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _read_or_format_error(reader, path):
    try:
        reader(path)
    except CheckpointFormatError:
        pass


@st.composite
def mutated(draw, data: bytes):
    """``data`` with a few bytes overwritten, a slice deleted or duplicated, and maybe truncated."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(buf)))
        j = draw(st.integers(i, min(len(buf), i + 64)))
        buf[i:i] = buf[i:j] if draw(st.booleans()) else b""
        if not draw(st.booleans()):
            del buf[i:j]
    if draw(st.integers(0, 3)) == 0:
        buf = buf[: draw(st.integers(0, len(buf)))]
    return bytes(buf)


@pytest.fixture(scope="module")
def tiny_zip(fixtures_dir):
    """``(data.pkl, {storage key: bytes})`` of the tiny Self-Forcing checkpoint."""
    with zipfile.ZipFile(os.path.join(fixtures_dir, "selfforcing_tiny", "checkpoint.pt")) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        storages = {n.rsplit("/", 1)[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
    return pkl, storages


F16 = np.arange(16, dtype=np.float32).tobytes()
_INTS = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**40, 2**63, -(2**63), 2**70]))
_SNIPPETS = st.one_of(
    st.sampled_from([b"(", b"t", b"l", b"d", b"}", b"]", b")", b"u", b"a", b"e", b"s", b"R", b"b", b"0", b"1", b"2",
                     b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"N", b"Q", b"\x94", b"h\x00", b"q\x00", b"\x8f",
                     b"\x90", b"\x91", op_global("collections", "OrderedDict"), op_global("builtins", "set"),
                     op_global("builtins", "frozenset"), op_global("builtins", "slice"),
                     op_global("torch", "FloatStorage"), op_global("torch", "float32"),
                     op_global("torch._utils", "_rebuild_tensor_v2"),
                     op_global("torch._utils", "_rebuild_parameter"), op_str("storage"), op_str("0"), op_str("cpu")]),
    _INTS.map(op_int),
    st.tuples(_INTS, st.lists(_INTS, max_size=3), st.lists(_INTS, max_size=3)).map(
        lambda v: tensor(storage_pid("0", 16), v[0], tuple(v[1]), tuple(v[2]))),
)


@given(body=st.lists(_SNIPPETS, max_size=40))
@FUZZ
def test_fuzz_unpickler_with_opcode_soup(tmp_path, body):
    pkl = b"\x80\x02}(" + op_str("w") + b"".join(body) + b"u."
    _read_or_format_error(load_torch_file, write_zip(tmp_path / "f.pt", pkl, {"0": F16}))


@given(data=st.data())
@FUZZ
def test_fuzz_unpickler_with_mutated_real_pickles(tmp_path, tiny_zip, data):
    pkl, storages = tiny_zip
    _read_or_format_error(load_torch_file, write_zip(tmp_path / "f.pt", data.draw(mutated(pkl)), storages))


@given(data=st.data())
@FUZZ
def test_fuzz_whole_zip_and_legacy_files(tmp_path, fixtures_dir, data):
    name = data.draw(st.sampled_from(["torch_files/tiny_plain_wan.pth", "torch_files/legacy_small.pt"]))
    raw = open(os.path.join(fixtures_dir, name), "rb").read()
    path = tmp_path / "f.pt"
    path.write_bytes(data.draw(mutated(raw)))
    _read_or_format_error(load_torch_file, path)


@given(body=st.lists(_SNIPPETS, max_size=30), count=st.integers(-(2**63), 2**63 - 1))
@FUZZ
def test_fuzz_legacy_object_pickle(tmp_path, body, count):
    obj = b"\x80\x02" + dict_body({"w": tensor(storage_pid("0", 16, legacy=True), 0, (16,), (1,))})[:-1]
    obj += op_str("x") + b"".join(body) + b"u."
    path = tmp_path / "l.pt"
    path.write_bytes(legacy_bytes(obj, [("0", count, F16)]))
    _read_or_format_error(load_torch_file, path)


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "C64", "XX", "", 3])
_TENSOR = st.fixed_dictionaries({
    "dtype": _DTYPES,
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=4), st.just([2**62, 2**62]), st.just("x")),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2),
                              st.just([0, 2**64]), st.just([5, 1])),
})


@given(header=st.dictionaries(st.text(max_size=6), _TENSOR, max_size=4), data=st.binary(max_size=96),
       length_delta=st.sampled_from([0, 0, 0, 1, -1, 2**40, -(2**20)]))
@FUZZ
def test_fuzz_safetensors_reader(tmp_path, header, data, length_delta):
    blob = json.dumps(header).encode()
    n = max(0, min(2**63 - 1, len(blob) + length_delta))
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    _read_or_format_error(read_state_dict, path)


@given(data=st.data())
@FUZZ
def test_fuzz_mutated_safetensors(tmp_path, data):
    from safetensors.numpy import save_file

    src = tmp_path / "ok.safetensors"
    if not src.exists():
        save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}, str(src))
    path = tmp_path / "f.safetensors"
    path.write_bytes(data.draw(mutated(src.read_bytes())))
    _read_or_format_error(read_state_dict, path)


def test_fuzz_helpers_are_not_vacuous(tmp_path, tiny_zip):
    """The pieces the fuzzers mutate are valid to begin with, so mutations explore near real files."""
    assert len(load_torch_file(write_zip(tmp_path / "ok.pt", *tiny_zip))) == 2
    ok = b"\x80\x02}(" + op_str("w") + tensor(storage_pid("0", 16), 0, (16,), (1,)) + b"u."
    assert load_torch_file(write_zip(tmp_path / "t.pt", ok, {"0": F16}))["w"][5] == 5
    assert op_tuple(op_int(1))
