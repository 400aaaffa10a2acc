"""unclip_jax.input"""
