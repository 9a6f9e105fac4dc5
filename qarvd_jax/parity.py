"""Golden-fixture verification: detect the fixture kind from ``config.json`` and run its checks.

Kinds: the causal DiT (``config.json`` with ``model`` + ``checkpoint`` sections, files
``checkpoint.pt``/``forward.npz``/``kv_inference.npz``), the Wan VAE (``kind: wan2.1_vae``) and the
umT5 encoder (``kind: umt5_encoder``).
"""

from __future__ import annotations

import json
import os

from qarvd_jax.utils.parity import ArrayReport

__all__ = ["detect_kind", "verify"]


def detect_kind(fixture_dir: str) -> str:
    """'dit' | 'vae' | 'umt5', from the folder's config.json; ValueError if unrecognised."""
    path = os.path.join(fixture_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fixture_dir}: no config.json (not a fixture folder)")
    with open(path) as fh:
        cfg = json.load(fh)
    kind = str(cfg.get("kind", "")).lower()
    if "vae" in kind:
        return "vae"
    if "t5" in kind:
        return "umt5"
    if "model" in cfg and ("checkpoint" in cfg or os.path.exists(os.path.join(fixture_dir, "checkpoint.pt"))):
        return "dit"
    raise ValueError(f"{path}: cannot tell the fixture kind (no 'kind' field and no DiT model/checkpoint section)")


def verify(fixture_dir: str) -> tuple[str, list[ArrayReport]]:
    """Run the checks of the fixture's kind; returns ``(kind, reports)``."""
    kind = detect_kind(fixture_dir)
    if kind == "dit":
        from qarvd_jax.models.wan.parity import verify_fixture
    elif kind == "vae":
        from qarvd_jax.models.wan_vae.parity import verify_fixture
    else:
        from qarvd_jax.models.umt5.parity import verify_fixture
    return kind, verify_fixture(fixture_dir)
