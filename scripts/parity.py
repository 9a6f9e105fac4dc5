#!/usr/bin/env python
"""Verify the JAX port against golden fixture folders (DiT, Wan VAE or umT5; detected from config.json).

Prints per-array max absolute / relative error and exits 1 if any array is outside its tolerance
(1e-4 absolute for the DiT in float32; the VAE and umT5 use their READMEs' tolerances) or if the
checkpoint round trip is not bit-exact. Same as ``qarvd parity``.

    python scripts/parity.py tests/fixtures/selfforcing_tiny
"""

import sys

from qarvd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]]))
