"""Feedback-log data: reading, rewards, seqio tasks and feature converters.

Import the submodules directly (`from dro_jax.data import logs`); this package
does not import tensorflow/seqio eagerly so that `logs` stays light.
"""
