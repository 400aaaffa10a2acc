"""`python -m unclip_jax.demo`: the whole pipeline on the built-in dataset, with an HTML report."""
