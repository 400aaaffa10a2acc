"""unclip_jax.layers"""
