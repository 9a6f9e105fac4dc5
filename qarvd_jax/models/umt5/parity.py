"""Parity check of the NNX umT5 encoder against a golden fixture folder (``kind == 'umt5_encoder'``).

The folder holds ``config.json`` (``tiny_model_cfg``, ``text_len``, ``suggested_tolerance``),
``weights.pth`` (original key layout) and ``arrays.npz`` (``ids``, ``mask``, ``hidden_states``,
``prompt_embeds``, ``block_outputs``, ``rel_pos``, ``rel_bucket``); see
``tests/fixtures/umt5_tiny/README.md``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from qarvd_jax.models.umt5.config import UMT5Config
from qarvd_jax.models.umt5.model import encoder_forward, encode_prompts, relative_position_bucket
from qarvd_jax.models.umt5.params import load_umt5
from qarvd_jax.utils.parity import ArrayReport, compare

__all__ = ["load_fixture_config", "verify_fixture"]

_DEFAULT_ATOL = 3.37e-4


def load_fixture_config(fixture_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``config.json`` of a umT5 fixture folder."""
    path = os.path.join(os.fspath(fixture_dir), "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("kind") != "umt5_encoder":
        raise ValueError(f"{path}: kind is {cfg.get('kind')!r}, expected 'umt5_encoder'")
    if "tiny_model_cfg" not in cfg:
        raise ValueError(f"{path}: no 'tiny_model_cfg'")
    return cfg


def verify_fixture(fixture_dir: str | os.PathLike, *, param_dtype: Any = np.float32, compute_dtype: Any = np.float32,
                   atol: float | None = None, rtol: float = 0.0) -> list[ArrayReport]:
    """Run the NNX encoder on a fixture and compare every golden array.

    Reports, in order:

    * ``rel_bucket``: the bucket function on ``rel_pos``, exact (atol 0);
    * ``block_outputs`` ``[n_layers, B, L, D]``: every block's output, all positions;
    * ``hidden_states``: final output at real-token positions (``mask > 0``), flattened ``[N, D]``;
    * ``hidden_states_all``: final output at all positions (padded queries are computed normally);
    * ``prompt_embeds``: ``WanTextEncoder`` output (rows ``>= seq_len`` zeroed), all positions.

    Tolerance: ``atol`` (default: ``suggested_tolerance.hidden_states_atol_real_tokens`` of the
    config, 100x the reference's float32-vs-float64 error) plus ``rtol * max|ref|``. Only
    meaningful with float32 compute; bf16 compute differs by ~5e-2.
    """
    fixture_dir = os.fspath(fixture_dir)
    cfg = load_fixture_config(fixture_dir)
    text_len = int(cfg.get("text_len", 512))
    config = UMT5Config.from_original(cfg["tiny_model_cfg"], text_len=text_len, param_dtype=param_dtype,
                                      compute_dtype=compute_dtype)
    if atol is None:
        atol = float(cfg.get("suggested_tolerance", {}).get("hidden_states_atol_real_tokens", _DEFAULT_ATOL))
    with np.load(os.path.join(fixture_dir, "arrays.npz"), allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}

    reports = []
    buckets = relative_position_bucket(a["rel_pos"], num_buckets=config.num_buckets,
                                       max_distance=config.max_distance, bidirectional=True)
    reports.append(compare("rel_bucket", np.asarray(buckets), a["rel_bucket"], atol=0.0, rtol=0.0, note="exact"))

    model = load_umt5(os.path.join(fixture_dir, "weights.pth"), config)
    ids, mask = a["ids"].astype(np.int32), a["mask"].astype(np.int32)
    hidden, blocks = encoder_forward(model, jnp.asarray(ids), jnp.asarray(mask), True)
    hidden = np.asarray(hidden.astype(jnp.float32))
    real = mask > 0
    reports.append(compare("block_outputs", np.asarray(blocks.astype(jnp.float32)), a["block_outputs"],
                           atol=atol, rtol=rtol, note="all positions"))
    reports.append(compare("hidden_states", hidden[real], a["hidden_states"][real], atol=atol, rtol=rtol,
                           note="real tokens"))
    reports.append(compare("hidden_states_all", hidden, a["hidden_states"], atol=atol, rtol=rtol,
                           note="all positions"))
    embeds = np.asarray(encode_prompts(model, ids, mask).astype(jnp.float32))
    reports.append(compare("prompt_embeds", embeds, a["prompt_embeds"], atol=atol, rtol=rtol, note="all positions"))
    return reports
