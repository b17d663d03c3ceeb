"""seqio Tasks over feedback logs.

The log is read, validated and tokenized eagerly in Python when a dataset is
first built (and cached per split), so a `BadRecordError` surfaces as a plain
Python exception from `seqio.get_dataset` / `task.get_dataset`, not as a
tf.data runtime error. Logs are therefore held in memory (token ids as int32).

Task features (one element per example):
  inputs   int32 [n]  prompt tokens + EOS
  targets  int32 [m]  response tokens + EOS
  rewards  float32 [] mapped reward, standardised if the mapping says so
  ref_logprobs float32 []  only when every record carries `ref_logprob`
  weights  float32 []  a record's `weight`, 1 where absent (always: seqio mixes tasks only when
                       they have the same features)
  inputs_pretokenized / targets_pretokenized  string []

Truncation: seqio trims `inputs`/`targets` to the requested feature lengths.
`FeedbackTask.get_dataset` counts, over the whole split, the examples whose
tokenized length (with EOS) exceeds those lengths, logs a warning when there
are any, and keeps the count: `get_truncation_stats(task, split)`.
An over-long target therefore loses its EOS and tail (never its head).

Determinism: sharding (`seqio.ShardInfo`) takes every num_shards-th example of
the file order, before shuffling; shuffling is a full in-memory shuffle of the
shard under the seed given to `get_dataset` (reshuffled each epoch).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from dro_jax.data import logs
from dro_jax.data import rewards as rewards_lib
from dro_jax.data.rewards import RewardMapping, RewardStats

SplitPaths = Union[logs.PathsType, Mapping[str, logs.PathsType]]


@dataclasses.dataclass
class TruncationStats:
  """Examples of a split longer than the requested feature lengths."""
  examples: int
  truncated: int  # examples with inputs or targets (or both) truncated
  inputs_truncated: int
  targets_truncated: int
  sequence_length: Dict[str, Optional[int]]


@dataclasses.dataclass
class SplitData:
  """A tokenized split, held in memory."""
  num_examples: int
  inputs: tf.RaggedTensor
  targets: tf.RaggedTensor
  input_lengths: np.ndarray
  target_lengths: np.ndarray
  rewards: np.ndarray  # after mapping (and standardisation), float32
  raw_rewards: np.ndarray  # after mapping only, float64
  ref_logprobs: Optional[np.ndarray]
  # int [N, 2]: the (inputs, targets) lengths each ref_logprob was scored at (0: not recorded)
  ref_lengths: Optional[np.ndarray]
  weights: np.ndarray  # float32 [N], 1 where a record gives none
  prompts: tf.Tensor  # string [N]
  responses: tf.Tensor
  report: logs.ReadReport
  # where each record came from, kept for ref_lengths errors: files[file_index[i]], line line[i]
  origin_files: Optional[List[str]] = None
  origin_file_index: Optional[np.ndarray] = None  # int32 [N]
  origin_line: Optional[np.ndarray] = None  # int64 [N]
  has_weights: bool = False  # some record gives a `weight`


def _tokenize(vocabulary: seqio.Vocabulary, texts: Sequence[str]) -> tf.RaggedTensor:
  """Tokenizes texts in Python and appends EOS; returns a ragged [N, None] of uint16 ids when the
  vocabulary fits (half of int32's memory for a log held in memory; `_row_getter` widens each
  row to int32), else int32."""
  eos = vocabulary.eos_id
  dtype = np.uint16 if vocabulary.vocab_size <= 2**16 else np.int32
  # All texts' ids in one flat array, EOS slots left between them: a million small arrays cost
  # more than their contents.
  if isinstance(vocabulary, seqio.ByteVocabulary):
    # Fast path: ByteVocabulary is UTF-8 bytes shifted past its special ids.
    encoded = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    body = np.frombuffer(b"".join(encoded), np.uint8)
    shift = vocabulary._num_special_tokens  # pylint: disable=protected-access
  else:
    encoded = [np.asarray(vocabulary.encode(t), dtype) for t in texts]
    lengths = np.fromiter((len(r) for r in encoded), np.int64, len(encoded))
    body = np.concatenate(encoded) if encoded else np.zeros((0,), dtype)
    shift = 0
  del encoded
  splits = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
  is_text = np.ones(int(splits[-1]), bool)
  is_text[splits[1:] - 1] = False
  flat = np.empty(is_text.size, dtype)
  flat[is_text] = body
  if shift:
    flat[is_text] += shift
  flat[~is_text] = eos
  return tf.RaggedTensor.from_row_splits(flat, splits, validate=False)


def _row_getter(column):
  """i -> row i of a dense or ragged [N, ...] tensor. A ragged row is sliced from the flat values
  by its row splits: `ragged[i]` costs time that grows with N (an epoch of a 1M-record log was
  4x slower per example than of 100k)."""
  if isinstance(column, tf.RaggedTensor):
    values, splits = column.values, column.row_splits
    if values.dtype == tf.uint16:  # compact storage of token ids (see _tokenize)
      return lambda i: tf.cast(values[splits[i]:splits[i + 1]], tf.int32)
    return lambda i: values[splits[i]:splits[i + 1]]
  return lambda i: column[i]


class FeedbackDataSource(seqio.DataSource):
  """A DataSource over feedback logs, parsed and tokenized eagerly."""

  def __init__(self, split_paths: Mapping[str, logs.PathsType], *,
               vocabulary: seqio.Vocabulary,
               reward_mapping: RewardMapping = RewardMapping(),
               on_bad_record: str = "error",
               reward_stats: Optional[RewardStats] = None,
               format: str = "auto",  # pylint: disable=redefined-builtin
               read_ref_logprobs: bool = True):
    if "train" not in split_paths:
      raise ValueError(f"a feedback task needs a 'train' split, got {list(split_paths)}")
    if on_bad_record not in ("error", "skip"):
      raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    # num_input_examples=None: a known small size makes seqio cache() right
    # after the source, which would freeze the first epoch's shuffle order.
    super().__init__(splits=tuple(split_paths), num_input_examples=None,
                     caching_permitted=False, performs_internal_shuffling=True)
    self.split_paths = dict(split_paths)
    self.vocabulary = vocabulary
    self.reward_mapping = reward_mapping
    self.on_bad_record = on_bad_record
    self.format = format
    self.read_ref_logprobs = read_ref_logprobs
    self._reward_stats = reward_stats
    self._cache: Dict[str, SplitData] = {}
    self._lock = threading.Lock()

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  # -- reward statistics ----------------------------------------------------

  @property
  def reward_stats(self) -> Optional[RewardStats]:
    """Stats used for standardisation: given, or computed over the train log."""
    if not self.reward_mapping.standardize:
      return self._reward_stats
    if self._reward_stats is None:
      self._reward_stats = RewardStats.from_rewards(self._split("train").raw_rewards)
    return self._reward_stats

  def set_reward_stats(self, stats: RewardStats) -> None:
    """Replaces the stats (e.g. those stored with a run, on resume)."""
    with self._lock:
      if stats != self._reward_stats:
        self._reward_stats = stats
        for split, data in self._cache.items():
          data.rewards = self._final_rewards(data.raw_rewards)

  def _final_rewards(self, raw: np.ndarray) -> np.ndarray:
    if not self.reward_mapping.standardize:
      return raw.astype(np.float32)
    stats = self.reward_stats
    if stats.all_equal:
      logging.warning("All rewards of the training log are equal (%s); "
                      "standardisation only centres them.", stats.mean)
    return stats.standardize(raw).astype(np.float32)

  # -- loading --------------------------------------------------------------

  def load(self, split: str) -> SplitData:
    """Reads, validates and tokenizes a split once; rewards are final."""
    data = self._split(split)
    if data.rewards is None:
      data.rewards = self._final_rewards(data.raw_rewards)
    return data

  def _split(self, split: str) -> SplitData:
    """The cached split; `rewards` may still await the reward statistics."""
    if split not in self.split_paths:
      raise ValueError(f"unknown split {split!r}; this task has {list(self.split_paths)}")
    with self._lock:
      if split not in self._cache:
        self._cache[split] = self._load(split)
      return self._cache[split]

  def _load(self, split: str) -> SplitData:
    report = logs.ReadReport()
    records = logs.load_feedback_log(
        self.split_paths[split], on_bad_record=self.on_bad_record,
        reward_mapping=self.reward_mapping, report=report, format=self.format)
    if report.num_bad:
      logging.warning("Feedback log %s: skipped %d bad records: %s; the first: %s",
                      ", ".join(report.files), report.num_bad, dict(report.bad),
                      " | ".join(report.examples))
    has_ref = self.read_ref_logprobs and logs.check_ref_logprobs(records)
    has_weights = any(r.weight is not None for r in records)
    weights = np.array([1.0 if r.weight is None else r.weight for r in records], np.float32)
    if has_weights and not weights.any():
      logging.warning("Feedback log %s: every record has weight 0, so with "
                      "trainer.DataConfig.carry_weights=True every loss would be 0", report.files)
    prompts = [r.prompt for r in records]
    responses = [r.response for r in records]
    inputs = _tokenize(self.vocabulary, prompts)
    targets = _tokenize(self.vocabulary, responses)
    raw = np.array([r.reward for r in records], np.float64)
    note = rewards_lib.mixed_scales_note(raw, [r.label for r in records])
    if note:
      logging.warning("Feedback log %s: %s", ", ".join(report.files), note)
    ref_lengths = origin = None
    if has_ref and any(r.ref_lengths for r in records):
      ref_lengths = np.array([r.ref_lengths or (0, 0) for r in records], np.int64)
      files = sorted({r.source for r in records})
      index = {f: i for i, f in enumerate(files)}
      origin = dict(origin_files=files,
                    origin_file_index=np.array([index[r.source] for r in records], np.int32),
                    origin_line=np.array([r.line for r in records], np.int64))
    data = SplitData(
        num_examples=len(records), inputs=inputs, targets=targets,
        input_lengths=inputs.row_lengths().numpy(),
        target_lengths=targets.row_lengths().numpy(),
        rewards=None, raw_rewards=raw,
        ref_logprobs=(np.array([r.ref_logprob for r in records], np.float32)
                      if has_ref else None),
        ref_lengths=ref_lengths,
        weights=weights, has_weights=has_weights,
        # tf.constant from a list: a numpy '<U' array would pad every string
        # to the longest one.
        prompts=tf.constant(prompts, tf.string),
        responses=tf.constant(responses, tf.string), report=report, **(origin or {}))
    if not self.reward_mapping.standardize:
      data.rewards = raw.astype(np.float32)
    return data

  # -- dataset ---------------------------------------------------------------

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached=False, num_epochs=1):
    del sequence_length, use_cached, num_epochs  # handled by the Task
    data = self.load(split)
    rewards = data.rewards
    idx = np.arange(data.num_examples, dtype=np.int64)
    if shard_info is not None:
      idx = idx[shard_info.index::shard_info.num_shards]
    # A host's share of a split smaller than the host count is empty: evaluation pads it
    # (training refuses such a log up front, see trainer.make_dataset).
    columns = {
        "inputs": data.inputs, "targets": data.targets,
        "rewards": tf.constant(rewards, tf.float32),
        "inputs_pretokenized": data.prompts,
        "targets_pretokenized": data.responses,
    }
    if data.ref_logprobs is not None:
      columns["ref_logprobs"] = tf.constant(data.ref_logprobs)
    # Always, 1 where absent: seqio mixes tasks only when they have the same features.
    columns["weights"] = tf.constant(data.weights)

    ds = tf.data.Dataset.from_tensor_slices(idx)
    if shuffle and idx.size:
      ds = ds.shuffle(idx.size, seed=seed, reshuffle_each_iteration=True)
    # Gathering by index keeps every feature a dense tensor (no ragged specs).
    take = {k: _row_getter(v) for k, v in columns.items()}
    return ds.map(lambda i: {k: get(i) for k, get in take.items()},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class FeedbackTask(seqio.Task):
  """A seqio.Task that counts (and warns about) truncation to feature lengths."""

  def get_dataset(self, sequence_length=None, split="train", *args, **kwargs):
    data = self.source.load(split)  # eager: bad logs raise plain Python errors
    if sequence_length:
      stats = truncation_stats(data, sequence_length)
      self._truncation = getattr(self, "_truncation", {})
      self._truncation[split] = stats
      warned = self.__dict__.setdefault("_truncation_warned", set())
      key = (split, tuple(sorted(stats.sequence_length.items())))
      if stats.truncated and key not in warned:  # once: a run builds a split's dataset several times
        warned.add(key)
        logging.warning(
            "Task %s split %s: %d of %d examples are longer than the feature "
            "lengths %s and will be truncated (inputs: %d, targets: %d).",
            self.name, split, stats.truncated, stats.examples,
            stats.sequence_length, stats.inputs_truncated, stats.targets_truncated)
    return super().get_dataset(sequence_length, split, *args, **kwargs)

  def truncation_stats(self, split: str = "train") -> Optional[TruncationStats]:
    """The counts of the last get_dataset(split) call with feature lengths."""
    return getattr(self, "_truncation", {}).get(split)


def feedback_tasks(task: Union[str, seqio.DatasetProviderBase]) -> List["FeedbackTask"]:
  """The feedback-log tasks of `task`: itself, or a mixture's (sub-mixtures included), by name."""
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  members = task.tasks if isinstance(task, seqio.Mixture) else [task]
  return [t for t in members if isinstance(getattr(t, "source", None), FeedbackDataSource)]


def check_ref_logprob_lengths(task: Union[str, seqio.DatasetProviderBase], split: str,
                              sequence_length: Mapping[str, int]) -> None:
  """For a run that reads the log's `ref_logprob`s: refuses them where they were scored at
  lengths that cut a record differently from `sequence_length` (logs.BadRecordError). A
  mixture checks each of its feedback-log tasks."""
  for member in feedback_tasks(task):
    data = member.source.load(split)
    if data.ref_logprobs is None or data.ref_lengths is None:
      continue
    stale = logs.stale_ref_logprobs(data.input_lengths, data.target_lengths, data.ref_lengths,
                                    dict(sequence_length))
    if stale.size:
      i = int(stale[0])
      raise logs.stale_ref_logprob_error(
          data.origin_files[data.origin_file_index[i]], int(data.origin_line[i]),
          tuple(int(x) for x in data.ref_lengths[i]), dict(sequence_length), stale.size)


def check_mixable(task: Union[str, seqio.DatasetProviderBase], split: str) -> None:
  """seqio mixes tasks only when they yield the same features: refuses a mixture whose logs give
  `ref_logprob` in some tasks only (ValueError naming one of each). Tasks without `split` are
  left to the caller."""
  members = [m for m in feedback_tasks(task) if split in m.source.split_paths]
  scored = [m for m in members if m.source.load(split).ref_logprobs is not None]
  if scored and len(scored) < len(members):
    bare = next(m for m in members if m not in scored)
    files = bare.source.split_paths[split]
    raise ValueError(
        f"{files}: ref_logprob: none in task {bare.name}'s '{split}' log, while task {scored[0].name}'s "
        f"has one on every record; a mixture mixes scored and unscored logs only if it ignores the "
        f"scores: score this log too (python -m dro_jax.score), or register {scored[0].name} with "
        f"read_ref_logprobs=False (the run then uses the frozen reference)")


def truncation_stats(data: SplitData, sequence_length: Mapping[str, int]) -> TruncationStats:
  """Counts examples whose tokens (with EOS) exceed the feature lengths (None: no limit)."""
  for k in ("inputs", "targets"):
    v = sequence_length.get(k)
    # seqio trims to 0 tokens for 0, so only None/absent means "no limit".
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f"sequence_length[{k!r}] must be a positive integer or None, got {v!r}")
  no_limit = np.zeros(data.num_examples, bool)
  big_in = (data.input_lengths > sequence_length["inputs"]
            if sequence_length.get("inputs") is not None else no_limit)
  big_t = (data.target_lengths > sequence_length["targets"]
           if sequence_length.get("targets") is not None else no_limit)
  return TruncationStats(
      examples=data.num_examples, truncated=int((big_in | big_t).sum()),
      inputs_truncated=int(big_in.sum()), targets_truncated=int(big_t.sum()),
      sequence_length={k: sequence_length.get(k) for k in ("inputs", "targets")})


def get_truncation_stats(task: Union[str, seqio.Task], split: str = "train"
                         ) -> Optional[TruncationStats]:
  """Truncation counts of the last dataset built from `task` for `split`."""
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  return task.truncation_stats(split)


def get_reward_stats(task: Union[str, seqio.Task]) -> Optional[RewardStats]:
  """The task's reward statistics (computed over the train log if needed)."""
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  return task.source.reward_stats


def set_reward_stats(task: Union[str, seqio.Task], stats: RewardStats) -> None:
  """Makes the task standardise with `stats` (the ones stored with a run)."""
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  task.source.set_reward_stats(stats)


# ----------------------------------------------------------------------------
# Registration

_SCALAR = dict(add_eos=False, dtype=tf.float32, rank=0)
_REGISTERED: Dict[str, Any] = {}


def _as_split_paths(paths: SplitPaths) -> Dict[str, Any]:
  if isinstance(paths, Mapping):
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else str(v))
            for k, v in paths.items()}
  return {"train": tuple(paths) if isinstance(paths, (list, tuple)) else str(paths)}


def feature_spec(vocabulary: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  """Output features of a feedback task."""
  passthrough = seqio.PassThroughVocabulary(size=0)
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
      "rewards": seqio.Feature(passthrough, **_SCALAR),
      "ref_logprobs": seqio.Feature(passthrough, required=False, **_SCALAR),
      "weights": seqio.Feature(passthrough, required=False, **_SCALAR),
  }


def register_feedback_task(
    name: str, *,
    paths: SplitPaths,
    vocabulary: seqio.Vocabulary,
    reward_mapping: RewardMapping = RewardMapping(),
    on_bad_record: str = "error",
    reward_stats: Optional[RewardStats] = None,
    shuffle_buffer_size: Optional[int] = None,
    format: str = "auto",  # pylint: disable=redefined-builtin
    read_ref_logprobs: bool = True,
    overwrite: bool = False,
) -> seqio.Task:
  """Registers (idempotently) a seqio Task over feedback logs.

  Args:
    name: task name.
    paths: file(s)/glob(s) for the "train" split, or {split: paths}.
    vocabulary: seqio vocabulary for inputs and targets.
    reward_mapping: thumbs values and whether to standardise.
    on_bad_record: "error" or "skip" (see logs.read_feedback_log).
    reward_stats: stats to standardise with (default: computed once over the
      train split when first needed).
    shuffle_buffer_size: an extra seqio buffer shuffle after the source's full
      in-memory shuffle; None (default) relies on the full shuffle only.
    format: record layout, "auto" or one of logs.FORMATS.
    read_ref_logprobs: False ignores the records' `ref_logprob`s (no
      `ref_logprobs` feature), e.g. to score a partly scored log again.
    overwrite: replace an existing task of that name with different args.

  Returns:
    The registered task. Re-registering the same name with the same arguments
    returns the existing task; different arguments raise unless overwrite.
  """
  split_paths = _as_split_paths(paths)
  # seqio vocabularies compare by content (==), so they sit in the key as is.
  key = (tuple(sorted(split_paths.items())), vocabulary, reward_mapping,
         on_bad_record, reward_stats, shuffle_buffer_size, format, read_ref_logprobs)
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) == key:
      return seqio.TaskRegistry.get(name)
    if not overwrite:
      raise ValueError(f"seqio task {name!r} is already registered with other "
                       "arguments (pass overwrite=True to replace it)")
    seqio.TaskRegistry.remove(name)
  source = FeedbackDataSource(
      split_paths, vocabulary=vocabulary, reward_mapping=reward_mapping,
      on_bad_record=on_bad_record, reward_stats=reward_stats, format=format,
      read_ref_logprobs=read_ref_logprobs)
  task = seqio.TaskRegistry.add(
      name, source=source, output_features=feature_spec(vocabulary),
      preprocessors=[], task_cls=FeedbackTask,
      shuffle_buffer_size=shuffle_buffer_size)
  _REGISTERED[name] = key
  return task


def get_vocabulary(spec: Union[None, str, seqio.Vocabulary] = "byte") -> seqio.Vocabulary:
  """'byte' (or None) -> ByteVocabulary; a *.model path -> SentencePiece; a vocabulary as is."""
  if isinstance(spec, seqio.Vocabulary):
    return spec
  if spec is None or spec == "byte":
    return seqio.ByteVocabulary()
  if isinstance(spec, str):
    if not tf.io.gfile.exists(spec):
      raise ValueError(f"{spec}: vocabulary: no such file (expected 'byte' or a "
                       "SentencePiece .model path)")
    return seqio.SentencePieceVocabulary(spec)
  raise TypeError(f"vocabulary must be 'byte', a .model path or a seqio.Vocabulary, got {spec!r}")


def check_vocabulary_fits(vocabulary: seqio.Vocabulary, model_vocab_size: int, where: str) -> None:
  """A token id past the embedding table would be clamped silently by the gather; refuse it."""
  if vocabulary.vocab_size > model_vocab_size:
    raise ValueError(f"{where}: the vocabulary has {vocabulary.vocab_size} ids but the model's "
                     f"embedding holds {model_vocab_size} (T5Config.vocab_size); use the model's own vocabulary")
