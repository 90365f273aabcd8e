"""DP-IQA in JAX/Flax."""
