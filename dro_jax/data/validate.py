"""Checks feedback logs before training.

  python -m dro_jax.data.validate LOG [LOG ...] [--on_bad_record=error|skip]
      [--inputs_length=N --targets_length=N] [--vocabulary=byte|PATH/spiece.model]
      [--format=auto|feedback|ultrafeedback|ultrafeedback_binarized]

Prints record count, thumbs up/down balance, reward statistics, token length
percentiles against the feature lengths (with the truncation count), duplicate
and empty-response counts and bad records. Exit status: 0 for a usable log; 1
for an unusable one (in error mode: one line `FILE:LINE: field: reason` on
stderr at the first bad record); 2 for bad arguments. Never prints a traceback for a bad log.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import List, Optional, Sequence

import numpy as np

from dro_jax.data import logs
from dro_jax.data import rewards as rewards_lib
from dro_jax.data.rewards import RewardMapping, RewardStats


def _token_lengths(texts: Sequence[str], vocabulary: str) -> np.ndarray:
  """Token counts with EOS (byte vocabulary without importing TensorFlow)."""
  if vocabulary == "byte":
    return np.array([len(t.encode("utf-8")) + 1 for t in texts], np.int64)
  from dro_jax.data.tasks import get_vocabulary  # pylint: disable=g-import-not-at-top
  vocab = get_vocabulary(vocabulary)
  return np.array([len(vocab.encode(t)) + 1 for t in texts], np.int64)


def _length_line(name: str, lengths: np.ndarray, limit: Optional[int]) -> str:
  p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
  line = (f"  {name:8s} p50 {p50:.0f}  p90 {p90:.0f}  p99 {p99:.0f}  "
          f"max {lengths.max()}")
  if limit:
    n = int((lengths > limit).sum())
    line += f"  | length {limit}: {n} truncated ({100 * n / lengths.size:.1f}%)"
  return line


def summarize(records: List[logs.FeedbackRecord], report: logs.ReadReport,
              args) -> List[str]:
  """The human-readable summary lines."""
  n = len(records)
  up = sum(r.label is True for r in records)
  down = sum(r.label is False for r in records)
  scalar = n - up - down
  stats = RewardStats.from_records(records)
  rewards = np.array([r.reward for r in records])
  out = [f"files: {len(report.files)}  lines: {report.lines}  records: {n}",
         f"feedback: thumbs up {up} ({100 * up / n:.1f}%), thumbs down {down} "
         f"({100 * down / n:.1f}%), scalar reward {scalar} ({100 * scalar / n:.1f}%)",
         f"rewards: mean {stats.mean:.4g}  std {stats.std:.4g}  min {rewards.min():.4g}"
         f"  max {rewards.max():.4g}"]
  in_len = _token_lengths([r.prompt for r in records], args.vocabulary)
  tgt_len = _token_lengths([r.response for r in records], args.vocabulary)
  out.append(f"token lengths with EOS (vocabulary {args.vocabulary}):")
  out.append(_length_line("inputs", in_len, args.inputs_length))
  out.append(_length_line("targets", tgt_len, args.targets_length))
  if args.inputs_length or args.targets_length:
    trunc = ((in_len > (args.inputs_length or np.inf))
             | (tgt_len > (args.targets_length or np.inf))).sum()
    out.append(f"  examples truncated (inputs or targets): {trunc}")
  pairs = collections.Counter((r.prompt, r.response) for r in records)
  dup = sum(c - 1 for c in pairs.values())
  by_pair = collections.defaultdict(set)
  for r in records:
    by_pair[(r.prompt, r.response)].add(r.reward)
  conflicting = sum(len(v) > 1 for v in by_pair.values())
  out.append(f"duplicates (same prompt and response): {dup}; with conflicting "
             f"rewards: {conflicting}")
  n_ref = sum(r.ref_logprob is not None for r in records)
  out.append(f"records with ref_logprob: {n_ref} of {n}")
  scored_at = collections.Counter(r.ref_lengths for r in records if r.ref_logprob is not None)
  if any(scored_at):
    out.append("  scored at (inputs, targets): " + ", ".join(
        f"{k or 'not recorded'}: {c}" for k, c in scored_at.most_common()))
    if args.inputs_length or args.targets_length:
      logs.check_ref_logprob_lengths(records, in_len, tgt_len,
                                     {"inputs": args.inputs_length, "targets": args.targets_length})
  note = rewards_lib.mixed_scales_note(rewards, [r.label for r in records])
  if note:
    out.append(f"warning: {note}")
  # Accepted (a model may answer nothing) but worth a look: often a logging bug.
  n_empty = sum(logs._is_blank(r.response) for r in records)  # pylint: disable=protected-access
  out.append(f"empty responses (blank or invisible only): {n_empty} of {n}")
  return out


def _bad_lines(report: logs.ReadReport) -> List[str]:
  out = [f"bad records: {report.num_bad}"]
  for reason, c in report.bad.most_common():
    out.append(f"  {c:6d}  {reason}")
  for e in report.examples:
    out.append(f"  e.g. {e}")
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dro_jax.data.validate", description=__doc__.split("\n")[0])
  parser.add_argument("logs", nargs="+", metavar="LOG", help="files or glob patterns")
  parser.add_argument("--on_bad_record", choices=("error", "skip"), default="error")
  parser.add_argument("--inputs_length", type=int, default=None)
  parser.add_argument("--targets_length", type=int, default=None)
  parser.add_argument("--vocabulary", default="byte",
                      help="'byte' or a SentencePiece .model path")
  parser.add_argument("--format", choices=logs.FORMATS, default="auto")
  parser.add_argument("--thumbs_up", type=float, default=1.0)
  parser.add_argument("--thumbs_down", type=float, default=-1.0)
  args = parser.parse_args(argv)
  for name in ("inputs_length", "targets_length"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  try:
    mapping = RewardMapping(thumbs_up=args.thumbs_up, thumbs_down=args.thumbs_down)
  except ValueError as e:
    parser.error(" ".join(str(e).split()))  # exit 2

  report = logs.ReadReport()
  try:
    records = list(logs.read_feedback_log(
        args.logs, on_bad_record=args.on_bad_record, reward_mapping=mapping,
        report=report, format=args.format))
    if not records:
      print("\n".join(_bad_lines(report)))
      print(f"{report.files[0] if report.files else args.logs[0]}:0: file: "
            "no usable records", file=sys.stderr)
      return 1
    lines = summarize(records, report, args)
    logs.check_ref_logprobs(records)
  except logs.BadRecordError as e:
    print(str(e), file=sys.stderr)
    return 1
  except (ValueError, TypeError, OSError) as e:  # e.g. a bad vocabulary path
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print("\n".join(lines + _bad_lines(report)))
  print("usable: yes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
