import sys

from qarvd_jax.cli import main

sys.exit(main())
