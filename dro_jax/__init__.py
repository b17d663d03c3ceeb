"""dro_jax: Direct Reward Optimisation (DRO-V) for T5 models in JAX/Flax."""

__version__ = "0.1.0"
