"""Quantized checkpoints and integer exports at a URL (``gs://``), without network: written by upload +
commit marker (written last), read back from the URL, and an upload cut short refused by name.

The fake bucket is :func:`test_qat_urls.fake_gcs` (every ``etils.epath`` backend call and Orbax's GCS
kvstore mapped onto a local folder; objects cannot be appended to, as on GCS).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qarvd_jax.cli import main as cli
from qarvd_jax.errors import OutputError
from qarvd_jax.pipeline.text_to_video import GenerateConfig
from qarvd_jax.quant import methods
from qarvd_jax.quant.checkpoint import load_quantized_model, save_quantized
from qarvd_jax.quant.integer import export_checkpoint, load_export
from qarvd_jax.quant.integer.export import resolve_quantized_checkpoint
from qarvd_jax.utils import epaths
from qarvd_jax.utils.orbax_io import COMMIT_MARKER
from qarvd_jax.workflow import build_stack, quantize_copy
from test_qat_urls import fake_gcs


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("url_ckpt")
    stack = build_stack(GenerateConfig(num_frames=6, height=32, width=32), str(d))
    model, _ = quantize_copy(stack, "rtn", methods.get("rtn").Config(w_bits=8, a_bits=8), ["a fox"], seed=0)
    return model


def _params(model):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


def test_quantized_checkpoint_and_export_round_trip_through_a_bucket(quantized, tmp_path, monkeypatch):
    bucket, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(bucket):
        save_quantized("gs://b/run/quantized", quantized, metadata={"note": "url"})
        assert (bucket / "b" / "run" / "quantized" / COMMIT_MARKER).is_file()
        assert resolve_quantized_checkpoint("gs://b/run") == "gs://b/run/quantized"  # the run folder works too
        loaded, meta = load_quantized_model("gs://b/run/quantized")
        assert meta["note"] == "url"
        want, got = _params(quantized), _params(loaded)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        export_checkpoint("gs://b/run/quantized", "gs://b/run/int8")  # read from and written to the bucket
        trees, int_meta = load_export("gs://b/run/int8")
        assert int_meta["layers"] and (bucket / "b" / "run" / "int8" / COMMIT_MARKER).is_file()
        assert any(np.asarray(v).dtype == np.int8 for v in jax.tree.leaves(trees["int"]))
        with pytest.raises(OutputError, match="exists"):
            save_quantized("gs://b/run/quantized", quantized)
        save_quantized("gs://b/run/quantized", quantized, overwrite=True)  # replaced, committed again
        load_quantized_model("gs://b/run/quantized")
    assert list(cwd.iterdir()) == []  # never a local ./gs: folder


def test_an_interrupted_upload_is_refused_and_a_replacement_drops_the_old_marker(quantized, tmp_path, monkeypatch):
    """The copy dies after the first file: no commit marker, and reading names the problem. A replacement
    that dies midway leaves neither the old nor a half-new checkpoint readable."""
    bucket = tmp_path / "store"
    real_copy = epaths.copy_tree

    def dies_midway(src, dst, chunk=16 << 20):
        real_copy(os.path.join(src, "metadata"), dst / "metadata", chunk)  # one item up, then the crash
        raise KeyboardInterrupt("preempted")

    with fake_gcs(bucket):
        monkeypatch.setattr(epaths, "copy_tree", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            save_quantized("gs://b/cut", quantized)
        assert (bucket / "b" / "cut" / "metadata").is_dir() and not (bucket / "b" / "cut" / COMMIT_MARKER).exists()
        with pytest.raises(ValueError, match=f"incomplete upload.*{COMMIT_MARKER}"):
            load_quantized_model("gs://b/cut", dtype="float32")
        monkeypatch.setattr(epaths, "copy_tree", real_copy)
        save_quantized("gs://b/ok", quantized)
        monkeypatch.setattr(epaths, "copy_tree", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            save_quantized("gs://b/ok", quantized, overwrite=True)
        with pytest.raises(ValueError, match="incomplete upload"):
            load_quantized_model("gs://b/ok")


def test_generate_reads_a_quantized_checkpoint_from_a_url(quantized, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    geom = ["--num-frames", "6", "--height", "32", "--width", "32"]
    with fake_gcs(tmp_path / "store"):
        save_quantized("gs://b/q", quantized)
        assert cli(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "g"), "--quantized", "gs://b/q",
                    *geom]) == 0
    lat = np.load(tmp_path / "g" / "latents" / "a fox-0.npz")["latents"]
    assert np.all(np.isfinite(lat)) and float(jnp.std(lat)) > 0
