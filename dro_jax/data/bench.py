"""Input-pipeline benchmark: JSONL feedback log -> model-ready batches.

  python -m dro_jax.data.bench [--log=PATH] [--num_records=20000]
      [--inputs_length=512] [--targets_length=256] [--batch_size=32]
      [--vocabulary=byte|PATH/spiece.model] [--max_segments=8]

Without --log it writes a synthetic log with a realistic length spread
(log-normal prompt and response lengths, a long tail past the feature lengths).
It reports examples/s for the whole path (parse + validate + tokenize + convert
+ batch) and for the steady state (batches of an already loaded log), for the
unpacked and the packed converter, and the token efficiency (non-padding
fraction of the encoder and decoder token slots) of both.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict

import numpy as np

from dro_jax import io_utils

_WORDS = ("the a of to and in is it you that he was for on are with as I his they "
          "be at one have this from or had by hot word but what some we can out "
          "other were all there when up use your how said an each she which do "
          "their time if will way about many then them write would like so these "
          "her long make thing see him two has look more day could go come did "
          "number sound no most people my over know water than call first who may "
          "down side been now find").split()


def _text(rng: np.random.Generator, n_bytes: int) -> str:
  words, size = [], 0
  while size < n_bytes:
    w = _WORDS[rng.integers(len(_WORDS))]
    words.append(w)
    size += len(w) + 1
  return " ".join(words)[:max(n_bytes, 1)]


def synthetic_log(path: str, num_records: int, seed: int = 0,
                  prompt_median: float = 100, response_median: float = 80) -> str:
  """Writes a JSONL log whose byte lengths are log-normal (sigma 0.9 / 0.8)."""
  rng = np.random.default_rng(seed)
  p_len = np.clip(rng.lognormal(np.log(prompt_median), 0.9, num_records), 8, 4000)
  r_len = np.clip(rng.lognormal(np.log(response_median), 0.8, num_records), 1, 4000)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(num_records):
      rec = {"id": i, "prompt": _text(rng, int(p_len[i])),
             "response": _text(rng, int(r_len[i]))}
      if i % 2:
        rec["label"] = bool(rng.integers(2))
      else:
        rec["reward"] = float(rng.normal())
      f.write(json.dumps(rec) + "\n")
  return path


def token_efficiency(batches) -> Dict[str, float]:
  """Non-padding fraction of encoder/decoder token slots over the batches."""
  enc = dec = enc_slots = dec_slots = examples = 0
  for b in batches:
    enc += int((b["encoder_input_tokens"] != 0).sum())
    dec += int((b["decoder_loss_weights"] != 0).sum())
    enc_slots += b["encoder_input_tokens"].size
    dec_slots += b["decoder_target_tokens"].size
    examples += (int(b["segment_weights"].sum()) if "segment_weights" in b
                 else b["rewards"].shape[0])
  return {"encoder": enc / enc_slots, "decoder": dec / dec_slots,
          "total": (enc + dec) / (enc_slots + dec_slots), "examples": examples,
          "rows": enc_slots // b["encoder_input_tokens"].shape[-1]}


def run(args) -> Dict[str, Dict[str, float]]:
  """Runs the benchmark; returns the figures per converter."""
  tmp = None
  log = args.log
  if not log:
    tmp = tempfile.mkdtemp()
    log = synthetic_log(os.path.join(tmp, "synthetic.jsonl"), args.num_records)
  try:
    return _run(args, log)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def _run(args, log: str):
  # Imported here so `--help` stays fast.
  import seqio  # pylint: disable=g-import-not-at-top
  from dro_jax.data import tasks as dtasks  # pylint: disable=g-import-not-at-top
  from dro_jax.data.converters import (  # pylint: disable=g-import-not-at-top
      DROFeatureConverter, PackedDROFeatureConverter)

  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  vocab = dtasks.get_vocabulary(args.vocabulary)
  results = {}
  for label, conv in (("unpacked", lambda: DROFeatureConverter(pack=False)),
                      ("packed", lambda: PackedDROFeatureConverter(
                          max_segments=args.max_segments))):
    name = f"dro_bench_{label}"
    t0 = time.perf_counter()
    dtasks.register_feedback_task(name, paths=log, vocabulary=vocab, overwrite=True)
    ds = seqio.get_dataset(name, task_feature_lengths=lengths, dataset_split="train",
                           shuffle=True, seed=0, feature_converter=conv())
    batches = list(ds.batch(args.batch_size).as_numpy_iterator())
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()  # steady state: the log is parsed and cached
    # A second get_dataset of the task warns about truncation again; once per task is enough.
    with io_utils.without_absl_messages("longer than the feature lengths"):
      ds = seqio.get_dataset(name, task_feature_lengths=lengths, dataset_split="train",
                             shuffle=True, seed=1, feature_converter=conv())
    n_batches = sum(1 for _ in ds.batch(args.batch_size).as_numpy_iterator())
    t_warm = time.perf_counter() - t0
    eff = token_efficiency(batches)
    n = eff["examples"]
    results[label] = dict(eff, cold_examples_per_s=n / t_cold,
                          warm_examples_per_s=n / t_warm, batches=n_batches)
    trunc = dtasks.get_truncation_stats(name)
  results["truncated_examples"] = trunc.truncated if trunc else 0
  return results


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dro_jax.data.bench",
                              description=__doc__.split("\n")[0])
  p.add_argument("--log", default=None, help="JSONL log (default: synthetic)")
  p.add_argument("--num_records", type=int, default=20000)
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_segments", type=int, default=8)
  p.add_argument("--vocabulary", default="byte")
  args = p.parse_args(argv)
  for flag in ("num_records", "inputs_length", "targets_length", "batch_size", "max_segments"):
    if getattr(args, flag) < 1 and not (flag == "num_records" and args.log):
      p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  from dro_jax.data import logs  # pylint: disable=g-import-not-at-top
  try:
    res = run(args)
  except (logs.BadRecordError, ValueError, OSError) as e:  # a bad log or --vocabulary
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  for label in ("unpacked", "packed"):
    r = res[label]
    print(f"{label:9s} examples {r['examples']}  rows {r['rows']}  "
          f"non-pad: encoder {r['encoder']:.1%}  decoder {r['decoder']:.1%}  "
          f"total {r['total']:.1%}  |  examples/s: end-to-end {r['cold_examples_per_s']:.0f}"
          f"  steady {r['warm_examples_per_s']:.0f}")
  u, k = res["unpacked"], res["packed"]
  print(f"packing: {u['rows'] / k['rows']:.2f}x fewer rows, token efficiency "
        f"{u['total']:.1%} -> {k['total']:.1%}; truncated examples: "
        f"{res['truncated_examples']}")


if __name__ == "__main__":
  sys.exit(main())
