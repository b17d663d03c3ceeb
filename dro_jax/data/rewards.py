"""Reward mapping and dataset-level reward standardisation.

Thumbs up/down map to `RewardMapping.thumbs_up` / `thumbs_down`; scalar rewards
pass through. With `standardize=True` rewards become (r - mean) / std where
mean and std come from a `RewardStats` computed ONCE over the whole training
log (never per batch) and stored with the run, so a resumed run keeps them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

# Below this std all rewards are equal; dividing would blow up, so we only
# centre (and say so in the log of the caller).
_MIN_STD = 1e-12
# Rewards, weights and log-probs are float32 in training; larger values would be inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RewardMapping:
  """How feedback signals become rewards."""
  thumbs_up: float = 1.0
  thumbs_down: float = -1.0
  standardize: bool = False

  def __post_init__(self):
    for name in ("thumbs_up", "thumbs_down"):
      v = getattr(self, name)
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > FLOAT32_MAX
          or not math.isfinite(v)):
        raise ValueError(f"RewardMapping.{name} must be a finite number within float32's "
                         f"range, got {v!r}")


@dataclasses.dataclass(frozen=True)
class RewardStats:
  """Mean, population std and count of the rewards of a training log."""
  mean: float
  std: float
  count: int

  def __post_init__(self):
    # Non-finite stats would be written as invalid JSON and poison every resume.
    nums = (self.mean, self.std)
    if (not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in nums)
        or not all(math.isfinite(v) for v in nums) or self.std < 0
        or not isinstance(self.count, numbers.Integral) or isinstance(self.count, bool)
        or self.count < 1):
      raise ValueError(f"RewardStats: need finite mean, finite std >= 0 and integer count >= 1, "
                       f"got mean={self.mean!r} std={self.std!r} count={self.count!r}")

  @classmethod
  def from_rewards(cls, rewards: Iterable[float]) -> "RewardStats":
    r = np.asarray(list(rewards), dtype=np.float64)
    if r.size == 0:
      raise ValueError("RewardStats: no rewards to compute statistics over")
    if not np.all(np.isfinite(r)):
      raise ValueError("RewardStats: rewards contain NaN or infinity")
    if r.min() == r.max():  # exactly: the float sums below would leave rounding noise as std
      return cls(mean=float(r[0]), std=0.0, count=int(r.size))
    # Scale by a power of two (exact) so squaring in std cannot overflow float64.
    s = 2.0 ** (int(np.frexp(np.abs(r).max())[1]) - 1)
    # Population std (ddof=0): the standardised log then has variance exactly 1.
    return cls(mean=float((r / s).mean() * s), std=float((r / s).std() * s),
               count=int(r.size))

  @classmethod
  def from_records(cls, records) -> "RewardStats":
    return cls.from_rewards(rec.reward for rec in records)

  @property
  def all_equal(self) -> bool:
    """True when standardisation can only centre the rewards."""
    return self.std <= _MIN_STD

  @property
  def scale(self) -> float:
    """The divisor used by `standardize` (1 when all rewards are equal)."""
    return 1.0 if self.all_equal else self.std

  def standardize(self, rewards: Union[float, np.ndarray]):
    return (np.asarray(rewards, dtype=np.float64) - self.mean) / self.scale

  def to_json(self) -> str:
    d = {"mean": float(self.mean), "std": float(self.std), "count": int(self.count)}
    return json.dumps(d, sort_keys=True, allow_nan=False)

  @classmethod
  def from_json(cls, text: str) -> "RewardStats":
    try:
      d = json.loads(text)
    except ValueError as e:
      raise ValueError(f"RewardStats: malformed JSON ({e})") from None
    if not isinstance(d, dict):
      raise ValueError(f"RewardStats: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("mean", "std", "count") if k not in d]
    if missing:
      raise ValueError(f"RewardStats: missing key {missing[0]!r} (the file holds {sorted(d)})")
    d = {k: d[k] for k in ("mean", "std", "count")}
    return cls(**d)

  def save(self, path: str) -> None:
    """Writes JSON atomically (a kill mid-write leaves the old file intact)."""
    text = self.to_json()
    if "://" in path:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tmp = path + ".tmp"
      with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
      tf.io.gfile.rename(tmp, path, overwrite=True)
      return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "RewardStats":
    """Reads a stats file; a bad one raises one line naming the file."""
    try:
      if "://" in path:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        with tf.io.gfile.GFile(path, "r") as f:
          return cls.from_json(f.read())
      with open(path, encoding="utf-8") as f:
        return cls.from_json(f.read())
    except ValueError as e:  # also UnicodeDecodeError
      reason = " ".join(str(e).split())
      raise ValueError(f"{path}:0: reward_stats: {reason} (restore the run's file, or delete "
                       "it to recompute the statistics from the training log)") from None


def mixed_scales_note(rewards: Sequence[float], labels: Sequence[Optional[bool]]) -> Optional[str]:
  """When thumbs and scalar rewards share a log and a thumbs-up is worth less than the average
  scored record (or a thumbs-down more): what they map to, and what to do. None otherwise.

  Standardisation shifts and scales every reward alike, so it keeps this order (and makes it
  worse for KTO's and filtered SFT's thresholds at 0: a thumbs-up can become negative)."""
  rewards = np.asarray(rewards, np.float64)
  thumbs = np.array([l is not None for l in labels], bool)
  if not thumbs.any() or thumbs.all():
    return None
  up = np.array([l is True for l in labels], bool)
  down = thumbs & ~up
  scored = float(rewards[~thumbs].mean())
  up_value = float(rewards[up].mean()) if up.any() else None
  down_value = float(rewards[down].mean()) if down.any() else None
  if (up_value is None or up_value >= scored) and (down_value is None or down_value <= scored):
    return None
  shown = ", ".join(f"a thumbs-{k} is {v:.4g}" for k, v in (("up", up_value), ("down", down_value)) if v is not None)
  return (f"thumbs and scalar rewards share this log on other scales: {shown}, while the scored records "
          f"average {scored:.4g} (standardising keeps this order); map thumbs onto the scores' scale "
          "(thumbs_up, thumbs_down) or give each kind its own task in a mixture, standardised on its own")
