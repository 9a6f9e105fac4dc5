"""Data safety of every command that writes, NaN/inf reporting, and user errors as one line (exit code 2).

No command may delete or overwrite what it was not asked to replace: a folder where a file is meant, a
destination that is or holds the source, a folder of another kind, a half-written report.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from convert.state_dict_io import (
    atomic_output,
    check_destination,
    clean_stale_temporaries,
    read_state_dict,
    write_state_dict,
)
from convert.wan_dit import convert, read_dit_checkpoint
from qarvd_jax.cli import main as cli
from qarvd_jax.errors import NonFiniteError, OutputError, UserError
from qarvd_jax.models.wan.config import WanDiTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(fixtures_dir):
    return f"{fixtures_dir}/selfforcing_tiny/checkpoint.pt"


def _tree(path):
    """Every file under ``path`` with its bytes (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------ atomic_output
def test_a_folder_is_never_replaced_by_a_file(tmp_path):
    d = tmp_path / "keep"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a folder, but a file is written here"):
            with atomic_output(d, overwrite=overwrite) as tmp:
                open(tmp, "w").write("{}")
    assert _tree(d) == {"precious.txt": b"x"}
    assert os.listdir(tmp_path) == ["keep"]


def test_folders_are_replaced_only_by_the_same_kind(tmp_path):
    d = tmp_path / "user_dir"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an Orbax checkpoint"):
        with atomic_output(d, overwrite=True, kind="dir", replaceable=lambda p: False, what="an Orbax checkpoint"):
            pass
    assert _tree(d) == {"notes.txt": b"mine"}
    with atomic_output(d, overwrite=True, kind="dir", replaceable=lambda p: True, is_dir=True) as tmp:
        open(os.path.join(tmp, "new"), "w").write("n")
    assert _tree(d) == {"new": b"n"}
    f = tmp_path / "file"
    f.write_text("f")
    with pytest.raises(OutputError, match="is a file, but a folder is written here"):
        with atomic_output(f, overwrite=True, kind="dir", is_dir=True):
            pass
    assert f.read_text() == "f" and sorted(os.listdir(tmp_path)) == ["file", "user_dir"]


def test_destination_that_is_or_contains_the_source(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    src = d / "model.pt"
    src.write_bytes(b"weights")
    for dst in (d, src, tmp_path):
        with pytest.raises(OutputError, match="is or contains the source"):
            check_destination(dst, kind="dir" if dst != src else "file", overwrite=True, sources=[src])
    check_destination(d / "sub", kind="dir", sources=[src])  # inside the source's folder is fine
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(OutputError, match="is or contains the source"):
        check_destination(link, kind="dir", overwrite=True, sources=[src])


def test_a_failed_block_leaves_nothing_and_keeps_the_old_file(tmp_path):
    dst = tmp_path / "out.json"
    dst.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(dst, overwrite=True) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert dst.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def _owner(tmp_dir, base, pid, host=None):
    tmp_dir.mkdir()
    (tmp_dir / ".qarvd-owner").write_text(f"{host or socket.gethostname()}\t{pid}\t{base}")
    (tmp_dir / base).write_bytes(b"\0" * 1000)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_runs_are_cleaned_on_the_next_run(tmp_path):
    dead = _dead_pid()
    _owner(tmp_path / ".tmp-out.bin-dead1", "out.bin", dead)
    _owner(tmp_path / ".tmp-out.bin-live1", "out.bin", os.getpid())  # a run in progress: kept
    _owner(tmp_path / ".tmp-out.bin-other", "out.bin", dead, host="another-host")  # other host: kept
    _owner(tmp_path / ".tmp-out.bin-x-dead", "out.bin-x", dead)  # another destination: kept
    (tmp_path / ".tmp-out.bin-user").mkdir()  # no owner record: not ours, kept
    with atomic_output(tmp_path / "out.bin") as tmp:
        open(tmp, "wb").write(b"1")
    assert sorted(os.listdir(tmp_path)) == [".tmp-out.bin-live1", ".tmp-out.bin-other", ".tmp-out.bin-user",
                                            ".tmp-out.bin-x-dead", "out.bin"]
    assert clean_stale_temporaries(tmp_path / "out.bin-x") == [str(tmp_path / ".tmp-out.bin-x-dead")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_temporaries_are_removed_on_signals(tmp_path, sig):
    """qarvd turns SIGTERM into an exception, so atomic_output's cleanup runs; Ctrl-C likewise."""
    # SIGINT as in a terminal: a child of a pytest-xdist worker can inherit SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (the signal would be dropped and the test time out)
    code = (f"import signal, time\nfrom qarvd_jax.cli import _terminate\n"
            f"from convert.state_dict_io import atomic_output\nsignal.signal(signal.SIGTERM, _terminate)\n"
            f"signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"with atomic_output({str(tmp_path / 'big.bin')!r}) as tmp:\n"
            f"    open(tmp, 'wb').write(b'x' * 1000)\n    print('ready', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "ready"
    assert any(n.startswith(".tmp-big.bin-") for n in os.listdir(tmp_path))
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0 and os.listdir(tmp_path) == []


def test_sigkill_leftovers_are_cleaned_by_the_next_write(tmp_path):
    code = (f"import time\nfrom convert.state_dict_io import atomic_output\n"
            f"with atomic_output({str(tmp_path / 'big.bin')!r}) as tmp:\n"
            f"    open(tmp, 'wb').write(b'x' * 1000)\n    print('ready', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait(timeout=30)
    assert len(os.listdir(tmp_path)) == 1
    with atomic_output(tmp_path / "big.bin") as tmp:
        open(tmp, "wb").write(b"y")
    assert os.listdir(tmp_path) == ["big.bin"]


# ------------------------------------------------------------------------------------ convert
def test_convert_into_the_folder_holding_the_source_is_refused(tmp_path, ckpt, capsys):
    d = tmp_path / "DIR"
    d.mkdir()
    src = d / "model.pt"
    src.write_bytes(open(ckpt, "rb").read())
    before = _tree(d)
    assert cli(["convert", str(src), str(d), "--overwrite", "--preset", "tiny"]) == 2
    _one_line_error(capsys, "is or contains the source")
    assert cli(["convert", str(src), str(src), "--overwrite", "--preset", "tiny"]) == 2
    _one_line_error(capsys, "is or contains the source")
    assert _tree(d) == before


def test_convert_never_replaces_a_foreign_folder_or_a_folder_with_a_file(tmp_path, ckpt, capsys):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"meow")
    assert cli(["convert", ckpt, str(user), "--overwrite", "--preset", "tiny"]) == 2
    _one_line_error(capsys, "not an Orbax checkpoint")
    orb = tmp_path / "orb"
    assert cli(["convert", ckpt, str(orb), "--preset", "tiny", "--no-progress"]) == 0
    folder_named_like_a_file = tmp_path / "w.safetensors"
    folder_named_like_a_file.mkdir()
    (folder_named_like_a_file / "x").write_text("x")
    assert cli(["convert", str(orb), str(folder_named_like_a_file), "--overwrite"]) == 2
    _one_line_error(capsys, "is a folder, but a file is written here")
    assert _tree(user) == {"cat.jpg": b"meow"} and _tree(folder_named_like_a_file) == {"x": b"x"}
    capsys.readouterr()
    assert cli(["convert", ckpt, str(orb), "--preset", "tiny", "--overwrite", "--no-progress"]) == 0  # same kind


def test_convert_flag_errors(tmp_path, ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["convert", ckpt, str(tmp_path / "o"), "--num-heads", "-4"])
    assert e.value.code == 2 and "--num-heads: expected an integer >= 1, got -4" in capsys.readouterr().err
    assert cli(["convert", ckpt, str(tmp_path / "o"), "--prefer", "generator_emma"]) == 2
    _one_line_error(capsys, "--prefer generator_emma: no such state dict", "generator_ema")
    assert cli(["convert", ckpt, str(tmp_path / "o"), "--config", str(tmp_path)]) == 2
    _one_line_error(capsys, "--config", "not a file")
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    assert cli(["convert", ckpt, str(tmp_path / "o"), "--config", str(bad)]) == 2
    _one_line_error(capsys, "not valid JSON")
    assert not (tmp_path / "o").exists()


def _nan_checkpoint(tmp_path, ckpt):
    state, _ = read_dit_checkpoint(ckpt)
    state = {k: np.array(v) for k, v in state.items()}
    state["blocks.1.ffn.0.weight"][0, :3] = np.nan
    state["head.head.bias"][2] = np.inf
    return write_state_dict(state, tmp_path / "nan.safetensors")


def test_convert_reports_and_refuses_nonfinite_weights(tmp_path, ckpt, capsys, caplog):
    src = _nan_checkpoint(tmp_path, ckpt)
    with pytest.raises(NonFiniteError, match=r"2 tensor\(s\) hold non-finite values: .*blocks.1.ffn.0.weight "
                                             r"\(3 NaN, 0 inf\).*head.head.bias \(0 NaN, 1 inf\)"):
        convert(src, tmp_path / "orb", config=WanDiTConfig.tiny())
    assert cli(["convert", src, str(tmp_path / "orb"), "--preset", "tiny", "--no-progress"]) == 2
    _one_line_error(capsys, "blocks.1.ffn.0.weight (3 NaN, 0 inf)", "--allow-nonfinite")
    assert not (tmp_path / "orb").exists()
    assert cli(["convert", src, str(tmp_path / "orb"), "--preset", "tiny", "--allow-nonfinite", "--no-progress"]) == 0
    assert "blocks.1.ffn.0.weight (3 NaN, 0 inf)" in caplog.text
    back = tmp_path / "back.safetensors"
    assert cli(["convert", str(tmp_path / "orb"), str(back), "--no-progress"]) == 2  # the Orbax side too
    _one_line_error(capsys, "head.head.bias (0 NaN, 1 inf)")
    assert cli(["convert", str(tmp_path / "orb"), str(back), "--allow-nonfinite", "--no-progress"]) == 0
    assert np.isinf(read_state_dict(back)["head.head.bias"][2])


def test_convert_progress_bar(tmp_path, ckpt, capsys):
    assert cli(["convert", ckpt, str(tmp_path / "orb"), "--preset", "tiny"]) == 0
    assert "convert: 100%" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "orb"), str(tmp_path / "w.safetensors")]) == 0
    assert "write: 100%" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ outliers
def test_outliers_never_writes_over_folders_or_the_checkpoint(tmp_path, ckpt, capsys):
    some_dir = tmp_path / "SOME_DIR"
    some_dir.mkdir()
    (some_dir / "keep").write_text("k")
    copy = tmp_path / "ckpt.pt"
    copy.write_bytes(open(ckpt, "rb").read())
    before = copy.read_bytes()
    for args, needle in ((["--json", str(some_dir)], "is a folder"), (["--json", str(copy)], "the source"),
                         (["--json", str(copy), "--overwrite"], "the source"),
                         (["--json", str(tmp_path / "a.json"), "--plot", str(some_dir), "--overwrite"], "is a folder")):
        assert cli(["outliers", str(copy), *args]) == 2
        _one_line_error(capsys, needle)
    assert copy.read_bytes() == before and _tree(some_dir) == {"keep": b"k"}
    out = tmp_path / "o.json"
    assert cli(["outliers", str(copy), "--json", str(out), "--align", "8"]) == 0
    assert "outliers: 100%" in capsys.readouterr().err
    first = out.read_text()
    out.write_text("edited")
    assert cli(["outliers", str(copy), "--json", str(out)]) == 2
    _one_line_error(capsys, "already exists")
    assert out.read_text() == "edited"
    assert cli(["outliers", str(copy), "--json", str(out), "--align", "8", "--overwrite"]) == 0
    assert out.read_text() == first


def test_outliers_reports_and_refuses_nonfinite_weights(tmp_path, ckpt, capsys):
    src = _nan_checkpoint(tmp_path, ckpt)
    assert cli(["outliers", src, "--json", str(tmp_path / "o.json"), "--no-progress"]) == 2
    _one_line_error(capsys, "blocks.1.ffn.0 (3 NaN, 0 inf)", "--allow-nonfinite")
    assert not (tmp_path / "o.json").exists()
    assert cli(["outliers", src, "--json", str(tmp_path / "o.json"), "--no-progress", "--allow-nonfinite"]) == 0
    with pytest.raises(SystemExit):
        cli(["outliers", src, "--json", str(tmp_path / "o2.json"), "--align", "-1"])


# ------------------------------------------------------------------------------------ export
def _fake_run(tmp_path):
    run = tmp_path / "RUN"
    for sub in ("quantized/quant", "quantized/params", "quantized/metadata"):
        (run / sub).mkdir(parents=True)
    (run / "quantized" / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "quantize.json").write_text("{}")
    return run


def test_export_never_deletes_the_run_or_a_foreign_folder(tmp_path, capsys):
    run = _fake_run(tmp_path)
    before = _tree(run)
    assert cli(["export", str(run), str(run), "--overwrite"]) == 2
    _one_line_error(capsys, "is or contains the source")
    assert cli(["export", str(run / "quantized"), str(run), "--overwrite"]) == 2
    _one_line_error(capsys, "is or contains the source")
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "videos").mkdir()
    assert cli(["export", str(run), str(other), "--overwrite"]) == 2
    _one_line_error(capsys, "not an integer export")
    assert _tree(run) == before and os.path.isdir(other / "videos")


def test_export_reports_and_refuses_nonfinite_weights(tmp_path, monkeypatch, capsys):
    from flax import nnx

    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.quant import checkpoint as qckpt
    from qarvd_jax.quant.integer.export import export_checkpoint, export_model
    from qarvd_jax.quant.qlinear import quantize_model, set_quant_flags
    from qarvd_jax.quant.recipe import QuantRule

    model = CausalWanModel(WanDiTConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
    quantize_model(model, (QuantRule("blocks.*", w_bits=8, a_bits=8),))
    set_quant_flags(model, weights=True, acts=True)
    model.blocks[0].ffn.layers[0].kernel[...] = model.blocks[0].ffn.layers[0].kernel[...].at[0, 0].set(np.nan)
    monkeypatch.setattr(qckpt, "load_quantized_model", lambda path, dtype=None: (model, {}))
    run = _fake_run(tmp_path)
    with pytest.raises(NonFiniteError, match=r"blocks.0.ffn.0.kernel \(1 NaN, 0 inf\)"):
        export_checkpoint(run, tmp_path / "int")
    assert not (tmp_path / "int").exists()
    capsys.readouterr()
    export_model(model, progress=True)  # what export_checkpoint runs after the check (allowed: no raise)
    assert "export: 100%" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ evaluate
def _gen_folder(root, name, latents):
    d = root / name / "latents"
    d.mkdir(parents=True)
    np.savez(d / "a-0.npz", latents=latents, chunk_frames=3)
    return root / name


def test_evaluate_writes_reports_atomically(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((6, 4, 2, 2)).astype(np.float32)
    ref = _gen_folder(tmp_path, "ref", lat)
    test = _gen_folder(tmp_path, "test", lat + 0.01)
    out = tmp_path / "report"
    assert cli(["evaluate", "--ref", str(ref), "--test", str(test), "--out", str(out), "--no-progress"]) == 0
    good = _tree(out)
    assert set(good) == {"report.json", "report.md", "error_per_chunk.png", "psnr_ssim_per_frame.png"}
    bad_lat = lat.copy()
    bad_lat[0, 0, 0, 0] = np.nan
    bad = _gen_folder(tmp_path, "bad", bad_lat)
    assert cli(["evaluate", "--ref", str(ref), "--test", str(bad), "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "a-0.npz", "1 NaN/inf")
    assert _tree(out) == good  # the previous report, whole, and no temporary folder
    json.loads((out / "report.json").read_text())


def test_evaluate_out_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from qarvd_jax.eval import report

    monkeypatch.setattr(report, "pair_folder", lambda *a: pytest.fail("evaluate started working"))
    f = tmp_path / "report.txt"
    f.write_text("mine")
    (tmp_path / "ref").mkdir()
    assert cli(["evaluate", "--ref", str(tmp_path / "ref"), "--test", str(tmp_path / "ref"), "--out", str(f)]) == 2
    _one_line_error(capsys, "is a file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("command", ["sensitivity", "quantize", "generate", "demo"])
def test_out_pointing_at_a_file_is_a_one_line_error(tmp_path, capsys, command):
    f = tmp_path / "out"
    f.write_text("mine")
    (tmp_path / "p.txt").write_text("a fox\n")
    extra = ["--prompts", str(tmp_path / "p.txt")] if command == "generate" else []
    assert cli([command, "--out", str(f), *extra]) == 2
    _one_line_error(capsys, f"--out {f}", "is a file")
    assert f.read_text() == "mine"


# ------------------------------------------------------------------------------------ generate --skip-existing
def test_skip_existing_reuses_only_videos_made_with_the_same_settings(tmp_path, monkeypatch):
    from qarvd_jax.pipeline.text_to_video import GenerateConfig, build_text_to_video

    t2v, cfg = build_text_to_video(GenerateConfig(), str(tmp_path))
    calls = []

    def fake_generate(embeds, seed, shape):
        calls.append(seed)
        return np.full((6, 16, 2, 2), seed, np.float32), np.zeros((9, 32, 32, 3), np.uint8)

    monkeypatch.setattr(t2v, "generate_one", fake_generate)
    run = dict(num_frames=6, height=32, width=32, skip_existing=True)
    out = str(tmp_path / "gen")
    t2v.run(["a fox"], out, seed=0, **run)
    t2v.run(["a fox"], out, seed=0, **run)
    assert calls == [0]  # same settings: reused
    t2v.run(["a fox"], out, seed=5, **run)
    assert calls == [0, 5]  # another seed: regenerated
    t2v.run(["a fox"], out, seed=5, **run, settings={"checkpoint": "other.pt"})
    assert calls == [0, 5, 5]  # another model: regenerated
    lat = os.path.join(out, "latents", "a fox-0.npz")
    np.savez(lat, latents=np.zeros((6, 16, 2, 2), np.float32), chunk_frames=3)  # no recorded settings
    t2v.run(["a fox"], out, seed=5, **run, settings={"checkpoint": "other.pt"})
    assert calls == [0, 5, 5, 5]


# ------------------------------------------------------------------------------------ user errors
def test_config_errors_are_one_line_naming_the_field_or_file(tmp_path, capsys):
    out = ["--out", str(tmp_path / "q")]
    assert cli(["quantize", *out, "w_bits=four"]) == 2
    _one_line_error(capsys, "w_bits", "expected an int, got 'four'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("w_bits: [8,\n")
    assert cli(["quantize", *out, "--config", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "not valid YAML", "line")
    typed = tmp_path / "typed.yaml"
    typed.write_text("w_bits: four\n")
    assert cli(["quantize", *out, "--config", str(typed)]) == 2
    _one_line_error(capsys, f"{typed} field w_bits", "expected an int")
    assert cli(["quantize", *out, "--config", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder; give a YAML file")
    assert cli(["sensitivity", *out, "w_bits=[1,"]) == 2
    _one_line_error(capsys, "w_bits=[1,", "not valid YAML")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv", [["quantize", "--calib-prompts", "-1"], ["sensitivity", "--num-prompts", "0"],
                                  ["demo", "--num-prompts", "0"], ["evaluate", "--frame-batch", "0"]])
def test_negative_and_zero_counts_are_usage_errors(tmp_path, capsys, argv):
    args = [*argv, "--out", str(tmp_path / "o")] + (["--ref", "r", "--test", "t"] if argv[0] == "evaluate" else [])
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2 and f"argument {argv[1]}: expected an integer >= 1" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="w_bits"):
        cli(["--debug", "quantize", "--out", str(tmp_path / "q"), "w_bits=four"])
    env = {**os.environ, "QARVD_DEBUG": "0"}
    res = subprocess.run([sys.executable, "-m", "qarvd_jax.cli", "--debug", "convert", str(tmp_path / "none.pt"),
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr
    time.sleep(0)


def test_orbax_outputs_replace_only_orbax_checkpoints(tmp_path):
    """What `quantize` (OUT/quantized), `convert` and `export` write through: never over a user folder."""
    from qarvd_jax.utils.orbax_io import save_trees

    user = tmp_path / "quantized"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an Orbax checkpoint"):
        save_trees(user, {"params": {"a": np.ones(2)}}, {"format": "t"}, overwrite=True)
    assert _tree(user) == {"notes.txt": b"mine"}
    ckpt = tmp_path / "ckpt"
    save_trees(ckpt, {"params": {"a": np.ones(2)}}, {"format": "t"})
    save_trees(ckpt, {"params": {"a": np.zeros(2)}}, {"format": "t2"}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "quantized"]
