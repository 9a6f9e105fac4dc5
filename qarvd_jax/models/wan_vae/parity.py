"""Check :class:`WanVAE` against a golden fixture folder in the ``wan_vae_tiny`` format.

A fixture folder holds ``config.json`` (``"kind": "wan2.1_vae"``, the model cfg, latent statistics,
stream chunking, suggested tolerances), ``weights.pth`` (original state dict), ``arrays.npz``
(end-to-end inputs/outputs, ``B,C,T,H,W`` unless noted) and optionally ``units.npz`` (per-submodule
goldens keyed ``kind__module.path__role``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan_vae.config import WanVAEConfig
from qarvd_jax.models.wan_vae.layers import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMSNorm
from qarvd_jax.models.wan_vae.model import WanVAE, decode_chunk_jit, decode_chunks
from qarvd_jax.models.wan_vae.params import load_wan_vae, torch_modules
from qarvd_jax.utils.parity import ArrayReport, compare

__all__ = ["config_from_fixture", "parse_unit_role", "run_unit", "verify_fixture"]

FIXTURE_KIND = "wan2.1_vae"
DEFAULT_TOLERANCE = {"decoded_atol": 3e-4, "encoded_latent_atol": 8e-5, "units_atol": 1e-5}
INPUT_ARRAYS = ("latent", "video")

_UNIT_TYPES: dict[str, tuple[type, str | None]] = {
    "causalconv3d": (CausalConv3d, None),
    "rmsnorm": (RMSNorm, None),
    "attention": (AttentionBlock, None),
    "resblock": (ResidualBlock, None),
    **{mode: (Resample, mode) for mode in ("upsample2d", "upsample3d", "downsample2d", "downsample3d")},
}


def config_from_fixture(meta: Mapping[str, Any], **overrides) -> WanVAEConfig:
    """The :class:`WanVAEConfig` described by a fixture's ``config.json`` (``model_cfg`` or
    ``*_model_cfg``, plus ``latent_scale_convention.latent_mean/std`` when present)."""
    if meta.get("kind") != FIXTURE_KIND:
        raise ValueError(f"fixture kind is {meta.get('kind')!r}, expected {FIXTURE_KIND!r}")
    keys = [k for k in meta if k == "model_cfg" or k.endswith("_model_cfg")]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one model cfg entry ('model_cfg' or '*_model_cfg'), found {keys}")
    stats = meta.get("latent_scale_convention", {})
    extra = {k: tuple(stats[k]) for k in ("latent_mean", "latent_std") if k in stats}
    return WanVAEConfig.from_dict(meta[keys[0]], **{**extra, **overrides})


def parse_unit_role(role: str) -> int | list[int] | None | str:
    """How a unit output was produced: ``None`` = a bare call (no cache); an int = cached calls on
    chunks of that many frames; a list = cached calls on chunks of those sizes; ``"?"`` = unknown.

    ``out_chunked`` does not record its chunking; it is run one frame per call (a causal conv gives
    the same result for any chunking).
    """
    if role in ("out", "out_no_cache"):
        return None
    if role == "out_chunked":
        return 1
    if m := re.fullmatch(r"out_cached_chunks_of_(\d+)", role):
        return int(m.group(1))
    if m := re.fullmatch(r"out_cached_(\d+)_frames?_per_call", role):
        return int(m.group(1))
    if m := re.fullmatch(r"out_cached_chunks_(\d+(?:_\d+)*)", role):
        return [int(s) for s in m.group(1).split("_")]
    return "?"


def _chunk_sizes(spec: int | list[int], t: int) -> list[int]:
    if isinstance(spec, int):
        return [min(spec, t - s) for s in range(0, t, spec)]
    if sum(spec) != t:
        raise ValueError(f"chunk sizes {spec} do not add up to {t} frames")
    return list(spec)


def run_unit(module: Any, x_bcthw: np.ndarray, chunking: int | list[int] | None) -> np.ndarray:
    """Run one submodule on a ``B,C,T,H,W`` input like the original unit test: a bare call
    (``chunking=None``) or cached calls over time chunks sharing one fresh cache."""
    x = jnp.transpose(jnp.asarray(x_bcthw), (0, 2, 3, 4, 1))
    if not hasattr(module, "num_cache_slots"):  # RMSNorm: stateless, no cache protocol
        if chunking is not None:
            raise ValueError(f"{type(module).__name__} has no cached mode")
        y = module(x)
    elif chunking is None:
        y = module(x, None)[0]
    else:
        cache, outs, start = (None,) * module.num_cache_slots, [], 0
        for n in _chunk_sizes(chunking, x.shape[1]):
            out, cache = module(x[:, start:start + n], cache)
            outs.append(out)
            start += n
        y = jnp.concatenate(outs, axis=1)
    return np.asarray(jnp.transpose(y, (0, 4, 1, 2, 3)))


@nnx.jit
def _encode_moments_jit(model: WanVAE, video: jax.Array) -> jax.Array:
    return model.encode_moments(video)


def _skip(msg: str, strict: bool) -> None:
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


def _end_to_end(model: WanVAE, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                tol: Mapping[str, float], strict: bool) -> list[ArrayReport]:
    cfg = model.config
    dec_atol, enc_atol = tol["decoded_atol"], tol["encoded_latent_atol"]
    latent = jnp.asarray(arrays["latent"]) if "latent" in arrays else None
    video = jnp.asarray(arrays["video"]) if "video" in arrays else None
    chunks = None
    if latent is not None and "stream_chunks_latent_frames" in meta:
        sizes = _chunk_sizes(list(meta["stream_chunks_latent_frames"]), latent.shape[2])
        bounds = np.cumsum([0, *sizes])
        chunks = [latent[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    mean, std = cfg.latent_stats()
    memo: dict[str, Any] = {}

    def moments():  # encode once for encoded_latent and encoder_conv1_out (encode = normalise(moments))
        if "moments" not in memo:
            memo["moments"] = _encode_moments_jit(model, video)
        return memo["moments"]

    reports = []
    for name, want in arrays.items():
        if name in INPUT_ARRAYS:
            continue
        if name == "decoded" and latent is not None:
            got, atol, note = decode_chunk_jit(model, latent)[0], dec_atol, "decode (jit, one call)"
        elif name == "stream_decoded" and chunks is not None:
            got, atol = decode_chunks(model, chunks)[0], dec_atol
            note = f"decode_chunks {[c.shape[2] for c in chunks]}"
        elif name == "demo_stream_decoded" and chunks is not None:
            zero = model.zero_decode_cache(latent.shape[0], tuple(latent.shape[3:]))
            pixels = np.asarray(decode_chunks(model, chunks, zero)[0], np.float32)
            drop = cfg.time_stride - 1  # demo.py drops the extra frames of the first latent frame
            got = np.clip(pixels[:, :, drop:], -1, 1).transpose(0, 2, 1, 3, 4)
            atol, note = dec_atol, f"zero cache, first {drop} frames dropped, clamped, B,T,C,H,W"
        elif name == "encoded_latent" and video is not None:
            got, atol, note = model.normalise_latent(moments()), enc_atol, "encode"
        elif name == "encoder_conv1_out" and video is not None:
            got, atol, note = moments(), enc_atol, "encode_moments"
        elif name in ("latent_mean", "latent_std"):
            got, atol, note = (mean if name == "latent_mean" else std), 0.0, "config constants"
        else:
            _skip(f"arrays.npz: no rule to reproduce {name!r}", strict)
            continue
        reports.append(compare(name, np.asarray(got), want, atol=atol, rtol=0.0, note=note))
    return reports


def _units(model: WanVAE, units: Mapping[str, np.ndarray], atol: float, strict: bool) -> list[ArrayReport]:
    modules = torch_modules(model)
    reports = []
    for key in units:
        parts = key.split("__")
        if len(parts) != 3:
            _skip(f"units.npz: key {key!r} is not kind__module.path__role", strict)
            continue
        kind, path, role = parts
        if role == "in":
            continue
        chunking = parse_unit_role(role)
        input_key = f"{kind}__{path}__in"
        if kind not in _UNIT_TYPES or chunking == "?" or input_key not in units:
            _skip(f"units.npz: cannot interpret {key!r} (kind known: {kind in _UNIT_TYPES}, role "
                  f"known: {chunking != '?'}, input present: {input_key in units})", strict)
            continue
        cls, mode = _UNIT_TYPES[kind]
        module = modules.get(path)
        if not isinstance(module, cls) or (mode is not None and module.mode != mode):
            raise ValueError(f"units.npz: {key!r} names {path!r}, which is "
                             f"{type(module).__name__ if module is not None else 'not a module'}, "
                             f"not a {kind}")
        got = run_unit(module, units[input_key], chunking)
        note = "bare call" if chunking is None else f"cached, chunks {chunking}"
        reports.append(compare(key, got, units[key], atol=atol, rtol=0.0, note=note))
    return reports


def verify_fixture(fixture_dir: str | os.PathLike, *, strict: bool = False,
                   model: WanVAE | None = None) -> list[ArrayReport]:
    """Compare the port with every golden array of a ``wan2.1_vae`` fixture folder.

    Builds the model from the folder's ``config.json`` and ``weights.pth`` (or uses ``model``),
    reproduces ``decoded``, ``stream_decoded`` (the config's chunking), ``demo_stream_decoded``,
    ``encoded_latent``, ``encoder_conv1_out``, ``latent_mean``/``latent_std`` and every
    ``units.npz`` entry it can interpret, with the config's suggested tolerances (rtol 0). Entries it
    cannot interpret are skipped with a warning, or raise ValueError if ``strict``.
    """
    fixture_dir = os.fspath(fixture_dir)
    with open(os.path.join(fixture_dir, "config.json")) as f:
        meta = json.load(f)
    if model is None:
        weights = meta.get("weights", {}).get("file", "weights.pth")
        model = load_wan_vae(os.path.join(fixture_dir, weights), config_from_fixture(meta))
    tol = {**DEFAULT_TOLERANCE, **{k: v for k, v in meta.get("suggested_tolerance", {}).items()
                                   if k in DEFAULT_TOLERANCE}}
    with np.load(os.path.join(fixture_dir, "arrays.npz")) as arrays:
        reports = _end_to_end(model, dict(arrays), meta, tol, strict)
    units_path = os.path.join(fixture_dir, "units.npz")
    if os.path.exists(units_path):
        with np.load(units_path) as units:
            reports += _units(model, dict(units), tol["units_atol"], strict)
    return reports
