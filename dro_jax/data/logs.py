"""Feedback-log reading and validation (DESIGN section 3).

A feedback log is JSONL (optionally gzipped) or TFRecord of tf.train.Example,
one record per line/example. Every bad record raises `BadRecordError`, whose
message is exactly one line `FILE:LINE: field: reason` (LINE is 0 for problems
with a whole file), or, with `on_bad_record="skip"`, is counted in a
`ReadReport` instead.

Accepted record layouts (detected per record with `format="auto"`):
  * feedback / TRL unpaired (standard or conversational, whose message lists
    become text): `prompt`; `response` or `completion`; exactly one
    of `label` (bool), `feedback` (thumbs_up/thumbs_down/up/down) or `reward`
    (finite number); optional `id`, `weight`, `ref_logprob`. Numbers must fit
    float32 (what training casts them to).
  * UltraFeedback original: `instruction` + `completions[].response` /
    `overall_score` -> one record per completion, the score as reward.
  * UltraFeedback binarized: `prompt`, `chosen`/`rejected` message lists,
    `score_chosen`/`score_rejected` -> two records, the score as reward.
Other keys are ignored.
"""
from __future__ import annotations

import collections
import dataclasses
import glob as glob_lib
import gzip
import json
import math
import os
import re
import sys
import time
import unicodedata
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dro_jax import io_utils
from dro_jax.data.rewards import FLOAT32_MAX, RewardMapping

PathsType = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

FORMATS = ("auto", "feedback", "ultrafeedback", "ultrafeedback_binarized")
_FEEDBACK_WORDS = {
    "thumbs_up": True, "up": True, "thumbs_down": False, "down": False,
}
# A summed log-prob is <= 0; allow float round-off from the scorer.
_LOGPROB_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
  """One single-trajectory example (x, y, r).

  `reward` is the mapped reward (thumbs values from `RewardMapping`, scalar
  rewards as given), before any standardisation. `label` is the thumbs
  up/down signal when the record gave one, else None.
  """
  prompt: str
  response: str
  reward: float
  label: Optional[bool] = None
  weight: Optional[float] = None  # None: the record gave none (weight 1)
  id: Optional[str] = None
  ref_logprob: Optional[float] = None
  # (inputs, targets) feature lengths `ref_logprob` was scored at, when the log says
  ref_lengths: Optional[Tuple[int, int]] = None
  source: str = ""
  line: int = 0


class BadRecordError(ValueError):
  """A bad record or log file; str() is one line `FILE:LINE: field: reason`."""

  def __init__(self, source: str, line: int, field: str, reason: str):
    self.source, self.line, self.field, self.reason = source, line, field, reason
    # Keep it one line whatever the file name, key or reason text contains.
    reason = " ".join(str(reason).split())
    super().__init__(f"{_escape_breaks(source)}:{line}: {_escape_breaks(field)}: {reason}")


def _escape_breaks(text: str) -> str:
  # A file name or JSON key may hold a newline; show it escaped, as a Python literal would.
  return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
                 for ch in str(text))


@dataclasses.dataclass
class ReadReport:
  """What a read saw: good records, bad ones counted by `field: reason`."""
  max_examples: int = 5
  files: List[str] = dataclasses.field(default_factory=list)
  lines: int = 0
  records: int = 0
  bad: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  examples: List[str] = dataclasses.field(default_factory=list)

  @property
  def num_bad(self) -> int:
    return sum(self.bad.values())

  def add_bad(self, err: BadRecordError) -> None:
    self.bad[f"{err.field}: {_reason_kind(err.reason)}"] += 1
    if len(self.examples) < self.max_examples:
      self.examples.append(str(err))


def _reason_kind(reason: str) -> str:
  # Group counts by the reason's stable head, not by per-record detail.
  return reason.split(" (")[0]


# ----------------------------------------------------------------------------
# Files


def expand_paths(paths: PathsType) -> List[str]:
  """Expands a path, a glob pattern or a list of them to sorted files, each once.

  A file named twice (also through a link or an overlapping pattern) is refused: its
  records would count twice.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: List[str] = []
  seen: Dict[Any, str] = {}
  for p in paths:
    p = os.fspath(p)
    # `log[1].jsonl` is a file name, not a pattern, when that file exists.
    if any(c in p for c in "*?[") and (_is_remote(p) or not os.path.exists(p)):
      matches = sorted(_glob(p))
      if not matches:
        raise BadRecordError(p, 0, "file", "no file matches this pattern")
    else:
      matches = [p]
    for m in matches:
      key = io_utils.file_key(m)
      if key in seen:
        twice = f"as {seen[key]!r} and {m!r}" if seen[key] != m else "twice"
        raise BadRecordError(m, 0, "file", f"given {twice}; each log file must be read once "
                             "(its records would count twice)")
      seen[key] = m
      out.append(m)
  if not out:
    raise BadRecordError("<paths>", 0, "file", "no log files given")
  return out


def _is_remote(path: str) -> bool:
  return "://" in path


def _glob(pattern: str) -> List[str]:
  """A local `**` matches folders at any depth (as `rglob`); remote patterns are tf.io.gfile's."""
  if _is_remote(pattern):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if "**" in pattern:
      print(f"[data] warning: {pattern}: tf.io.gfile.glob reads '**' as one folder level, not any depth",
            file=sys.stderr)
    return tf.io.gfile.glob(pattern)
  return glob_lib.glob(pattern, recursive=True)


def is_tfrecord(path: str) -> bool:
  name = os.path.basename(path).lower()
  return ".tfrecord" in name or name.endswith((".tfr", ".tfr.gz"))


def _open_binary(path: str, gzipped: Optional[bool] = None):
  """Opens a file as binary, gunzipping when `gzipped` (None: by the gzip magic); one-line errors."""
  try:
    if _is_remote(path):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      f = tf.io.gfile.GFile(path, "rb")
    else:
      if os.path.isdir(path):
        raise BadRecordError(path, 0, "file", "is a directory, not a log file")
      f = open(path, "rb")
    head = f.read(2)
    f.seek(0)
  except BadRecordError:
    raise
  except FileNotFoundError:
    raise BadRecordError(path, 0, "file", "no such file") from None
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecordError(path, 0, "file", f"cannot read ({e})") from None
  if (head == b"\x1f\x8b") if gzipped is None else gzipped:  # gzip magic, whatever the extension says
    return gzip.GzipFile(fileobj=f, mode="rb")
  return f


def _raw_lines(path: str) -> Iterator[tuple]:
  """Yields (line_number, decoded_text or BadRecordError) for non-blank lines."""
  f = _open_binary(path)
  lineno = 0
  try:
    for lineno, raw in enumerate(f, start=1):
      if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 BOM
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield lineno, BadRecordError(
            path, lineno, "record",
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        continue
      text = text.strip()  # CRLF and surrounding whitespace
      if text:
        yield lineno, text
  except (OSError, EOFError, zlib.error) as e:  # e.g. a truncated or corrupt gzip stream
    # the line it was reading: the records before it were read (a cut file ends there)
    raise BadRecordError(path, lineno + 1, "file", f"cannot read ({e})") from None
  finally:
    f.close()


def _json_records(path: str) -> Iterator[tuple]:
  """Yields (line, dict or BadRecordError)."""
  for lineno, text in _raw_lines(path):
    if isinstance(text, BadRecordError):
      yield lineno, text
      continue
    try:
      obj = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
      yield lineno, BadRecordError(
          path, lineno, "record",
          # Some messages already end in "at" ("Unterminated string starting at").
          f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
      continue
    except _DuplicateKeyError as e:
      yield lineno, BadRecordError(path, lineno, _duplicate_path(text, e.key),
                                   "given twice in one record (which one is meant?)")
      continue
    except (ValueError, RecursionError) as e:  # e.g. an integer of over 4300 digits
      yield lineno, BadRecordError(path, lineno, "record", f"invalid JSON ({e})")
      continue
    if not isinstance(obj, dict):
      yield lineno, BadRecordError(
          path, lineno, "record",
          f"expected a JSON object (got {_type_name(obj)})")
      continue
    yield lineno, obj


class _DuplicateKeyError(ValueError):

  def __init__(self, key: str):
    super().__init__(key)
    self.key = key


def _unique_keys(pairs):
  # json.loads keeps the last of repeated keys; a log that repeats `label` is ambiguous.
  out = {}
  for k, v in pairs:
    if k in out:
      raise _DuplicateKeyError(k)
    out[k] = v
  return out


def _duplicate_path(text: str, key: str) -> str:
  """Where the repeated key is (`prompt[0].role`): the hook sees no path, so parse
  again with repeats marked and find the mark (only on this error path)."""
  def mark(pairs):
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    return _DuplicateKeyError(dup) if dup is not None else dict(pairs)

  def find(v, path):
    if isinstance(v, _DuplicateKeyError):
      return f"{path}.{v.key}" if path else v.key
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
      found = find(x, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k)
      if found:
        return found
    return None

  try:
    return find(json.loads(text, object_pairs_hook=mark), "") or key
  except RecursionError:  # absurdly deep nesting: the key alone
    return key


def _tfrecord_records(path: str) -> Iterator[tuple]:
  """Yields (record_number, dict or BadRecordError) from tf.train.Examples."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _is_remote(path) and not os.path.exists(path):
    raise BadRecordError(path, 0, "file", "no such file")
  i = 0
  try:
    ds = tf.data.TFRecordDataset(path, compression_type=_tfrecord_compression(path))
    for i, raw in enumerate(ds.as_numpy_iterator(), start=1):
      try:
        ex = tf.train.Example.FromString(raw)
      except Exception as e:  # pylint: disable=broad-except
        yield i, BadRecordError(path, i, "record", f"not a tf.train.Example ({e})")
        continue
      yield i, _example_to_dict(path, i, ex)
    # TF's reader takes a partial last header, or a gzip stream cut short, as the end of the file.
    cut = _tfrecord_cut_at(path)
    if cut is not None:
      raise BadRecordError(path, cut, "record", "truncated TFRecord (the file ends inside this record)")
  except tf.errors.DataLossError as e:
    # A file cut inside a record's data (TF: "truncated record at N") is a cut, not damage.
    if "truncated record" in e.message and _tfrecord_cut_at(path) is not None:
      raise BadRecordError(path, i + 1, "record",
                           "truncated TFRecord (the file ends inside this record)") from None
    # The reader cannot go past a corrupt record: stop at the one after the last good one.
    raise BadRecordError(path, i + 1, "record",
                         f"corrupt TFRecord ({_tf_message(e)})") from None
  except tf.errors.OpError as e:
    raise BadRecordError(path, 0, "file", f"cannot read TFRecord ({_tf_message(e)})") from None


def _tfrecord_cut_at(path: str) -> Optional[int]:
  """The number of the record a TFRecord file ends inside, or None when it ends between records.

  Reads only the framing (8-byte length, 4-byte CRC, data, 4-byte CRC; TF has checked the CRCs).
  """
  f = _open_binary(path, gzipped=_tfrecord_compression(path) == "GZIP")  # as TF decides, by the name
  n = 0
  try:
    while True:
      header = f.read(12)
      if not header:
        return None
      if len(header) < 12:
        return n + 1
      left = int.from_bytes(header[:8], "little") + 4
      while left:  # in pieces: never one buffer of a (corrupt) huge length
        piece = f.read(min(left, 1 << 20))
        if not piece:
          return n + 1
        left -= len(piece)
      n += 1
  except (EOFError, OSError, zlib.error):  # a gzip stream that ends early or is damaged
    return n + 1
  finally:
    f.close()


def _tf_message(e) -> str:
  # Drop the op names TF wraps around eager errors ({{function_node ...}}, [Op:...]).
  msg = re.sub(r"\{\{function_node .*?\}\}|\[Op:\w+\]|\s*name:\s*$", "", e.message)
  return " ".join(msg.split())


def _tfrecord_compression(path: str) -> str:
  return "GZIP" if path.lower().endswith(".gz") else ""  # as is_tfrecord: any case


def _example_to_dict(path: str, i: int, ex) -> Any:
  """Maps a tf.train.Example onto the JSON record layout."""
  out: Dict[str, Any] = {}
  for key, feat in ex.features.feature.items():
    kind = feat.WhichOneof("kind")
    values = list(getattr(feat, kind).value) if kind else []
    if not values and key in ("id", "weight", "ref_logprob", "ref_logprob_lengths"):
      continue  # an empty optional feature is absent, as JSON's null is
    if key == "ref_logprob_lengths" and kind != "int64_list":  # else dropped, and never checked
      return BadRecordError(path, i, key, f"expected an int64 list [inputs, targets], got a {kind}")
    if key == "ref_logprob_lengths":
      # tf.train.Example has no objects: [inputs, targets], then checked like the JSON form.
      if len(values) != 2:
        return BadRecordError(path, i, key, f"expected 2 values [inputs, targets], got {len(values)}")
      out[key] = {"inputs": values[0], "targets": values[1]}
      continue
    if len(values) != 1:
      if key in ("prompt", "response", "completion", "label", "feedback",
                 "reward", "weight", "ref_logprob", "id"):
        return BadRecordError(path, i, key, f"expected 1 value, got {len(values)}")
      continue
    v = values[0]
    if kind == "bytes_list":
      try:
        v = v.decode("utf-8")
      except UnicodeDecodeError:
        return BadRecordError(path, i, key, "not valid UTF-8")
    elif kind == "int64_list" and key == "label":
      if v not in (0, 1):
        return BadRecordError(path, i, key, f"expected 0 or 1, got {v}")
      v = bool(v)
    out[key] = v
  return out


def raw_records(path: str) -> Iterator[tuple]:
  """Yields (line, decoded dict or BadRecordError) of one JSONL/TFRecord file.

  The undecoded layer under read_feedback_log (BOM, CRLF, blank lines and gzip
  handled), e.g. to write records back out with extra fields.
  """
  reader = _tfrecord_records if is_tfrecord(path) else _json_records
  return reader(path)


# ----------------------------------------------------------------------------
# Record validation


def _type_name(v: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          int: "an integer", float: "a number", type(None): "null"}.get(
              type(v), type(v).__name__)


def _is_blank(text: str) -> bool:
  # Whitespace, control and format characters (zero-width space, BOM) tokenize to nothing.
  return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _check_text(v: str, src, line, key) -> str:
  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode.
  try:
    v.encode("utf-8")
  except UnicodeEncodeError as e:
    raise BadRecordError(src, line, key, f"invalid Unicode (lone surrogate "
                         f"U+{ord(v[e.start]):04X} at character {e.start + 1})") from None
  return v


def _get_str(obj, key, src, line, *, non_empty=False) -> str:
  v = obj[key]
  if not isinstance(v, str):
    raise BadRecordError(src, line, key, f"expected a string, got {_type_name(v)}")
  _check_text(v, src, line, key)
  if non_empty and _is_blank(v):
    raise BadRecordError(src, line, key, "empty (only whitespace or invisible characters)")
  return v


def _get_number(obj, key, src, line) -> float:
  v = obj[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise BadRecordError(src, line, key, f"expected a number, got {_type_name(v)}")
  try:
    v = float(v)
  except OverflowError:
    raise BadRecordError(src, line, key,
                         "not finite (an integer too large for a float)") from None
  if not math.isfinite(v):
    raise BadRecordError(src, line, key, f"not finite ({v})")
  if abs(v) > FLOAT32_MAX:  # training casts to float32, where it would be inf
    raise BadRecordError(src, line, key,
                         f"outside float32's range ({v:g}; |x| <= {FLOAT32_MAX:.2g})")
  return v


def _common_optional(obj, src, line) -> Dict[str, Any]:
  """Parses `id`, `weight`, `ref_logprob`."""
  out: Dict[str, Any] = {}
  if obj.get("id") is not None:
    v = obj["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
      raise BadRecordError(src, line, "id",
                           f"expected a string or integer, got {_type_name(v)}")
    out["id"] = _check_text(str(v), src, line, "id")
  if obj.get("weight") is not None:
    w = _get_number(obj, "weight", src, line)
    if w < 0:
      raise BadRecordError(src, line, "weight", f"negative ({w})")
    out["weight"] = w
  if obj.get("ref_logprob") is not None:
    lp = _get_number(obj, "ref_logprob", src, line)
    if lp > _LOGPROB_TOLERANCE:
      raise BadRecordError(src, line, "ref_logprob",
                           f"a log-probability must be <= 0 (got {lp})")
    out["ref_logprob"] = min(lp, 0.0)
  if obj.get("ref_logprob_lengths") is not None:
    out["ref_lengths"] = _ref_lengths(obj["ref_logprob_lengths"], src, line)
  return out


def _ref_lengths(v, src, line) -> Tuple[int, int]:
  key = "ref_logprob_lengths"
  if not isinstance(v, dict) or set(v) != {"inputs", "targets"}:
    raise BadRecordError(src, line, key, 'expected {"inputs": N, "targets": M} '
                         f"(as dro_jax.score writes), got {json.dumps(v)[:80]}")
  for k in ("inputs", "targets"):
    if isinstance(v[k], bool) or not isinstance(v[k], int) or v[k] < 1:
      raise BadRecordError(src, line, f"{key}.{k}", f"expected a positive integer, got {v[k]!r}")
  return v["inputs"], v["targets"]


def stale_ref_logprobs(input_lengths: np.ndarray, target_lengths: np.ndarray,
                       ref_lengths: np.ndarray, lengths: Dict[str, Optional[int]]) -> np.ndarray:
  """Indices of records whose `ref_logprob` is stale at feature `lengths`.

  input_lengths, target_lengths: int [N] tokens with EOS; ref_lengths: int [N, 2], the
  (inputs, targets) lengths each was scored at, 0 where the log does not say. A score is
  stale when those lengths cut the prompt or the response differently from `lengths` (a
  feature whose length is None is not checked); records short enough for both are fine.
  """
  known = ref_lengths[:, 0] > 0
  differs = np.zeros(len(ref_lengths), bool)
  for col, key, n in ((0, "inputs", input_lengths), (1, "targets", target_lengths)):
    if lengths.get(key) is not None:
      differs |= np.minimum(n, ref_lengths[:, col]) != np.minimum(n, lengths[key])
  return np.flatnonzero(known & differs)


def check_ref_logprob_lengths(records: Sequence[FeedbackRecord], input_lengths: np.ndarray,
                              target_lengths: np.ndarray, lengths: Dict[str, Optional[int]]) -> None:
  """BadRecordError naming the first of `records` whose ref_logprob is stale at `lengths`."""
  ref_lengths = np.array([r.ref_lengths or (0, 0) for r in records], np.int64).reshape(-1, 2)
  stale = stale_ref_logprobs(input_lengths, target_lengths, ref_lengths, lengths)
  if stale.size:
    r = records[int(stale[0])]
    raise stale_ref_logprob_error(r.source, r.line, r.ref_lengths, lengths, stale.size)


def stale_ref_logprob_error(source: str, line: int, scored: Tuple[int, int],
                            lengths: Dict[str, Optional[int]], count: int) -> BadRecordError:
  now = {k: lengths.get(k) or s for k, s in zip(("inputs", "targets"), scored)}
  return BadRecordError(
      source, line, "ref_logprob",
      f"scored at inputs={scored[0]}, targets={scored[1]} tokens, but inputs={now['inputs']}, "
      f"targets={now['targets']} cut {count} record(s) differently (this is the first); score the log "
      f"again at these lengths (python -m dro_jax.score "
      f"--inputs_length={now['inputs']} --targets_length={now['targets']})")


def _parse_feedback(obj, src, line, mapping: RewardMapping) -> List[FeedbackRecord]:
  """The plain feedback layout (also TRL's unpaired one)."""
  if "prompt" not in obj:
    raise BadRecordError(src, line, "prompt", "missing")
  if _is_message_list(obj["prompt"]):  # TRL's conversational layout
    prompt = _messages_to_text(obj["prompt"], src, line)
  else:
    prompt = _get_str(obj, "prompt", src, line, non_empty=True)
  has_resp, has_comp = "response" in obj, "completion" in obj
  if not has_resp and not has_comp:
    raise BadRecordError(src, line, "response",
                         "missing (expected 'response' or 'completion')")
  if has_resp and has_comp and obj["response"] != obj["completion"]:
    raise BadRecordError(src, line, "response",
                         "both 'response' and 'completion' given and they differ")
  key = "response" if has_resp else "completion"
  if _is_message_list(obj[key]):
    if len(obj[key]) > 1:  # earlier turns would be lost
      raise BadRecordError(src, line, key, f"{len(obj[key])} messages (a response is one assistant "
                           "message; earlier turns belong in the prompt)")
    response = _last_assistant(obj[key], key, src, line)
  else:
    response = _get_str(obj, key, src, line)

  signals = [k for k in ("label", "feedback", "reward") if k in obj]
  if not signals:
    raise BadRecordError(src, line, "label",
                         "missing (expected one of 'label', 'feedback', 'reward')")
  if len(signals) > 1:
    raise BadRecordError(src, line, signals[1],
                         f"conflicting feedback: {' and '.join(signals)} both "
                         "given (expected exactly one)")
  label: Optional[bool] = None
  if "label" in obj:
    if not isinstance(obj["label"], bool):
      raise BadRecordError(src, line, "label",
                           f"expected true or false, got {_type_name(obj['label'])}")
    label = obj["label"]
  elif "feedback" in obj:
    word = _get_str(obj, "feedback", src, line)
    key = "_".join(word.lower().replace("-", " ").split())  # "Thumbs Up" -> thumbs_up
    if key not in _FEEDBACK_WORDS:
      raise BadRecordError(
          src, line, "feedback",
          f"unknown value {word!r} (expected thumbs_up, thumbs_down, up or down)")
    label = _FEEDBACK_WORDS[key]
  if label is not None:
    reward = mapping.thumbs_up if label else mapping.thumbs_down
  else:
    reward = _get_number(obj, "reward", src, line)
  return [FeedbackRecord(prompt=prompt, response=response, reward=reward,
                         label=label, source=src, line=line,
                         **_common_optional(obj, src, line))]


def _is_message_list(v) -> bool:
  return isinstance(v, list) and bool(v) and all(isinstance(m, dict) for m in v)


def _messages_to_text(messages, src, line, field="prompt") -> str:
  """A conversational prompt as T5 input text: one user message is its content; a longer
  conversation is one `role: content` line per message (T5 has no chat template)."""
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
      raise BadRecordError(src, line, f"{field}[{k}]",
                           "expected a message object with string 'role' and 'content'")
    _check_text(m["role"], src, line, f"{field}[{k}].role")
    _check_text(m["content"], src, line, f"{field}[{k}].content")
  if len(messages) == 1 and messages[0]["role"] == "user":
    text = messages[0]["content"]
  else:
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
  if all(_is_blank(m["content"]) for m in messages):  # the `role:` labels alone say nothing
    raise BadRecordError(src, line, field, "empty (only whitespace or invisible characters)")
  return text


def _conversation(messages, prompt, side, src, line) -> Tuple[str, str]:
  """(prompt text, answer) of a binarized side: the last message is the answer; the messages
  before it are `prompt` alone, or a longer conversation holding it, which becomes the prompt
  text (nothing is dropped)."""
  answer = _last_assistant(messages, side, src, line)
  context = messages[:-1]
  if not context:
    return prompt, answer
  text = _messages_to_text(context, src, line, side)
  if text == prompt:
    return prompt, answer
  if not any(m["role"] == "user" and m["content"] == prompt for m in context):
    raise BadRecordError(src, line, side, "the messages before the answer do not hold the record's "
                         "'prompt' as a user message (another conversation?)")
  return text, answer


def _layout_optional(obj, src, line) -> Dict[str, Any]:
  """`id` and `weight` of an UltraFeedback line (for each of its examples); its reference scores
  are refused: `dro_jax.score` writes such lines as flat records, one per example."""
  opt = _common_optional(obj, src, line)
  for key, name in (("ref_logprob", "ref_logprob"), ("ref_lengths", "ref_logprob_lengths")):
    if key in opt:
      raise BadRecordError(src, line, name, "not read in the UltraFeedback layouts (a line holds several "
                           "responses); score the log with dro_jax.score, which writes one flat record each")
  return opt


def _last_assistant(messages, key, src, line) -> str:
  if not isinstance(messages, list) or not messages:
    raise BadRecordError(src, line, key, "expected a non-empty message list")
  last = messages[-1]
  if not isinstance(last, dict) or not isinstance(last.get("content"), str):
    raise BadRecordError(src, line, key, "last message has no string 'content'")
  _check_text(last["content"], src, line, f"{key}[-1].content")
  if last.get("role", "assistant") != "assistant":
    raise BadRecordError(src, line, key,
                         f"last message is from {last.get('role')!r}, not the assistant")
  return last["content"]


def _parse_uf_binarized(obj, src, line) -> List[FeedbackRecord]:
  """UltraFeedback binarized: one record per answer, the score as reward."""
  if "prompt" not in obj:
    raise BadRecordError(src, line, "prompt", "missing")
  prompt = _get_str(obj, "prompt", src, line, non_empty=True)
  opt = _layout_optional(obj, src, line)
  base = opt.pop("id", None)
  if base is None:
    base = obj.get("prompt_id")
  if base is not None:
    if isinstance(base, bool) or not isinstance(base, (str, int)):
      raise BadRecordError(src, line, "prompt_id",
                           f"expected a string or integer, got {_type_name(base)}")
    base = _check_text(str(base), src, line, "prompt_id")
  out = []
  for side in ("chosen", "rejected"):
    if side not in obj:
      raise BadRecordError(src, line, side, "missing")
    score_key = f"score_{side}"
    if score_key not in obj:
      raise BadRecordError(src, line, score_key, "missing")
    text, answer = _conversation(obj[side], prompt, side, src, line)
    out.append(FeedbackRecord(
        prompt=text, response=answer,
        reward=_get_number(obj, score_key, src, line), source=src, line=line,
        id=f"{base}/{side}" if base is not None else None, **opt))
  return out


def _parse_uf_original(obj, src, line) -> List[FeedbackRecord]:
  """UltraFeedback original: one record per completion."""
  if "instruction" not in obj:
    raise BadRecordError(src, line, "instruction", "missing")
  prompt = _get_str(obj, "instruction", src, line, non_empty=True)
  opt = _layout_optional(obj, src, line)
  base = opt.pop("id", f"{src}:{line}")  # the file too: line numbers repeat across files
  comps = obj.get("completions")
  if not isinstance(comps, list) or not comps:
    raise BadRecordError(src, line, "completions", "expected a non-empty list")
  out = []
  for k, c in enumerate(comps):
    field = f"completions[{k}]"
    if not isinstance(c, dict):
      raise BadRecordError(src, line, field, f"expected an object, got {_type_name(c)}")
    for key in ("response", "overall_score"):
      if key not in c:
        raise BadRecordError(src, line, f"{field}.{key}", "missing")
    if not isinstance(c["response"], str):
      raise BadRecordError(src, line, f"{field}.response",
                           f"expected a string, got {_type_name(c['response'])}")
    _check_text(c["response"], src, line, f"{field}.response")
    try:
      score = _get_number(c, "overall_score", src, line)
    except BadRecordError as e:
      raise BadRecordError(src, line, f"{field}.overall_score", e.reason) from None
    out.append(FeedbackRecord(prompt=prompt, response=c["response"], reward=score,
                              source=src, line=line, id=f"{base}/{k}", **opt))
  return out


def parse_record(obj: Dict[str, Any], source: str, line: int, *,
                 reward_mapping: RewardMapping = RewardMapping(),
                 format: str = "auto") -> List[FeedbackRecord]:  # pylint: disable=redefined-builtin
  """Validates one decoded record; returns its examples or raises BadRecordError."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if format == "auto":
    # A plain record may carry unrelated keys (e.g. `chosen`); its own keys decide first.
    if (("response" in obj or "completion" in obj)
        and any(k in obj for k in ("label", "feedback", "reward"))):
      format = "feedback"
    elif "instruction" in obj and "completions" in obj:
      format = "ultrafeedback"
    elif "chosen" in obj and "rejected" in obj:
      format = "ultrafeedback_binarized"
    else:
      format = "feedback"
  if format == "ultrafeedback":
    return _parse_uf_original(obj, source, line)
  if format == "ultrafeedback_binarized":
    return _parse_uf_binarized(obj, source, line)
  return _parse_feedback(obj, source, line, reward_mapping)


# ----------------------------------------------------------------------------
# Public reader


def read_feedback_log(
    paths: PathsType, *,
    on_bad_record: str = "error",
    reward_mapping: RewardMapping = RewardMapping(),
    report: Optional[ReadReport] = None,
    format: str = "auto",  # pylint: disable=redefined-builtin
) -> Iterator[FeedbackRecord]:
  """Yields the validated records of one or more logs, in file order.

  Args:
    paths: a file, a glob pattern or a list of them (JSONL, JSONL.gz, TFRecord
      when the name contains `.tfrecord`).
    on_bad_record: "error" raises the first BadRecordError; "skip" counts bad
      records (and empty files) in `report` and goes on.
    reward_mapping: thumbs up/down values. Standardisation is NOT applied here
      (it needs statistics over the whole log; see rewards.RewardStats).
    report: optional ReadReport, filled as the records are read.
    format: "auto" (detect per record) or one of FORMATS.

  Raises:
    BadRecordError: a bad record (error mode) or a missing/unreadable/empty file.
  """
  if on_bad_record not in ("error", "skip"):
    raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
  report = report if report is not None else ReadReport()
  for path in expand_paths(paths):
    report.files.append(path)
    n_lines = 0
    for line, obj in raw_records(path):
      n_lines += 1
      report.lines += 1
      try:
        if isinstance(obj, BadRecordError):
          raise obj
        recs = parse_record(obj, path, line, reward_mapping=reward_mapping,
                            format=format)
      except BadRecordError as e:
        if on_bad_record == "error":
          raise
        report.add_bad(e)
        continue
      report.records += len(recs)
      yield from recs
    if n_lines == 0:
      err = BadRecordError(path, 0, "file", "empty log (no records)")
      if on_bad_record == "error":
        raise err
      report.add_bad(err)


PROGRESS_EVERY_S = 10.0


def load_feedback_log(paths: PathsType, **kwargs) -> List[FeedbackRecord]:
  """Reads a whole log into a list; errors when no usable record remains. A long read (a log of
  millions of records takes minutes) says how far it got on stderr every PROGRESS_EVERY_S."""
  report = kwargs.setdefault("report", ReadReport())
  records = []
  t0 = last = time.monotonic()
  for record in read_feedback_log(paths, **kwargs):
    records.append(record)
    if len(records) % 1024 == 0 and time.monotonic() - last >= PROGRESS_EVERY_S:
      last = time.monotonic()
      print(f"[data] reading {record.source}: {len(records):,} records so far "
            f"({len(records) / (last - t0):,.0f} records/s)", file=sys.stderr, flush=True)
  if not records:
    first = report.files[0] if report.files else "<paths>"
    why = f": {dict(report.bad)}; the first: {report.examples[0]}" if report.examples else ""
    raise BadRecordError(first, 0, "file", f"no usable records ({report.num_bad} bad{why})")
  return records


def check_ref_logprobs(records: Iterable[FeedbackRecord]) -> bool:
  """True if every record has ref_logprob, False if none; else BadRecordError."""
  has = missing = None
  for r in records:
    if r.ref_logprob is None:
      missing = missing or r
    else:
      has = has or r
    if has and missing:
      raise BadRecordError(
          missing.source, missing.line, "ref_logprob",
          f"missing, but {has.source}:{has.line} has one (all records or none "
          "must carry ref_logprob; re-score the whole log)")
  return has is not None
