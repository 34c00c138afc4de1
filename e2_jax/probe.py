"""`python -m e2_jax.probe`: the command, kept where users call it; the code is
`e2_jax.evaluation.probe` (`python -m e2_jax.evaluation.probe` runs the same)."""

from e2_jax import errors
from e2_jax.evaluation.probe import main

if __name__ == "__main__":
    errors.main(main)
