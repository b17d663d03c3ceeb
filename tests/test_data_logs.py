"""Feedback-log reader and the validate CLI: malformed corpus, awkward logs, formats."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio

from dro_jax.data import logs
from dro_jax.data.rewards import RewardMapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "tests", "data", "logs")
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

# fixture -> (line, field, reason head). Each bad file has good lines around the bad one.
MALFORMED = {
    "bad_broken_json.jsonl": (2, "record", "invalid JSON"),
    "bad_not_object.jsonl": (2, "record", "expected a JSON object"),
    "bad_missing_prompt.jsonl": (2, "prompt", "missing"),
    "bad_missing_response.jsonl": (2, "response", "missing"),
    "bad_missing_feedback.jsonl": (2, "label", "missing"),
    "bad_empty_prompt.jsonl": (2, "prompt", "empty"),
    "bad_nan_reward.jsonl": (2, "reward", "not finite"),
    "bad_inf_reward.jsonl": (2, "reward", "not finite"),
    "bad_unknown_feedback.jsonl": (2, "feedback", "unknown value 'meh'"),
    "bad_wrong_type_label.jsonl": (2, "label", "expected true or false"),
    "bad_wrong_type_prompt.jsonl": (2, "prompt", "expected a string"),
    "bad_wrong_type_reward.jsonl": (2, "reward", "expected a number"),
    "bad_wrong_type_response.jsonl": (2, "response", "expected a string"),
    "bad_conflicting_feedback.jsonl": (2, "reward", "conflicting feedback"),
    "bad_positive_ref_logprob.jsonl": (2, "ref_logprob", "a log-probability must be <= 0"),
    "bad_non_utf8.jsonl": (2, "record", "not valid UTF-8"),
    "bad_empty.jsonl": (0, "file", "empty log"),
    "bad_lone_surrogate.jsonl": (2, "prompt", "invalid Unicode"),
    "bad_huge_integer_reward.jsonl": (2, "reward", "not finite"),
    "bad_duplicate_key.jsonl": (2, "label", "given twice"),
    "bad_invisible_prompt.jsonl": (2, "prompt", "empty"),
}


def _expected(name):
  line, field, reason = MALFORMED[name]
  return f"{os.path.join(LOGS, name)}:{line}: {field}: {reason}"


def test_corpus_is_complete():
  on_disk = {f for f in os.listdir(LOGS) if f.startswith("bad_")}
  assert on_disk == set(MALFORMED)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_error_mode(name):
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(os.path.join(LOGS, name)))
  msg = str(e.value)
  assert msg.startswith(_expected(name)), msg
  assert "\n" not in msg


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_skip_mode_counts(name):
  report = logs.ReadReport()
  recs = list(logs.read_feedback_log(os.path.join(LOGS, name), on_bad_record="skip",
                                     report=report))
  assert report.num_bad == 1
  assert len(recs) == (0 if name == "bad_empty.jsonl" else 2)
  line, field, reason = MALFORMED[name]
  (key,) = report.bad
  assert key.startswith(f"{field}: ") and reason.split(" '")[0] in key
  assert report.examples[0].startswith(_expected(name))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "dro_jax.data.validate", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_error_mode_one_line_per_malformed_log():
  for name in sorted(MALFORMED):
    p = _cli(os.path.join(LOGS, name))
    assert p.returncode == 1, (name, p.stdout, p.stderr)
    assert p.stderr.strip().startswith(_expected(name)), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_cli_skip_mode_counts_all_bad_records():
  bad = [os.path.join(LOGS, n) for n in sorted(MALFORMED)]
  p = _cli(*bad, "--on_bad_record=skip")
  assert p.returncode == 0, p.stderr
  assert f"bad records: {len(MALFORMED)}" in p.stdout
  assert f"records: {2 * (len(MALFORMED) - 1)}" in p.stdout
  assert "Traceback" not in p.stderr + p.stdout
  # Only empty/bad input: unusable, non-zero, still no traceback.
  p = _cli(os.path.join(LOGS, "bad_empty.jsonl"), "--on_bad_record=skip")
  assert p.returncode == 1 and "no usable records" in p.stderr
  assert "Traceback" not in p.stderr


def test_cli_missing_file_and_summary():
  p = _cli(os.path.join(LOGS, "nope.jsonl"))
  assert p.returncode == 1
  assert p.stderr.strip() == f"{os.path.join(LOGS, 'nope.jsonl')}:0: file: no such file"
  p = _cli(os.path.join(LOGS, "ok_long_record.jsonl"), "--inputs_length=64",
           "--targets_length=64")
  assert p.returncode == 0, p.stderr
  assert "records: 3" in p.stdout and "thumbs up 2" in p.stdout
  assert "examples truncated (inputs or targets): 1" in p.stdout


def test_awkward_but_valid_logs():
  recs = list(logs.read_feedback_log(os.path.join(LOGS, "ok_bom_crlf_blank.jsonl")))
  assert [r.prompt for r in recs] == ["What is 1 + 1?", "Greet Bo.", "Café ☕?"]
  assert [r.line for r in recs] == [1, 4, 6]
  assert [r.reward for r in recs] == [1.0, -1.0, 0.5]
  assert [r.label for r in recs] == [True, False, None]
  assert recs[2].response == "Oui 😀"
  long = list(logs.read_feedback_log(os.path.join(LOGS, "ok_long_record.jsonl")))
  assert len(long) == 3 and len(long[1].response) == 18 * 300


def test_reward_mapping_and_optional_fields(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "a", "response": "b", "feedback": "Thumbs_Up", "id": 7, "weight": 2},
      {"prompt": "a", "completion": "c", "feedback": "down", "ref_logprob": -3.5},
      {"prompt": "a", "response": "d", "reward": 3, "other": [1]},
      {"prompt": "a", "response": "e", "feedback": " Thumbs Up "},
      {"prompt": "a", "response": "f", "feedback": "thumbs-down"},
  ]))
  recs = list(logs.read_feedback_log(
      str(p), reward_mapping=RewardMapping(thumbs_up=2.0, thumbs_down=-0.5)))
  assert [r.reward for r in recs] == [2.0, -0.5, 3.0, 2.0, -0.5]
  assert recs[0].id == "7" and recs[0].weight == 2.0 and recs[1].ref_logprob == -3.5
  assert recs[1].weight is None  # not given: weighs 1
  assert recs[2].label is None and recs[2].source == str(p) and recs[2].line == 3


def test_mixed_ref_logprobs_rejected(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text('{"prompt": "a", "response": "b", "label": true, "ref_logprob": -1}\n'
               '{"prompt": "a", "response": "c", "label": false}\n')
  with pytest.raises(logs.BadRecordError, match=r"log.jsonl:2: ref_logprob: missing"):
    logs.check_ref_logprobs(logs.read_feedback_log(str(p)))


def test_gzip_glob_and_tfrecord(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = os.path.join(LOGS, "ok_bom_crlf_blank.jsonl")
  with open(src, "rb") as f, gzip.open(tmp_path / "a.jsonl.gz", "wb") as g:
    g.write(f.read())
  shutil.copy(os.path.join(LOGS, "ok_long_record.jsonl"), tmp_path / "b.jsonl")
  recs = list(logs.read_feedback_log(str(tmp_path / "*.jsonl*")))
  assert len(recs) == 6 and recs[0].prompt == "What is 1 + 1?"
  # `**` is any depth of folders, this one included (Python's plain glob read it as `*`)
  os.makedirs(tmp_path / "day1" / "shard0")
  shutil.copy(tmp_path / "b.jsonl", tmp_path / "day1" / "shard0" / "c.jsonl")
  assert logs.expand_paths(str(tmp_path / "**" / "*.jsonl")) == [
      str(tmp_path / "b.jsonl"), str(tmp_path / "day1" / "shard0" / "c.jsonl")]

  feats = lambda **kw: tf.train.Example(features=tf.train.Features(feature=kw))
  b = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode()]))
  i = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
  fl = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
  path = str(tmp_path / "log.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    w.write(feats(prompt=b("p"), response=b("r"), label=i(1)).SerializeToString())
    w.write(feats(prompt=b("p"), completion=b("s"), reward=fl(0.25)).SerializeToString())
    w.write(feats(prompt=b(""), response=b("r"), label=i(0)).SerializeToString())
  with pytest.raises(logs.BadRecordError, match=r"log.tfrecord:3: prompt: empty"):
    list(logs.read_feedback_log(path))
  recs = list(logs.read_feedback_log(path, on_bad_record="skip"))
  assert [(r.response, r.reward, r.label) for r in recs] == [("r", 1.0, True),
                                                             ("s", 0.25, None)]
  gz = str(tmp_path / "log.tfr.gz")  # a gzipped TFRecord by its name
  with tf.io.TFRecordWriter(gz, options="GZIP") as w:
    w.write(feats(prompt=b("p"), response=b("r"), label=i(1)).SerializeToString())
  assert [(r.response, r.label) for r in logs.read_feedback_log(gz)] == [("r", True)]
  with pytest.raises(logs.BadRecordError, match=r"nomatch\*:0: file: no file matches"):
    list(logs.read_feedback_log(str(tmp_path / "nomatch*")))


def test_shared_samples_parse_into_triplets():
  trl = list(logs.read_feedback_log(os.path.join(SHARED, "trl_unpaired_sample.jsonl")))
  assert [(r.prompt, r.response, r.reward, r.label) for r in trl] == [
      ("Is the sky blue?", "Yes, on a clear day.", 1.0, True),
      ("Is the sky blue?", "The sky is green.", -1.0, False),
      ("Spell 'cat' backwards.", "tac", 1.0, True)]
  binar = list(logs.read_feedback_log(
      os.path.join(SHARED, "ultrafeedback_binarized_sample.jsonl")))
  assert [(r.prompt, r.response, r.reward) for r in binar[:2]] == [
      ("Give me a two-word name for a cat.", "Captain Whiskers", 8.5),
      ("Give me a two-word name for a cat.",
       "Cats are mammals that many people keep as pets.", 3.0)]
  assert len(binar) == 6 and binar[3].reward == 2.0 and binar[3].id == "p002/rejected"
  orig = list(logs.read_feedback_log(
      os.path.join(SHARED, "ultrafeedback_original_sample.jsonl")))
  assert len(orig) == 8
  assert [(r.response, r.reward) for r in orig[:2]] == [("13", 9.0), ("15", 2.0)]
  assert orig[4].prompt == "Write a haiku about rain." and orig[7].reward == 7.5
  assert all(r.label is None for r in binar + orig)


def test_trl_conversational_unpaired_layout(tmp_path):
  p = tmp_path / "conv.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": [{"role": "user", "content": "Is the sky blue?"}],
       "completion": [{"role": "assistant", "content": "Yes."}], "label": True},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
       "completion": [{"role": "assistant", "content": "Hello"}], "label": False},
      {"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "x"}], "label": True},
      {"prompt": [], "completion": [{"role": "assistant", "content": "x"}], "label": True},
      {"prompt": "q", "completion": [{"role": "user", "content": "x"}], "label": True},
      # messages with nothing in them: only the `role:` labels would be left
      {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "  "}],
       "completion": [{"role": "assistant", "content": "x"}], "label": True},
  ]) + "\n")
  report = logs.ReadReport()
  recs = list(logs.read_feedback_log(str(p), on_bad_record="skip", report=report))
  assert [(r.prompt, r.response, r.label) for r in recs] == [
      ("Is the sky blue?", "Yes.", True), ("system: Be brief.\nuser: Hi", "Hello", False)]
  assert report.examples == [
      f"{p}:3: prompt[0]: expected a message object with string 'role' and 'content'",
      f"{p}:4: prompt: expected a string, got a list",
      f"{p}:5: completion: last message is from 'user', not the assistant",
      f"{p}:6: prompt: empty (only whitespace or invisible characters)"]


@pytest.mark.parametrize("record,field", [
    ({"prompt": "a", "response": "b", "reward": 1e39}, "reward"),
    ({"prompt": "a", "response": "b", "reward": -(10 ** 40)}, "reward"),
    ({"prompt": "a", "response": "b", "label": True, "weight": 1e39}, "weight"),
    ({"prompt": "a", "response": "b", "label": True, "ref_logprob": -1e39}, "ref_logprob"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "score_chosen": 1e39,
      "rejected": [{"role": "assistant", "content": "y"}], "score_rejected": 1}, "score_chosen"),
    ({"instruction": "a", "completions": [{"response": "x", "overall_score": 1e39}]},
     "completions[0].overall_score"),
])
def test_numbers_beyond_float32_refused(tmp_path, record, field):
  # Finite in float64 but inf once training casts them to float32.
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({"prompt": "a", "response": "b", "reward": 3.4e38}) + "\n"
               + json.dumps(record) + "\n")
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(str(p)))
  assert str(e.value).startswith(f"{p}:2: {field}: outside float32's range ("), str(e.value)
  with pytest.raises(ValueError, match="float32"):
    RewardMapping(thumbs_up=1e39)


def test_plain_record_with_extra_chosen_rejected_is_feedback(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({"prompt": "a", "completion": "b", "label": False,
                           "chosen": "x", "rejected": "y"}) + "\n")
  assert [(r.response, r.label) for r in logs.read_feedback_log(str(p))] == [("b", False)]
  with pytest.raises(logs.BadRecordError, match=r"log.jsonl:1: score_chosen: missing"):
    list(logs.read_feedback_log(str(p), format="ultrafeedback_binarized"))


def test_json_error_wording_and_nested_duplicate_path(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text('{"prompt": "a, "response": "b", "label": true}\n'
               '{"prompt": [{"role": "user", "role": "x", "content": "q"}], '
               '"response": "b", "label": true}\n'
               '{"prompt": [{"role": "user", "content": "q"}], "response": "b", '
               '"label": true, "label": false}\n')
  report = logs.ReadReport()
  list(logs.read_feedback_log(str(p), on_bad_record="skip", report=report))
  assert report.examples == [
      f"{p}:1: record: invalid JSON (Expecting ',' delimiter at column 17)",
      f"{p}:2: prompt[0].role: given twice in one record (which one is meant?)",
      f"{p}:3: label: given twice in one record (which one is meant?)"]
  p.write_text('{"prompt": "a\n')
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(str(p)))
  assert str(e.value) == f"{p}:1: record: invalid JSON (Unterminated string starting at column 12)"


def test_corrupt_tfrecord_names_file_and_record(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ex = tf.train.Example(features=tf.train.Features(feature={
      "prompt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"p"])),
      "response": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"r"])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))})).SerializeToString()
  path = str(tmp_path / "log.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for _ in range(3):
      w.write(ex)
  data = open(path, "rb").read()
  n = len(data) // 3  # flip one payload byte of record 2: its CRC no longer matches
  with open(path, "wb") as f:
    f.write(data[:n + 14] + bytes([data[n + 14] ^ 0xFF]) + data[n + 15:])
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(path, on_bad_record="skip"))
  msg = str(e.value)
  assert msg.startswith(f"{path}:2: record: corrupt TFRecord (corrupted record at "), msg
  assert "function_node" not in msg and "[Op:" not in msg and "\n" not in msg


def test_cli_counts_empty_responses(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text("".join(json.dumps({"prompt": "a", "response": r, "label": True}) + "\n"
                       for r in ("", " \u200b", "ok")))
  out = _cli(str(p))
  assert out.returncode == 0, out.stderr
  assert "empty responses (blank or invisible only): 2 of 3" in out.stdout


@pytest.mark.parametrize("value,field", [
    ([16, 32], "ref_logprob_lengths"),
    ({"inputs": 16}, "ref_logprob_lengths"),
    ({"inputs": 16, "targets": 0}, "ref_logprob_lengths.targets"),
    ({"inputs": 16.0, "targets": 32}, "ref_logprob_lengths.inputs"),
])
def test_bad_ref_logprob_lengths_name_the_field(tmp_path, value, field):
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({"prompt": "a", "response": "b", "label": True, "ref_logprob": -1.0,
                           "ref_logprob_lengths": {"inputs": 16, "targets": 32}}) + "\n"
               + json.dumps({"prompt": "a", "response": "b", "label": True, "ref_logprob": -1.0,
                             "ref_logprob_lengths": value}) + "\n")
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(str(p)))
  assert str(e.value).startswith(f"{p}:2: {field}: "), str(e.value)


def test_stale_ref_logprobs_are_those_cut_differently():
  # token counts with EOS; scored at (inputs, targets); 0 = not recorded
  inputs = np.array([5, 20, 5, 5, 40, 5])
  targets = np.array([5, 5, 50, 10, 5, 70])
  scored = np.array([[16, 32], [16, 32], [16, 32], [16, 8], [0, 0], [16, 64]])
  lengths = {"inputs": 32, "targets": 64}
  # 0: short enough for both; 1: prompt cut at 16, not at 32; 2: response fits 64, not 32;
  # 3: response cut at 8 before; 4: unknown; 5: cut at 64 both times
  assert logs.stale_ref_logprobs(inputs, targets, scored, lengths).tolist() == [1, 2, 3]
  # a length of None is not checked
  assert logs.stale_ref_logprobs(inputs, targets, scored, {"inputs": 8, "targets": None}).tolist() == [1]


def test_validate_reports_scoring_lengths_and_refuses_stale_scores(tmp_path, capsys):
  from dro_jax.data import validate

  at = {"inputs": 8, "targets": 8}
  p = tmp_path / "scored.jsonl"
  p.write_text("".join(json.dumps(r) + "\n" for r in [
      {"prompt": "ab", "response": "c", "label": True, "ref_logprob": -1.5, "ref_logprob_lengths": at},
      {"prompt": "x", "response": "a long reply", "label": False, "ref_logprob": -9.0, "ref_logprob_lengths": at}]))
  assert validate.main([str(p), "--inputs_length=8", "--targets_length=8"]) == 0
  assert "  scored at (inputs, targets): (8, 8): 2" in capsys.readouterr().out
  assert validate.main([str(p), "--inputs_length=8", "--targets_length=16"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"{p}:2: ref_logprob: scored at inputs=8, targets=8 tokens"), err
  # one length given: only that feature is checked, and the advice keeps the other as scored
  assert validate.main([str(p), "--targets_length=8"]) == 0
  capsys.readouterr()
  assert validate.main([str(p), "--targets_length=16"]) == 1
  assert "--inputs_length=8 --targets_length=16" in capsys.readouterr().err


def test_awkward_file_names_and_streams_get_one_line(tmp_path):
  """A literal `[` in a name, a newline in a key, a corrupt gzip stream, a file given twice."""
  good = json.dumps({"prompt": "a", "response": "b", "label": True}) + "\n"
  bracket = tmp_path / "log[1].jsonl"
  bracket.write_text(good)
  assert [r.prompt for r in logs.read_feedback_log(str(bracket))] == ["a"]

  newline_key = tmp_path / "key.jsonl"
  newline_key.write_text('{"prompt": "a", "response": "b", "label": true, "x\\ny": 1, "x\\ny": 2}\n')
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(str(newline_key)))
  assert str(e.value) == f"{newline_key}:1: x\\ny: given twice in one record (which one is meant?)"

  corrupt = tmp_path / "bad.jsonl.gz"
  corrupt.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 6)
  for mode in ("error", "skip"):
    with pytest.raises(logs.BadRecordError) as e:
      list(logs.read_feedback_log(str(corrupt), on_bad_record=mode))
    assert str(e.value).startswith(f"{corrupt}:1: file: cannot read ("), str(e.value)
  cut = tmp_path / "cut.jsonl.gz"  # a gzipped log cut short: the line it stops in is named
  with gzip.open(cut, "wb") as g:
    g.write(good.encode() * 400)
  cut.write_bytes(cut.read_bytes()[:-12])
  with pytest.raises(logs.BadRecordError) as e:
    list(logs.read_feedback_log(str(cut)))
  assert re.match(rf"{re.escape(str(cut))}:(\d+): file: cannot read \(", str(e.value)), str(e.value)
  assert 300 < int(str(e.value)[len(str(cut)) + 1:].split(":")[0]) <= 401, str(e.value)

  os.link(bracket, tmp_path / "hardlink.jsonl")
  for paths, twice in (([str(bracket), str(tmp_path / "log*.jsonl")], "twice"),
                       ([str(bracket), str(tmp_path / "hardlink.jsonl")], "as ")):
    with pytest.raises(logs.BadRecordError, match=f":0: file: given {twice}") as e:
      list(logs.read_feedback_log(paths))
    assert "\n" not in str(e.value)


def test_message_roles_and_prompt_ids_are_checked(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({"prompt": [{"role": "\ud800", "content": "hi"}, {"role": "user", "content": "x"}],
                           "completion": "ok", "label": True}) + "\n")
  with pytest.raises(logs.BadRecordError, match=r"log.jsonl:1: prompt\[0\].role: invalid Unicode"):
    list(logs.read_feedback_log(str(p)))
  row = json.loads(open(os.path.join(SHARED, "ultrafeedback_binarized_sample.jsonl")).readline())
  for bad, reason in ((True, "expected a string or integer, got a boolean"), ("\ud800", "invalid Unicode")):
    p.write_text(json.dumps(dict(row, prompt_id=bad)) + "\n")
    with pytest.raises(logs.BadRecordError, match=f"log.jsonl:1: prompt_id: {reason}"):
      list(logs.read_feedback_log(str(p)))
  p.write_text(json.dumps(dict(row, prompt_id=7)) + "\n")
  assert [r.id for r in logs.read_feedback_log(str(p))] == ["7/chosen", "7/rejected"]


def test_upper_case_gzip_tfrecord_and_its_scoring_lengths(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  feat = lambda **kw: tf.train.Example(features=tf.train.Features(feature=kw)).SerializeToString()
  b = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode()]))
  ints = lambda *v: tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))
  fl = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
  path = str(tmp_path / "UP.TFR.GZ")
  with tf.io.TFRecordWriter(path, options="GZIP") as w:
    w.write(feat(prompt=b("p"), response=b("r"), label=ints(1), ref_logprob=fl(-2.0),
                 ref_logprob_lengths=ints(16, 32)))
    w.write(feat(prompt=b("p"), response=b("r"), label=ints(1), ref_logprob=fl(-2.0),
                 ref_logprob_lengths=ints(16)))
  recs = list(logs.read_feedback_log(path, on_bad_record="skip"))
  assert [(r.response, r.ref_lengths) for r in recs] == [("r", (16, 32))]
  with pytest.raises(logs.BadRecordError, match=r"UP.TFR.GZ:2: ref_logprob_lengths: expected 2 values"):
    list(logs.read_feedback_log(path))
  floats = str(tmp_path / "floats.tfrecord")  # as floats the lengths were dropped, and never checked
  with tf.io.TFRecordWriter(floats) as w:
    w.write(feat(prompt=b("p"), response=b("r"), label=ints(1), ref_logprob=fl(-2.0),
                 ref_logprob_lengths=tf.train.Feature(float_list=tf.train.FloatList(value=[16.0, 32.0]))))
  with pytest.raises(logs.BadRecordError, match=r"floats.tfrecord:1: ref_logprob_lengths: expected an int64 "
                                                r"list \[inputs, targets\], got a float_list"):
    list(logs.read_feedback_log(floats))


def test_all_bad_log_in_skip_mode_says_why(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
  with pytest.raises(logs.BadRecordError) as e:
    logs.load_feedback_log(str(p), on_bad_record="skip")
  assert str(e.value).startswith(f"{p}:0: file: no usable records (2 bad: {{'response: missing': 2}}; "
                                 f"the first: {p}:1: response: missing"), str(e.value)


def test_a_long_read_shows_progress(tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "label": i % 2 == 0}) + "\n"
                            for i in range(2100)))
    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)
    records = logs.load_feedback_log(str(path))
    assert len(records) == 2100 and records[-1].prompt == "p2099"
    err = capsys.readouterr().err.splitlines()
    assert [l.split(" records so far")[0] for l in err] == [f"[data] reading {path}: 1,024", f"[data] reading {path}: 2,048"]


def _five_examples_tfrecord(path, options=None):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.TFRecordWriter(str(path), options=options) as w:
    for k in range(5):
      w.write(tf.train.Example(features=tf.train.Features(feature={
          "prompt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"prompt {k}".encode()])),
          "response": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"r"])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))})).SerializeToString())
  return open(path, "rb").read()


@pytest.mark.parametrize("cut", [1, 11, 12, 20])
def test_a_tfrecord_cut_inside_its_last_record_is_refused(tmp_path, cut):
  """TF's reader ends quietly at a partial last header; the lost record must not vanish."""
  path = tmp_path / "log.tfrecord"
  data = _five_examples_tfrecord(path)
  last = len(data) // 5
  path.write_bytes(data[:len(data) - last + cut])  # `cut` bytes of record 5 remain
  with pytest.raises(logs.BadRecordError, match=rf"^{path}:5: record: truncated TFRecord \(the file ends inside this record\)$"):
    list(logs.read_feedback_log(str(path), on_bad_record="skip"))
  path.write_bytes(data)
  assert len(list(logs.read_feedback_log(str(path)))) == 5


@pytest.mark.parametrize("keep", [40, 100, -40])
def test_a_gzipped_tfrecord_cut_short_is_refused(tmp_path, keep):
  """TF's gzip reader does not check the end of the stream: a cut file lost records silently."""
  path = tmp_path / "log.tfrecord.gz"
  data = _five_examples_tfrecord(path, options="GZIP")
  path.write_bytes(data[:keep])
  with pytest.raises(logs.BadRecordError, match=rf"^{path}:\d: record: truncated TFRecord \(the file ends inside this record\)$"):
    list(logs.read_feedback_log(str(path)))
  path.write_bytes(data)
  assert [r.prompt for r in logs.read_feedback_log(str(path))] == [f"prompt {k}" for k in range(5)]


def test_empty_optional_tfrecord_features_are_absent(tmp_path):
  """Writers that turn a missing value into an empty feature: read like JSON's null."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "log.tfrecord")
  empty = tf.train.Feature(float_list=tf.train.FloatList(value=[]))
  with tf.io.TFRecordWriter(path) as w:
    w.write(tf.train.Example(features=tf.train.Features(feature={
        "prompt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"p"])),
        "response": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"r"])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        "weight": empty, "ref_logprob": empty, "id": tf.train.Feature(bytes_list=tf.train.BytesList()),
        "ref_logprob_lengths": tf.train.Feature(int64_list=tf.train.Int64List())})).SerializeToString())
  (rec,) = logs.read_feedback_log(path)
  assert (rec.weight, rec.ref_logprob, rec.id, rec.ref_lengths) == (None, None, None, None)


def _msgs(*pairs):
  return [{"role": role, "content": content} for role, content in pairs]


def test_binarized_conversations_keep_every_turn(tmp_path):
  """Earlier turns of a binarized side become the prompt text; they used to be dropped, the
  last answer trained as a reply to the first question."""
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({
      "prompt": "hi", "score_chosen": 5, "score_rejected": 1,
      "chosen": _msgs(("user", "hi"), ("assistant", "A1"), ("user", "more?"), ("assistant", "A2")),
      "rejected": _msgs(("system", "Be brief."), ("user", "hi"), ("assistant", "B"))}) + "\n")
  assert [(r.prompt, r.response, r.reward) for r in logs.read_feedback_log(str(p))] == [
      ("user: hi\nassistant: A1\nuser: more?", "A2", 5.0), ("system: Be brief.\nuser: hi", "B", 1.0)]
  # a side whose conversation is not the record's prompt is refused
  p.write_text(json.dumps({"prompt": "hi", "score_chosen": 5, "score_rejected": 1,
                           "chosen": _msgs(("user", "hi"), ("assistant", "A")),
                           "rejected": _msgs(("user", "something else"), ("assistant", "B"))}) + "\n")
  with pytest.raises(logs.BadRecordError, match=r"log.jsonl:1: rejected: the messages before the answer do not "
                                                r"hold the record's 'prompt'"):
    list(logs.read_feedback_log(str(p)))


def test_a_multi_message_completion_is_refused(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps({"prompt": "q", "label": True, "completion": _msgs(
      ("assistant", "X"), ("user", "Y"), ("assistant", "Z"))}) + "\n")
  with pytest.raises(logs.BadRecordError, match=r"log.jsonl:1: completion: 3 messages \(a response is one"):
    list(logs.read_feedback_log(str(p)))


def test_ultrafeedback_lines_honour_id_and_weight(tmp_path):
  binarized = json.loads(open(os.path.join(SHARED, "ultrafeedback_binarized_sample.jsonl")).readline())
  original = json.loads(open(os.path.join(SHARED, "ultrafeedback_original_sample.jsonl")).readline())
  p = tmp_path / "log.jsonl"
  p.write_text(json.dumps(dict(binarized, weight=0, id="q")) + "\n" + json.dumps(dict(original, weight=3, id="X"))
               + "\n" + json.dumps(original) + "\n")
  recs = list(logs.read_feedback_log(str(p)))
  n = len(original["completions"])
  assert [(r.id, r.weight) for r in recs] == (
      [("q/chosen", 0.0), ("q/rejected", 0.0)] + [(f"X/{k}", 3.0) for k in range(n)]
      + [(f"{p}:3/{k}", None) for k in range(n)])
  for bad in (dict(binarized, weight=-1), dict(original, ref_logprob=-1.0)):
    p.write_text(json.dumps(bad) + "\n")
    with pytest.raises(logs.BadRecordError, match=r"log.jsonl:1: (weight: negative|ref_logprob: not read in the "
                                                  r"UltraFeedback layouts)"):
      list(logs.read_feedback_log(str(p)))


def test_an_uncompressed_tfrecord_that_starts_like_gzip_reads_whole(tmp_path):
  """A first record of 35,615 bytes: its length starts with the gzip magic 1f 8b. TF reads the
  file by its name, as uncompressed; the completeness check must too."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "log.tfrecord")
  feature = lambda **kw: tf.train.Example(features=tf.train.Features(feature=kw)).SerializeToString()
  text = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode()]))
  first = None
  for pad in range(35_500, 35_700):  # a prompt length that makes the serialised record 0x8b1f bytes
    first = feature(prompt=text("p" * pad), response=text("r"),
                    label=tf.train.Feature(int64_list=tf.train.Int64List(value=[1])))
    if len(first) == 0x8b1f:
      break
  assert len(first) == 0x8b1f
  with tf.io.TFRecordWriter(path) as w:
    w.write(first)
    w.write(feature(prompt=text("q"), response=text("s"), label=tf.train.Feature(int64_list=tf.train.Int64List(value=[0]))))
  assert open(path, "rb").read(2) == b"\x1f\x8b"
  assert [r.prompt[:1] for r in logs.read_feedback_log(path)] == ["p", "q"]


def test_thumbs_and_scores_on_other_scales_are_flagged(tmp_path, capsys, caplog):
  """Thumbs (+1/-1) next to 1-10 scores: standardised together, a thumbs-up became -0.28, below
  a bad score of 3, and KTO and filtered SFT took every thumbs-up as undesirable, silently."""
  from dro_jax.data import rewards, tasks, validate

  note = rewards.mixed_scales_note([1.0, -1.0, 3.0, 9.0], [True, False, None, None])
  assert note.startswith("thumbs and scalar rewards share this log on other scales: a thumbs-up is 1, a "
                         "thumbs-down is -1, while the scored records average 6 "), note
  assert rewards.mixed_scales_note([1.0, -1.0, 0.5, -0.5], [True, False, None, None]) is None  # same scale
  assert rewards.mixed_scales_note([1.0, -1.0, 1.0, 1.0], [True, False, None, None]) is None  # at the thumbs-up
  assert rewards.mixed_scales_note([1.0, -1.0], [True, False]) is None  # thumbs only
  assert rewards.mixed_scales_note([2.0, 9.0], [None, None]) is None  # scores only
  assert rewards.mixed_scales_note([10.0, 3.0, 9.0], [True, None, None]) is None  # up above the scores' mean

  p = tmp_path / "mixed.jsonl"
  p.write_text("".join(json.dumps(r) + "\n" for r in [
      {"prompt": "a", "response": "b", "label": True}, {"prompt": "c", "response": "d", "label": False},
      {"prompt": "e", "response": "f", "reward": 3.0}, {"prompt": "g", "response": "h", "reward": 9.0}]))
  assert validate.main([str(p)]) == 0
  assert f"warning: {note}" in capsys.readouterr().out.splitlines()
  task = tasks.register_feedback_task("t_mixed_scales", paths=str(p), vocabulary=seqio.ByteVocabulary(),
                                      reward_mapping=rewards.RewardMapping(standardize=True), overwrite=True)
  with caplog.at_level("WARNING"):
    data = task.source.load("train")
  assert data.rewards[0] < 0  # the trap itself: a standardised thumbs-up below 0
  assert any(r.getMessage() == f"Feedback log {p}: {note}" for r in caplog.records), caplog.text
