"""unclip_jax: unCLIP (DALL-E 2) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions known to install together on a fresh CPU machine (Python 3.11).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",  # clu.metric_writers imports it; tensorflow-cpu 2.21 no longer pulls it in
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    "ftfy==6.3.1",
    "regex==2026.11.15",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]
TORCH_REF = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.23.0",
    "accelerate==1.15.0",
]
TEST = ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6"]
# libtpu: the TPU runtime on TPU VMs, and on any machine the TPU compiler `unclip plan` uses (the version
# jax[tpu]==0.10.2 pins). On a machine without a TPU, JAX still runs on the CPU with it installed.
TPU = ["libtpu==0.0.42.*"]
# `unclip convert export --format onnx|savedmodel`: ONNX and its runtime (the graph converter jax2onnx is
# installed with --no-deps by the Makefile: it pins an older orbax-checkpoint than ours, and needs none of its
# optional dependencies for our networks). tensorflow-cpu (SavedModel) is already a core dependency.
EXPORT = ["onnx==1.23.2", "onnx-ir==1.1.0", "onnxruntime==1.31.1"]

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (Hierarchical Text-Conditional Image Generation with CLIP Latents) in JAX/Flax",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"torch": TORCH_REF, "test": TEST + TORCH_REF + EXPORT, "tpu": TPU, "export": EXPORT},
    entry_points={"console_scripts": ["unclip=unclip_jax.cli:main"]},
)
