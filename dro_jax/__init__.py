"""dro_jax: Direct Reward Optimisation (DRO-V) for T5 models in JAX/Flax."""

__version__ = "0.1.0"

from dro_jax import _quiet_tf

_quiet_tf.install()  # TensorFlow's C++ start-up lines are noise on every CLI's stderr
