"""Registers `dro_sample_feedback`: the bundled tiny log, byte vocabulary.

Import from the repo root (`import tasks.sample`); `tasks` is not installed.
"""
import os

import seqio

from dro_jax.data.tasks import register_feedback_task

SAMPLE_LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                          "sample_feedback.jsonl")
SAMPLE_TASK = "dro_sample_feedback"

register_feedback_task(SAMPLE_TASK, paths=SAMPLE_LOG, vocabulary=seqio.ByteVocabulary())
