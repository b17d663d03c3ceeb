"""gin-usable registration of feedback-log tasks.

In a gin file (run from the repo root, where `tasks` is importable):

    import tasks.feedback
    MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()
    feedback.feedback_log_task.name = "my_log"
    feedback.feedback_log_task.paths = ["/data/logs/*.jsonl.gz"]
    feedback.feedback_log_task.vocabulary = "/models/t5/spiece.model"

Formats: "auto" (per record: plain feedback / TRL unpaired / UltraFeedback
original / binarized), or force one of dro_jax.data.logs.FORMATS.
"""
from typing import Mapping, Optional, Sequence, Union

import gin

from dro_jax.data.rewards import RewardMapping, RewardStats
from dro_jax.data.tasks import get_vocabulary, register_feedback_task


@gin.configurable(module="feedback")
def feedback_log_task(*, name: str,
                      paths: Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]],
                      format: str = "auto",  # pylint: disable=redefined-builtin
                      vocabulary=None,
                      thumbs_up: float = 1.0, thumbs_down: float = -1.0,
                      standardize: bool = False,
                      reward_stats_path: Optional[str] = None,
                      on_bad_record: str = "error",
                      shuffle_buffer_size: Optional[int] = None) -> str:
  """Registers (idempotently) a feedback-log task and returns its name.

  Args:
    name: the seqio task name.
    paths: file(s)/glob(s) of the train split, or {split: paths}.
    format: record layout (see dro_jax.data.logs.FORMATS).
    vocabulary: None/"byte", a SentencePiece .model path, or a seqio.Vocabulary.
    thumbs_up, thumbs_down: rewards of thumbs up/down records.
    standardize: standardise rewards over the train log.
    reward_stats_path: JSON RewardStats to standardise with (e.g. the one a
      run stored); default: computed over the train log.
    on_bad_record: "error" or "skip".
    shuffle_buffer_size: optional extra seqio shuffle buffer.
  """
  stats = RewardStats.load(reward_stats_path) if reward_stats_path else None
  register_feedback_task(
      name, paths=dict(paths) if isinstance(paths, Mapping) else paths,
      vocabulary=get_vocabulary(vocabulary),
      reward_mapping=RewardMapping(thumbs_up=thumbs_up, thumbs_down=thumbs_down,
                                   standardize=standardize),
      on_bad_record=on_bad_record, reward_stats=stats,
      shuffle_buffer_size=shuffle_buffer_size, format=format)
  return name
