"""e2_jax: E² (Easy Regional Contrastive Learning of Expressive Fashion Representations) in JAX."""

__version__ = "0.1.0"
