"""The ``qarvd`` command line: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)`` which adds its parser and sets
``func=run`` (``run(args) -> int``). Heavy imports happen inside ``run`` so ``qarvd --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

SUBCOMMANDS = ("convert", "parity", "generate", "outliers", "sensitivity", "quantize", "export", "evaluate", "demo")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qarvd", description="Quantization toolkit for autoregressive video "
                                 "diffusion models (Self-Forcing / Wan2.1) in JAX.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"qarvd_jax.cli.{name}_cmd").register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:
        for noisy in ("absl", "orbax", "jax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, NotImplementedError, ImportError) as e:
        print(f"qarvd {args.command}: error: {e}", file=sys.stderr)
        return 2

