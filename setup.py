"""unclip_jax: unCLIP (DALL-E 2) in JAX/Flax, TPU-first."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint",
    "ml_collections",
    "transformers>=5",  # tokenizers only: transformers 5 ships no Flax models
    "tokenizers",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "importlib_resources",  # needed by tensorflow-datasets to build datasets, not declared by it
    "clu",
    "tensorboard",  # clu's metric writers write TensorBoard summaries through it
    "numpy",
    "Pillow",
    "tqdm",
    "safetensors",
]

TEST = [
    "pytest",
    "pytest-xdist",
    "torch==2.13.0",  # the CPU build on local disk; an unpinned torch pulls a CUDA build
    "diffusers",
]

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (DALL-E 2): CLIP, diffusion prior, decoder and upsamplers in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "cuda": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["unclip-jax=unclip_jax.cli:main"]},
)
