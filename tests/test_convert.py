"""Torch-free checkpoint reading, PyTorch <-> Orbax conversion, and every bad-input case."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from convert.state_dict_io import (
    CheckpointFormatError,
    read_state_dict,
    write_safetensors_streaming,
    write_state_dict,
)
from convert.torch_pickle import UnsafeCheckpointError, load_torch_file
from convert.wan_dit import convert, load_orbax, load_params, read_dit_checkpoint
from qarvd_jax.cli import main as cli_main
from qarvd_jax.models.wan import params as wan_params
from qarvd_jax.models.wan.config import WanDiTConfig


@pytest.fixture(scope="module")
def ckpt(fixtures_dir):
    return f"{fixtures_dir}/selfforcing_tiny/checkpoint.pt"


@pytest.fixture(scope="module")
def torch_files(fixtures_dir):
    return f"{fixtures_dir}/torch_files"


def _bits_equal(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_reader_prefers_ema_and_strips_prefix(ckpt):
    raw = load_torch_file(ckpt)
    assert set(raw) == {"generator", "generator_ema"}
    state, layout = read_dit_checkpoint(ckpt)
    assert layout.top_level_key == "generator_ema" and layout.key_prefix == "model."
    assert len(state) == 69 and "patch_embedding.weight" in state
    assert _bits_equal(state["head.head.weight"], raw["generator_ema"]["model.head.head.weight"])
    state_g, _ = read_dit_checkpoint(ckpt, prefer="generator")
    assert not np.array_equal(state_g["head.head.weight"], state["head.head.weight"])


def test_bf16_fallback_and_fsdp_infix(torch_files, ckpt):
    state, layout = read_dit_checkpoint(f"{torch_files}/tiny_generator_bf16_fsdp.pt")
    assert layout.top_level_key == "generator" and layout.dtype == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in state.values())
    ref, _ = read_dit_checkpoint(ckpt, prefer="generator")
    assert set(state) == set(ref)
    np.testing.assert_array_equal(state["blocks.1.ffn.0.weight"],
                                  ref["blocks.1.ffn.0.weight"].astype(ml_dtypes.bfloat16))


def test_plain_wan_pth(torch_files, ckpt):
    state, layout = read_dit_checkpoint(f"{torch_files}/tiny_plain_wan.pth")
    assert layout.top_level_key is None and layout.key_prefix == ""
    ref, _ = read_dit_checkpoint(ckpt)
    assert all(_bits_equal(state[k], ref[k]) for k in ref)


@pytest.mark.parametrize("src_name", ["ckpt", "bf16"])
def test_roundtrip_pt_orbax_safetensors_bit_exact(tmp_path, ckpt, torch_files, src_name):
    src = ckpt if src_name == "ckpt" else f"{torch_files}/tiny_generator_bf16_fsdp.pt"
    cfg = WanDiTConfig.tiny()
    orb = tmp_path / "orbax"
    convert(src, orb, config=cfg)
    params, cfg2, meta = load_orbax(orb)
    assert cfg2 == cfg and meta["source_layout"]["key_prefix"] == "model."
    out = tmp_path / "back.safetensors"
    convert(orb, out)
    back = read_state_dict(out)
    state, _ = read_dit_checkpoint(src)
    assert set(back) == {"model." + k for k in state}
    assert all(_bits_equal(back["model." + k], v) for k, v in state.items())


def test_roundtrip_to_pt_with_torch(tmp_path, ckpt):
    pytest.importorskip("torch")
    orb = tmp_path / "orbax"
    convert(ckpt, orb, config=WanDiTConfig.tiny())
    out = tmp_path / "back.pt"
    convert(orb, out)
    back = load_torch_file(out)
    assert set(back) == {"generator_ema"}
    ref = load_torch_file(ckpt)["generator_ema"]
    assert all(_bits_equal(back["generator_ema"][k], v) for k, v in ref.items())


def test_pt_output_without_torch_is_a_clear_error(tmp_path, ckpt, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="needs torch"):
        convert(ckpt, tmp_path / "x.pt", config=WanDiTConfig.tiny())
    assert not (tmp_path / "x.pt").exists()


def _write_sd(path, state):
    write_state_dict(state, path)
    return path


@pytest.fixture()
def good_state(ckpt):
    state, _ = read_dit_checkpoint(ckpt)
    return {k: np.array(v) for k, v in state.items()}


def test_missing_unexpected_and_shape_errors_name_the_key(good_state):
    cfg = WanDiTConfig.tiny()
    s = dict(good_state)
    del s["blocks.1.ffn.2.bias"]
    s["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        wan_params.torch_to_flax(s, cfg)
    assert "blocks.1.ffn.2.bias" in str(e.value) and "blocks.0.extra.weight" in str(e.value)
    with pytest.raises(ValueError, match=r"blocks.0.ffn.0.weight: shape \(128, 64\) contradicts"):
        wan_params.torch_to_flax(good_state, cfg.replace(ffn_dim=96))
    bad = dict(good_state)
    bad["head.head.bias"] = np.zeros(64, np.int32)
    with pytest.raises(ValueError, match="head.head.bias: unsupported dtype int32"):
        wan_params.torch_to_flax(bad, cfg)


def test_config_mismatch_between_checkpoint_and_request(tmp_path, ckpt):
    orb = tmp_path / "o"
    convert(ckpt, orb, config=WanDiTConfig.tiny())
    with pytest.raises(ValueError, match="num_layers is 2 in the checkpoint, 3 requested"):
        load_params(orb, WanDiTConfig.tiny(num_layers=3))


def test_truncated_and_non_checkpoint_files(tmp_path, ckpt):
    data = open(ckpt, "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="trunc.pt"):
        read_dit_checkpoint(trunc)
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch zip checkpoint"):
        read_dit_checkpoint(txt)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointFormatError, match="bad.safetensors"):
        read_dit_checkpoint(st)
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint type"):
        read_dit_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _Evil(marker)}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global '(posix|os|nt).system'"):
        load_torch_file(evil)
    assert not marker.exists()


def test_existing_destination_and_no_half_written_output(tmp_path, ckpt, good_state):
    dst = tmp_path / "out.safetensors"
    dst.write_text("keep me")
    with pytest.raises(FileExistsError):
        convert(ckpt, dst, config=WanDiTConfig.tiny())
    assert dst.read_text() == "keep me"
    # a failing conversion leaves nothing behind (no dst, no temp folders)
    bad = dict(good_state)
    bad["blocks.0.ffn.0.weight"] = bad["blocks.0.ffn.0.weight"][:5]
    src = _write_sd(tmp_path / "bad.safetensors", bad)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="contradicts the config"):
        convert(src, tmp_path / "orb", config=WanDiTConfig.tiny())
    assert set(os.listdir(tmp_path)) == before


def test_streaming_safetensors_writer_validates(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones(4, ml_dtypes.bfloat16)
    entries = [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)]
    out = tmp_path / "s.safetensors"
    write_safetensors_streaming(out, entries, iter([("a", a), ("b", b)]), metadata={"k": "v"})
    back = read_state_dict(out)
    assert _bits_equal(back["a"], a) and _bits_equal(back["b"], b)
    with pytest.raises(ValueError, match="does not match its header"):
        write_safetensors_streaming(tmp_path / "t.safetensors", entries, iter([("a", a), ("b", b[:2])]))
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_convert_both_directions(tmp_path, ckpt, capsys):
    orb = tmp_path / "orb"
    assert cli_main(["convert", ckpt, str(orb), "--preset", "tiny"]) == 0
    out = tmp_path / "w.safetensors"
    assert cli_main(["convert", str(orb), str(out)]) == 0
    assert len(read_state_dict(out)) == 69
    assert cli_main(["convert", str(orb), str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    # inferred config (head_dim 128 does not fit the tiny model) -> explicit heads
    assert cli_main(["convert", ckpt, str(tmp_path / "orb2"), "--num-heads", "4"]) == 0
    _, cfg, _ = load_orbax(tmp_path / "orb2")
    assert cfg.num_heads == 4 and cfg.dim == 64 and cfg.num_layers == 2


def test_legacy_non_zip_torch_file(torch_files, tmp_path):
    got = load_torch_file(f"{torch_files}/legacy_small.pt")
    want = np.load(f"{torch_files}/legacy_small_expected.npz")
    assert list(got) == ["lin.weight", "lin.weight_t", "lin.bias", "emb.bf16", "steps", "row"]
    for k in want.files:
        np.testing.assert_array_equal(np.asarray(got[k]).astype(want[k].dtype), want[k])
    assert got["emb.bf16"].dtype == ml_dtypes.bfloat16 and got["steps"].dtype == np.int64
    data = open(f"{torch_files}/legacy_small.pt", "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:-40])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch_file(cut)
