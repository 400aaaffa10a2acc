"""unCLIP in JAX/Flax."""
