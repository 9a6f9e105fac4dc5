"""Hostile checkpoints: code execution, out-of-storage views, bombs, truncations and type confusions.

Every payload is built by code here (tests/_hostile.py), for every torch suffix and the legacy format.
Each must be refused with a CheckpointFormatError naming the problem (and file/tensor), and nothing may
run: payloads that would execute code write a marker file, which must not appear.
"""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from _hostile import (
    dict_body,
    legacy_bytes,
    nested,
    op_global,
    op_int,
    op_str,
    op_tuple,
    state_dict,
    storage_pid,
    system_call,
    tensor,
    write_zip,
)

from convert import torch_pickle
from convert.state_dict_io import read_state_dict
from convert.torch_legacy import is_legacy_torch_file
from convert.torch_pickle import CheckpointFormatError, UnsafeCheckpointError, load_torch_file
from convert.wan_dit import read_dit_checkpoint
from qarvd_jax.cli import main as cli

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
F16 = np.arange(16, dtype=np.float32).tobytes()


@pytest.fixture()
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload executed code"


def _w(offset, size, stride, key="w", numel=16):
    return {key: tensor(storage_pid("0", numel), offset, size, stride)}


def _zip(tmp_path, items, suffix=".pt", storages=None, **kw):
    return write_zip(tmp_path / f"ckpt{suffix}", state_dict(items), {"0": F16} if storages is None else storages, **kw)


def _legacy(tmp_path, obj_pkl, storages=(("0", 16, F16),), suffix=".pt", **kw):
    path = tmp_path / f"legacy{suffix}"
    path.write_bytes(legacy_bytes(obj_pkl, list(storages), **kw))
    return str(path)


def _legacy_dict(items):
    return b"\x80\x02" + dict_body(items) + b"."


# ------------------------------------------------------------------------------------ code execution
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_issue_payload_non_zip_os_system_does_not_run(tmp_path, marker, suffix, capsys, monkeypatch):
    """The 64-byte non-zip file of the issue: detection used to unpickle it with plain pickle.loads."""
    monkeypatch.chdir(tmp_path)  # a short command, so the whole payload fits in the 64 bytes read
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(b"\x80\x02cos\nsystem\nX\x0b\x00\x00\x00touch pwned\x85R." + b"\0" * 64)
    assert not is_legacy_torch_file(evil)
    with pytest.raises(CheckpointFormatError, match="not a PyTorch zip checkpoint"):
        read_state_dict(evil)
    assert cli(["convert", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil" in err and "Traceback" not in err


def test_non_zip_head_importing_a_module_does_not_import_it(tmp_path, marker, monkeypatch):
    """``GLOBAL module attr`` at the head of a non-zip file: the module must not be imported."""
    mod = "qarvd_evil_mod_head"
    (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = tmp_path / "head.pt"
    evil.write_bytes(b"\x80\x02" + op_global(mod, "x") + b"." + b"\0" * 64)
    with pytest.raises(CheckpointFormatError):
        load_torch_file(evil)
    assert mod not in sys.modules


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_zip_reduce_os_system_is_refused(tmp_path, marker, suffix):
    path = write_zip(tmp_path / f"evil{suffix}", state_dict({"w": system_call(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global 'os.system'"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_global_of_an_arbitrary_module_is_not_imported(tmp_path, marker, monkeypatch, fmt):
    mod = f"qarvd_evil_mod_{fmt}"
    (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    value = op_global(mod, "x")
    path = (write_zip(tmp_path / "g.pt", state_dict({"w": value})) if fmt == "zip"
            else _legacy(tmp_path, _legacy_dict({"w": value})))
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load global '{mod}.x'"):
        load_torch_file(path)
    assert mod not in sys.modules


@pytest.mark.parametrize("opcodes, name", [
    (b"(" + op_str("touch x") + b"ios\nsystem\n", "INST"),
    (b"(" + b"ccollections\nOrderedDict\n" + b"o", "OBJ"),
    (b"ccollections\nOrderedDict\n)\x81", "NEWOBJ"),
    (b"ccollections\nOrderedDict\n)}\x92", "NEWOBJ_EX"),
    (b"\x82\x01", "EXT1"),
    (b"\x97", "NEXT_BUFFER"),
])
def test_opcodes_torch_never_writes_are_refused(tmp_path, marker, opcodes, name):
    """INST/OBJ/NEWOBJ build objects, EXT* reach the copyreg registry: refused before unpickling."""
    path = write_zip(tmp_path / "op.pt", b"\x80\x04}(" + op_str("w") + opcodes + b"u.")
    with pytest.raises(UnsafeCheckpointError, match=f"refusing pickle opcode {name}"):
        load_torch_file(path)


@pytest.mark.parametrize("target", [
    op_global("torch._utils", "_rebuild_tensor_v2"),  # would set attributes on the reader's own function
    op_global("torch", "float32"),  # would call numpy's dtype.__setstate__ on the process-wide float32
    b"]",
])
def test_build_on_anything_but_an_ordered_dict_is_refused(tmp_path, target):
    state = b"}" + op_str("__defaults__") + op_tuple(op_int(1)) + b"s"
    path = write_zip(tmp_path / "b.pt", state_dict({"w": target + state + b"b"}))
    with pytest.raises(UnsafeCheckpointError, match="BUILD"):
        load_torch_file(path)
    assert torch_pickle._rebuild_tensor_v2.__defaults__ == (False, None, None)
    assert np.dtype(np.float32).itemsize == 4


def test_build_on_an_ordered_dict_is_allowed(tmp_path):
    """torch.save writes OrderedDict state dicts with ``_metadata`` through BUILD (wan_vae_tiny has one)."""
    od = op_global("collections", "OrderedDict") + b")R" + b"(" + op_str("k") + op_int(1) + b"u"
    od += b"}" + op_str("_metadata") + b"}s" + b"b"
    got = load_torch_file(write_zip(tmp_path / "od.pt", state_dict({"sd": od})))
    assert got["sd"] == {"k": 1} and got["sd"]._metadata == {}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_legacy_file_with_a_payload_after_the_header(tmp_path, marker, suffix):
    path = _legacy(tmp_path, b"\x80\x02" + system_call(marker) + b".", suffix=suffix)
    assert is_legacy_torch_file(path)
    with pytest.raises(UnsafeCheckpointError, match="'os.system'"):
        read_state_dict(path)


def test_persistent_id_with_a_dangerous_storage_type(tmp_path, marker):
    pid = op_tuple(op_str("storage"), system_call(marker), op_str("0"), op_str("cpu"), op_int(16)) + b"Q"
    path = write_zip(tmp_path / "p.pt", state_dict({"w": tensor(pid, 0, (16,), (1,))}), {"0": F16})
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)


# ------------------------------------------------------------------------------------ tensor views
STRIDE_CASES = [
    ((3, (4,), (-1,)), "negative stride"),
    ((4, (2, 2), (2, -1)), "negative stride"),  # mixed signs, still inside the storage
    ((0, (1000, 1000), (0, 0)), "stride 0 on a dimension larger than 1"),
    ((0, (4, 4), (0, 1)), "stride 0 on a dimension larger than 1"),
    ((0, (5, 4), (4, 1)), "runs past its storage"),
    ((16, (1,), (1,)), "runs past its storage"),
    ((0, (2**62, 2), (2**62, 1)), "runs past its storage"),  # int64 products would overflow
    ((2**70, (1,), (1,)), "runs past its storage"),
    ((0, (4, 4), (1, 1)), "overlaps itself"),
    ((0, (1,) * 65, (1,) * 65), "more than 64 dimensions"),
    ((0, (2, 2), (1,)), "size and stride tuples of the same length"),
    ((-1, (1,), (1,)), "offset that is not a non-negative int"),
    ((op_str("0"), (1,), (1,)), "offset that is not a non-negative int"),
    ((b"\x88", (1,), (1,)), "offset that is not a non-negative int"),  # True is not an int offset
    ((0, (b"G?\xf8\x00\x00\x00\x00\x00\x00",), (1,)), "not non-negative ints"),  # size 1.5
    ((0, op_int(4), (1,)), "size and stride tuples"),
    ((0, (0, 2**40), (1, 1)), "absurd empty shape"),
]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("view, message", STRIDE_CASES,
                         ids=[f"{m[:20]}-{i}" for i, (_, m) in enumerate(STRIDE_CASES)])
def test_tensor_views_stay_inside_their_storage(tmp_path, fmt, view, message):
    offset, size, stride = view
    if fmt == "zip":
        path = write_zip(tmp_path / "v.pt", nested("generator_ema", dict_body(
            {"model.ok": tensor(storage_pid("0", 16), 0, (16,), (1,)),
             "model.bad": tensor(storage_pid("0", 16), offset, size, stride)})), {"0": F16})
        key = "generator_ema/model.bad"
    else:
        path = _legacy(tmp_path, _legacy_dict({"bad": tensor(storage_pid("0", 16, legacy=True), offset, size,
                                                             stride)}))
        key = "bad"
    with pytest.raises(CheckpointFormatError) as e:
        load_torch_file(path)
    assert f"{message}" in str(e.value)
    assert f": {key} in {path}" in str(e.value)


def test_sound_views_still_load(tmp_path):
    """Transposes, size-1 dims with any stride, empty tensors, offsets: all within the storage."""
    views = {"t": (0, (4, 4), (1, 4)), "one": (3, (1, 4), (0, 1)), "empty": (0, (0, 5), (5, 1)),
             "tail": (15, (1,), (1,)), "scalar": (7, (), ())}
    items = {k: tensor(storage_pid("0", 16), *v) for k, v in views.items()}
    got = load_torch_file(write_zip(tmp_path / "ok.pt", state_dict(items), {"0": F16}))
    ref = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(got["t"], ref.reshape(4, 4).T)
    np.testing.assert_array_equal(got["one"], ref[3:7][None])
    assert got["empty"].shape == (0, 5) and got["tail"][0] == 15 and got["scalar"] == 7


def test_a_tensor_cannot_use_another_tensor_as_its_storage(tmp_path):
    """A view passed where a storage belongs would make as_strided walk off the view's buffer."""
    inner = tensor(storage_pid("0", 16), 0, (4, 4), (1, 4))
    outer = (op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + inner + op_int(0) + op_tuple(op_int(16))
             + op_tuple(op_int(1)) + b"\x89" + op_global("collections", "OrderedDict") + b")RtR")
    with pytest.raises(CheckpointFormatError, match="not backed by a storage of the file: w in"):
        load_torch_file(write_zip(tmp_path / "s.pt", state_dict({"w": outer}), {"0": F16}))


def test_many_views_of_one_storage_are_not_backed_by_bytes(tmp_path):
    items = {f"w{i}": tensor(storage_pid("0", 16), 0, (16,), (1,)) for i in range(300)}
    with pytest.raises(CheckpointFormatError, match="not backed by real bytes"):
        load_torch_file(write_zip(tmp_path / "m.pt", state_dict(items), {"0": F16}))


# ------------------------------------------------------------------------------------ resources
def test_compressed_storage_zip_bomb_is_refused_without_inflating(tmp_path):
    numel = 1 << 24  # 64 MiB of zeros -> ~64 KB deflated
    path = write_zip(tmp_path / "bomb.pt", state_dict(_w(0, (numel,), (1,), numel=numel)),
                     {"0": bytes(4 * numel)}, compress_storages=True)
    assert os.path.getsize(path) < (1 << 20)
    with pytest.raises(CheckpointFormatError, match="compressed or encrypted.*refusing to inflate"):
        load_torch_file(path)


def test_data_pkl_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", 4096)
    big = state_dict({"pad": op_str("x" * 8000)})
    with pytest.raises(CheckpointFormatError, match="data.pkl declares"):
        load_torch_file(write_zip(tmp_path / "big.pt", big))
    path = write_zip(tmp_path / "lie.pt", big, compress_pkl=True)  # declared size patched to look small
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data.pkl")
    raw = bytearray(open(path, "rb").read())
    cd = raw.rfind(b"PK\x01\x02", 0, raw.rfind(b"archive/version"))
    raw[cd + 24:cd + 28] = (100).to_bytes(4, "little")  # central directory: uncompressed size 100
    open(path, "wb").write(bytes(raw))
    assert info.file_size > 4096
    with pytest.raises(CheckpointFormatError):
        load_torch_file(path)


@pytest.mark.parametrize("numel", [17, 2**40, 2**62])
def test_storage_sizes_must_be_backed_by_bytes(tmp_path, numel):
    with pytest.raises(CheckpointFormatError, match="holds 64 bytes, expected"):
        load_torch_file(_zip(tmp_path, _w(0, (1,), (1,), numel=numel)))


@pytest.mark.parametrize("count", [2**40, 2**60, -5, 17])
def test_legacy_declared_counts_are_checked_before_allocating(tmp_path, count):
    path = _legacy(tmp_path, _legacy_dict({"w": tensor(storage_pid("0", 16, legacy=True), 0, (16,), (1,))}),
                   storages=[("0", count, F16)])
    with pytest.raises(CheckpointFormatError, match="storage 0"):
        load_torch_file(path)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run in a child: a regression here is a segfault, which must not take the test process down."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)


@pytest.mark.parametrize("payload", [
    'b"\\x80\\x02}" + b"K\\x01" + b"\\x85" * 200000 + b"K\\x02s."',  # deep tuple as a dict key (CPython hash)
    'b"\\x80\\x02" + b"]" * 200000 + b"a" * 199999 + b"."',  # deep lists
    'b"\\x80\\x02" + b"(" * 100000 + b"l" * 100000 + b"."',  # deep MARK/LIST
])
def test_deep_nesting_is_a_clear_error_not_a_crash(tmp_path, payload):
    path = tmp_path / "deep.pt"
    code = (f"import zipfile\nfrom convert.torch_pickle import load_torch_file, CheckpointFormatError\n"
            f"with zipfile.ZipFile({str(path)!r}, 'w') as zf:\n    zf.writestr('a/data.pkl', {payload})\n"
            f"try:\n    load_torch_file({str(path)!r})\nexcept CheckpointFormatError as e:\n    print('REFUSED', e)\n")
    res = _run_isolated(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "deeper than" in res.stdout


def test_self_referencing_containers_do_not_hang(tmp_path):
    cyc = b"]q\x00h\x00a"  # a list appended to itself through the memo
    got = load_torch_file(write_zip(tmp_path / "c.pt", state_dict({"w": cyc})))
    assert got["w"][0] is got["w"]


# ------------------------------------------------------------------------------------ truncations, confusions
@pytest.mark.parametrize("name", ["selfforcing_tiny/checkpoint.pt", "torch_files/legacy_small.pt",
                                  "torch_files/tiny_plain_wan.pth"])
def test_every_truncation_is_a_format_error(tmp_path, fixtures_dir, name):
    data = open(os.path.join(fixtures_dir, name), "rb").read()
    cuts = sorted({1, 2, 8, 15, 16, 64, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22,
                   len(data) - 1} | set(range(0, len(data), max(1, len(data) // 40))))
    for n in cuts:
        path = tmp_path / f"cut{n}.pt"
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointFormatError):
            read_dit_checkpoint(path)


@pytest.mark.parametrize("value, message", [
    (op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_int(0), op_str("cpu"), op_int(16)) + b"Q",
     "malformed storage record"),  # key an int
    (op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"), op_str("cpu"), op_int(-1)) + b"Q",
     "malformed storage record"),
    (op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"), op_str("cpu"), b"\x88") + b"Q",
     "malformed storage record"),  # numel True
    (op_tuple(op_str("storage"), op_str("FloatStorage"), op_str("0"), op_str("cpu"), op_int(16)) + b"Q",
     "unsupported storage type"),
    (op_tuple(op_str("nope")) + b"Q", "unsupported persistent id"),
    (op_global("torch", "FloatStorage") + b")R", "TypeError"),  # calling a storage type
    (op_global("builtins", "set") + op_tuple(op_int(3)) + b"R", "TypeError"),
    (b"}" + op_global("builtins", "slice") + op_tuple(op_int(1)) + b"R" + op_int(1) + b"s", "TypeError"),
    (b"h\x63", "memo entry 99"),
])
def test_type_confusions_are_format_errors(tmp_path, value, message):
    with pytest.raises(CheckpointFormatError, match=message):
        load_torch_file(write_zip(tmp_path / "t.pt", state_dict({"w": value}), {"0": F16}))


def test_storage_declared_twice_with_different_sizes(tmp_path):
    items = {"a": tensor(storage_pid("0", 16), 0, (16,), (1,)), "b": tensor(storage_pid("0", 8), 0, (8,), (1,))}
    with pytest.raises(CheckpointFormatError, match="declared twice"):
        load_torch_file(write_zip(tmp_path / "d.pt", state_dict(items), {"0": F16}))


@pytest.mark.parametrize("obj, message", [
    (b"\x80\x02" + op_tuple(op_int(1)) + b".", "expected a state dict"),
    (state_dict({"w": op_int(3)}), "not tensors"),
])
def test_state_dict_shape_confusions(tmp_path, obj, message):
    with pytest.raises(CheckpointFormatError, match=message):
        read_state_dict(write_zip(tmp_path / "s.pt", obj))


def test_other_zip_problems(tmp_path):
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zf:
        zf.writestr("a/other", b"x")
    with pytest.raises(CheckpointFormatError, match="no data.pkl"):
        load_torch_file(tmp_path / "nopkl.pt")
    with pytest.raises(CheckpointFormatError, match="storage entry 'archive/data/0' is missing"):
        load_torch_file(_zip(tmp_path, _w(0, (16,), (1,)), storages={}))
    with zipfile.ZipFile(tmp_path / "bo.pt", "w") as zf:
        zf.writestr("a/data.pkl", b"\x80\x02}.")
        zf.writestr("a/byteorder", b"\xff" * 100)
    with pytest.raises(CheckpointFormatError, match="unknown byteorder"):
        load_torch_file(tmp_path / "bo.pt")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_containers_of_every_protocol_still_load(tmp_path, protocol):
    """The scan and allow-list accept what pickle writes for OrderedDict (BUILD of _metadata), sets, slices,
    bytes (protocol 2: ``_codecs.encode``) and protocol 4 framing/memoize/STACK_GLOBAL."""
    import collections
    import pickle

    od = collections.OrderedDict(a=1, b=[1, (2, 3)], c={"f": frozenset({1}), "s": {2, 3}})
    od._metadata = collections.OrderedDict({"": {"version": 1}})
    obj = {"sd": od, "sl": slice(1, 2), "by": b"x\xff", "fl": 1.5}
    got = load_torch_file(write_zip(tmp_path / "p.pt", pickle.dumps(obj, protocol=protocol)))
    assert got == obj and got["sd"]._metadata == od._metadata


def test_codecs_encode_is_only_the_bytes_idiom(tmp_path):
    call = op_global("_codecs", "encode") + op_tuple(op_str("x"), op_str("rot13")) + b"R"
    with pytest.raises(CheckpointFormatError, match=r"c.pt: unsupported _codecs.encode"):
        load_torch_file(write_zip(tmp_path / "c.pt", state_dict({"w": call})))
