"""Weight bridge between PyTorch-keyed safetensors folders (diffusers, transformers) and Flax params."""
