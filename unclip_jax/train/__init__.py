"""unclip_jax.train"""
