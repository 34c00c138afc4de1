"""`python -m e2_jax.tagging`: the command, kept where users call it; the code is
`e2_jax.evaluation.tagging` (`python -m e2_jax.evaluation.tagging` runs the same)."""

from e2_jax import errors
from e2_jax.evaluation.tagging import main

if __name__ == "__main__":
    errors.main(main)
