"""`python -m e2_jax.composed_retrieval`: the command, kept where users call it; the code is
`e2_jax.evaluation.composed_retrieval` (`python -m e2_jax.evaluation.composed_retrieval` runs the same)."""

from e2_jax.evaluation.composed_retrieval import main

if __name__ == "__main__":
    main()
