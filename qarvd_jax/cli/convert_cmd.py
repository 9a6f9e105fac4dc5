"""``qarvd convert SRC DST``: PyTorch (.pt/.pth/.safetensors) <-> Orbax DiT checkpoints."""

from __future__ import annotations

import json


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
    p.add_argument("--num-heads", type=int, help="attention heads when inferring the config")
    p.add_argument("--prefer", help="top-level entry of a .pt dict (default generator_ema, then generator)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def _config(args):
    from qarvd_jax.models.wan.config import PRESETS, WanDiTConfig

    if args.config:
        with open(args.config) as fh:
            d = json.load(fh)
        return WanDiTConfig.from_fixture_json(d) if "model" in d else WanDiTConfig.from_dict(d)
    if args.preset:
        return PRESETS[args.preset]()
    return None


def run(args) -> int:
    from convert.wan_dit import convert, read_dit_checkpoint
    from qarvd_jax.models.wan.params import infer_config_from_state_dict

    cfg = _config(args)
    if cfg is None and args.num_heads:
        state, _ = read_dit_checkpoint(args.src, prefer=args.prefer)
        cfg = infer_config_from_state_dict(state, num_heads=args.num_heads)
    out = convert(args.src, args.dst, config=cfg, overwrite=args.overwrite, prefer=args.prefer)
    print(f"wrote {out}")
    return 0
