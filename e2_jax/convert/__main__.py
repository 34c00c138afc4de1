"""`python -m e2_jax.convert ...` (e2_jax/convert/cli.py)."""

import sys

from e2_jax.convert.cli import main

sys.exit(main())
