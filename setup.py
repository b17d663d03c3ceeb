"""dro_jax: Direct Reward Optimisation for T5 in JAX/Flax."""
import setuptools

setuptools.setup(
    name="dro_jax",
    version="0.1.0",
    description="Direct Reward Optimisation (DRO-V) for encoder-decoder LMs from single-trajectory feedback",
    python_requires=">=3.10",
    # Only the library is installed. The seqio registrations in tasks/ stay in the
    # repo (imported by gin files from the working directory) so no top-level
    # `tasks` module lands in site-packages.
    packages=setuptools.find_packages(include=["dro_jax", "dro_jax.*"]),
    install_requires=[
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "seqio>=0.0.19,<0.1",
        "tensorflow-datasets>=4.9,<5",
        "gin-config>=0.5,<0.6",
        "clu>=0.0.12,<0.1",
        "tensorboard>=2.16,<3",
        "numpy>=1.26",
        "tqdm>=4.60",
    ],
    extras_require={
        # torch is pinned to the CPU build that lies on disk; an open range pulls a
        # multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "transformers>=4.40,<6",
            "safetensors>=0.4",
            "sentencepiece>=0.1.99",
            "matplotlib>=3.7",
        ],
        "demo": ["matplotlib>=3.7"],
    },
)
