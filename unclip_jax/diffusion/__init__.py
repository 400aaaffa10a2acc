"""unclip_jax.diffusion"""
