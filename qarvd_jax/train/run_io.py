"""The run folder of :func:`qarvd_jax.train.qat.run_qat`: ``train_log.jsonl`` (read / append), the loss plot
(``train_loss.png``), ``qat.json``, the checks that refuse an incompatible resume, and SIGTERM (preemption)
handling. Paths are local or URLs (``gs://...``), read and written through ``etils.epath``
(:mod:`qarvd_jax.utils.epaths`)."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from etils import epath

from qarvd_jax.train.config import QATConfig
from qarvd_jax.utils.epaths import is_url

__all__ = ["plot_losses"]

log = logging.getLogger("qarvd_jax.train.qat")

# fields whose change makes an existing checkpoint unusable (state structure or data order)
_RESUME_FIELDS = ("train_weights", "w_bits", "a_bits", "dual_scale", "outlier_method", "align",
                  "quantize_text_embedding", "batch_size", "seed", "clip_norm")


class _Preemption:
    """SIGTERM sets ``requested`` (the loop saves and stops) instead of killing the process."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.requested = True

    def restore(self):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _read_log(path, upto: int) -> list[dict]:
    path = epath.Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]


def _write_log(path, rows: list[dict], mode: str = "w") -> None:
    with epath.Path(path).open(mode) as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _append_log(path, row: dict, rows: list[dict]) -> None:
    """Add ``row`` (the last of ``rows``) to the log: appended locally; object stores (``gs://``...) cannot
    append, so there the whole log ``rows`` is rewritten."""
    if is_url(path):
        _write_log(path, rows)
    else:
        _write_log(path, [row], mode="a")


def write_run_json(path, obj) -> None:
    """``qat.json``: atomically (temp + rename) locally; one object write on a URL."""
    if is_url(path):
        epath.Path(path).write_text(json.dumps(obj, indent=2))
    else:
        from qarvd_jax.workflow import write_json

        write_json(os.fspath(path), obj)


def plot_losses(rows: list[dict], path: str, *, title: str = "QAT: quantized vs full-precision flows",
                rank_key: str | None = None) -> None:
    """Loss (log scale) against step as a PNG; with ``rank_key`` logged (QVGen's ``phi_rank``), that rank on a
    second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = rank_key is not None and bool(rows) and rank_key in rows[0]
    fig, ax = plt.subplots(figsize=(6.5 if rank else 6, 3.5), dpi=120)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="C0", marker="o" if len(rows) < 50 else None, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss", **({"color": "C0"} if rank else {}))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if rank:
        ax2 = ax.twinx()
        ax2.step(steps, [r[rank_key] for r in rows], where="post", color="C3", lw=1.2)
        ax2.set_ylabel("Φ rank (max over layers)", color="C3")
    ax.set_title(title)
    fig.tight_layout()
    with epath.Path(path).open("wb") as fh:  # local or URL
        fig.savefig(fh, format="png")
    plt.close(fig)


def _check_resume(meta: dict, cfg: QATConfig, directory: str, omega=None, method: dict | None = None) -> None:
    """Refuse a resume whose checkpoint ``meta`` was written by another process count, other chunk weights, a
    state-changing config field (:data:`_RESUME_FIELDS`) or another QAT method (``method``: the hooks'
    ``describe()``, None for Q-ARVD's QAT)."""
    if meta.get("method") != method:
        raise ValueError(f"{directory}: the checkpoint was trained with method {meta.get('method')}, this run "
                         f"with {method}; use another --out")
    if "process_count" in meta and meta["process_count"] != jax.process_count():
        raise ValueError(f"{directory}: the checkpoint was written by {meta['process_count']} processes, this run has "
                         f"{jax.process_count()}; the data order depends on the process count (each process "
                         f"permutes its own prompt slice), so resume with the same number of processes or use "
                         f"another --out")
    if "chunk_weights" in meta:
        new = None if omega is None else [float(v) for v in np.asarray(omega, np.float32)]
        old_w = meta["chunk_weights"]
        if (old_w is None) != (new is None) or (new is not None and (
                len(old_w) != len(new) or not np.allclose(old_w, new, rtol=1e-6, atol=0))):
            raise ValueError(f"{directory}: the checkpoint was trained with chunk weights {meta['chunk_weights']} "
                             f"(--sensitivity), this run has {new}; pass the original --sensitivity or use another --out")
    old = meta.get("config", {})
    for name in _RESUME_FIELDS:
        if name in old and old[name] != getattr(cfg, name):
            raise ValueError(f"{directory}: the checkpoint was written with {name}={old[name]!r}, this run has "
                             f"{name}={getattr(cfg, name)!r}; use another --out or the original setting")
    if meta.get("schedule_steps") not in (None, cfg.schedule_steps):
        log.warning("resuming with a different lr schedule length (%s -> %s); set lr_schedule_steps to keep it",
                    meta["schedule_steps"], cfg.schedule_steps)
