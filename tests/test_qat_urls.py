"""QAT outputs at a URL (``--out gs://bucket/run``) through ``etils.epath``, without network.

The fake bucket (:func:`fake_gcs`) maps ``gs://bucket/...`` to a temporary local folder at the two places
where I/O leaves Python: every ``etils.epath`` backend function (``epath.testing.mock_epath``) and the
TensorStore kvstore spec Orbax builds for GCS (``gcs_utils.get_kvstore_for_gcs`` -> the ``file`` driver).
Everything else runs Orbax's real GCS code path (``commit_success.txt`` commits, no renames). Like GCS,
the fake bucket cannot append to an object. Bucket-namespace queries (``google.cloud.storage``) answer
"flat namespace".
"""

from __future__ import annotations

import contextlib
import json
import os
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from qarvd_jax.train import qat as qat_mod
from qarvd_jax.train.sharding import make_mesh
from qarvd_jax.train.state import QATCheckpointer
from qarvd_jax.utils.epaths import check_url_backend, out_path
from qarvd_jax.workflow import DEMO_PROMPTS
from test_qat import JIT_CACHE, MESH, cfg, sensitivity, stack  # noqa: F401  (fixtures and the shared step)


@contextlib.contextmanager
def fake_gcs(root):
    """``gs://`` backed by the local folder ``root`` (``gs://b/x`` -> ``root/b/x``)."""
    from orbax.checkpoint._src.path import gcs_utils

    root = os.fspath(root)

    def local(p):
        s = os.fspath(p)
        return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s

    def one(orig, p, *a, **k):
        return orig(local(p), *a, **k)

    def two(orig, p, dst, *a, **k):
        return orig(local(p), local(dst), *a, **k)

    def open_(orig, p, mode="r", *a, **k):
        if os.fspath(p).startswith("gs://") and "a" in mode:
            raise OSError(f"{p}: objects cannot be appended to")
        return orig(local(p), mode, *a, **k)

    def walk(orig, top, **k):
        yield from orig(local(top), **k)

    def glob(orig, p):
        s, found = os.fspath(p), orig(local(p))
        return ["gs://" + os.path.relpath(f, root) for f in found] if s.startswith("gs://") else found

    fns = {n: one for n in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")}
    fns.update(open=open_, copy=two, rename=two, replace=two, walk=walk, glob=glob)
    with epath_testing.mock_epath(**fns), \
            mock.patch.object(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": local(p)}), \
            mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False):
        yield


def test_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(out_path("gs://b/run/x")) == "gs://b/run/x"
    assert os.fspath(out_path("rel/run")) == os.path.join(str(tmp_path), "rel", "run")
    assert os.fspath(QATCheckpointer("rel/ck", async_save=False).directory) == str(tmp_path / "rel" / "ck")
    with pytest.raises(ValueError, match=r"memory:// is not supported.*gs://"):
        out_path("memory://b/x")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # this machine has no gs:// client: a clear error, before any heavy work
        with pytest.raises(ValueError, match="gcsfs"):
            check_url_backend(out_path("gs://b/x"))
    assert not any(p.name.startswith(("gs:", "memory:")) for p in tmp_path.rglob("*"))


def test_unsupported_url_fails_before_calibration(stack, cfg, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qat_mod, "calibrate_student", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ValueError, match="ftp:// is not supported"):
        qat_mod.run_qat(stack, cfg.replace(steps=1), DEMO_PROMPTS, out_dir="ftp://host/run", mesh=make_mesh(MESH))
    assert list(tmp_path.iterdir()) == []


def test_qat_run_folder_at_a_url(stack, cfg, sensitivity, tmp_path, monkeypatch):  # noqa: F811
    """2 steps into gs://bucket/run, then a resume to 3: checkpoints, log, plot, qat.json and quantized/ land
    in the bucket, the log continues across the resume, and no local ./gs: folder appears."""
    from qarvd_jax.quant.checkpoint import load_quantized_model

    cwd, bucket = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = bucket / "bucket" / "run"
    with fake_gcs(bucket):
        first = qat_mod.run_qat(stack, cfg.replace(steps=2), DEMO_PROMPTS, out_dir="gs://bucket/run",
                                sensitivity=sensitivity, mesh=make_mesh(MESH), jit_cache=JIT_CACHE)
        assert first.quantized == "gs://bucket/run/quantized" and first.resumed_from is None
        assert (run / "checkpoints" / "2" / "commit_success.txt").is_file()  # Orbax's GCS commit, not a rename
        again = qat_mod.run_qat(stack, cfg.replace(steps=3), DEMO_PROMPTS, out_dir="gs://bucket/run",
                                sensitivity=sensitivity, mesh=make_mesh(MESH), jit_cache=JIT_CACHE)
        assert epath.Path("gs://bucket/run/qat.json").exists()
    assert again.resumed_from == 2 and again.step == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in first.history]
    assert (run / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "qat.json").read_text())["steps"] == 3
    model, meta = load_quantized_model(str(run / "quantized"))  # the exported checkpoint is complete
    assert meta["method"] == "qat" and meta["steps"] == 3
    assert np.all(np.isfinite(np.asarray(model.blocks[0].ffn.layers[0].w_scale[...])))
    assert list(cwd.iterdir()) == []  # nothing local: no ./gs:/bucket/run
