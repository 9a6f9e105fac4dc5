"""``qarvd convert SRC DST``: PyTorch (.pt/.pth/.safetensors) <-> Orbax DiT checkpoints."""

from __future__ import annotations

import json
import os

from qarvd_jax.cli._types import positive_int


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a DiT checkpoint between PyTorch and Orbax formats",
                       description="Direction from the file types: a .pt/.pth/.safetensors SRC and a DST folder "
                       "-> Orbax; an Orbax SRC folder and a .safetensors/.pt DST -> PyTorch layout (original key "
                       "names, shapes and dtypes). Reads torch files without torch.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--preset", choices=["tiny", "selfforcing_1_3b"], help="model config (default: inferred "
                   "from tensor shapes, with head_dim 128)")
    p.add_argument("--config", help="model config JSON (WanDiTConfig fields, or a fixture config.json)")
    p.add_argument("--num-heads", type=positive_int, help="attention heads when inferring the config")
    p.add_argument("--prefer", help="top-level entry of a .pt dict (default generator_ema, then generator); "
                   "must exist in the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST of the same kind (an Orbax "
                   "folder or a checkpoint file; never a folder of something else, never SRC or a folder holding it)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert even if tensors hold NaN/inf (they are "
                   "reported either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config(args):
    from qarvd_jax.models.wan.config import PRESETS, WanDiTConfig

    if args.config:
        from qarvd_jax.errors import ConfigError

        if not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config}: not a file (give a model config JSON)")
        try:
            with open(args.config, encoding="utf-8") as fh:
                d = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {args.config}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--config {args.config}: expected a JSON object of WanDiTConfig fields")
        try:
            return WanDiTConfig.from_fixture_json(d) if "model" in d else WanDiTConfig.from_dict(d)
        except (TypeError, KeyError) as e:
            raise ConfigError(f"--config {args.config}: not a model config ({type(e).__name__}: {e})") from None
    if args.preset:
        return PRESETS[args.preset]()
    return None


def run(args) -> int:
    from convert.wan_dit import convert

    cfg = _config(args)
    if cfg is not None and args.num_heads:
        raise ValueError("--num-heads only applies when the config is inferred (not with --preset/--config)")
    out = convert(args.src, args.dst, config=cfg, overwrite=args.overwrite, prefer=args.prefer,
                  allow_nonfinite=args.allow_nonfinite, progress=not args.no_progress, num_heads=args.num_heads)
    print(f"wrote {out}")
    return 0
