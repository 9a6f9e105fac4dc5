"""The ``qarvd`` command line: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)`` which adds its parser and sets
``func=run`` (``run(args) -> int``). Heavy imports happen inside ``run`` so ``qarvd --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from qarvd_jax.errors import OutputError, UserError

__all__ = ["main", "build_parser"]

SUBCOMMANDS = ("convert", "parity", "generate", "outliers", "sensitivity", "quantize", "export", "evaluate", "demo",
               "compare")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qarvd", description="Quantization toolkit for autoregressive video "
                                 "diffusion models (Self-Forcing / Wan2.1) in JAX.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QARVD_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"qarvd_jax.cli.{name}_cmd").register(sub)
    return ap


# commands whose --out is a folder: pointing it at an existing file is an error before any work
_OUT_IS_FOLDER = ("generate", "sensitivity", "quantize", "evaluate", "demo")
# errors a user can fix: one line, exit code 2 (a bug's traceback is shown; --debug shows every one)
_USER_ERRORS = (UserError, OSError, ValueError, NotImplementedError, ImportError)


def _check_out_folder(args) -> None:
    out = getattr(args, "out", None)
    if args.command in _OUT_IS_FOLDER and isinstance(out, str) and os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"cannot create output folder --out {out}: it is a file (give a folder)")


def _terminate(signum, frame):  # SIGTERM -> an exception, so temporary outputs are cleaned up on the way out
    raise SystemExit(128 + signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    debug = args.debug or os.environ.get("QARVD_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:
        for noisy in ("absl", "orbax", "jax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        pass
    try:
        _check_out_folder(args)
        return int(args.func(args) or 0)
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"qarvd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
