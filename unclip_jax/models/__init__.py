"""unclip_jax.models"""
