"""seqio tasks, feature converters, packing and reward standardisation."""
import json
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from dro_jax.data import logs
from dro_jax.data import tasks as dtasks
from dro_jax.data.converters import DROFeatureConverter, PackedDROFeatureConverter
from dro_jax.data.packing import segment_sum
from dro_jax.data.rewards import RewardMapping, RewardStats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "tests", "data", "logs")
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
BYTE = seqio.ByteVocabulary()


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _task(name, paths, **kw):
  return dtasks.register_feedback_task(name, paths=paths, vocabulary=BYTE,
                                       overwrite=True, **kw)


def _get(name, lengths, conv=None, **kw):
  kw.setdefault("shuffle", False)
  ds = seqio.get_dataset(name, task_feature_lengths=lengths, dataset_split="train",
                         feature_converter=conv or DROFeatureConverter(pack=False), **kw)
  return list(ds.as_numpy_iterator())


def test_unpacked_converter_shapes_and_values(tmp_path):
  path = _write(tmp_path / "log.jsonl", [
      {"prompt": "ab", "response": "c", "label": True, "ref_logprob": -1.5},
      {"prompt": "x", "completion": "yz", "reward": 0.25, "ref_logprob": -2.0}])
  _task("t_unpacked", path)
  ex = _get("t_unpacked", {"inputs": 5, "targets": 4})
  assert set(ex[0]) == {"encoder_input_tokens", "decoder_input_tokens",
                        "decoder_target_tokens", "decoder_loss_weights", "rewards",
                        "ref_logprobs"}
  a, b, c, x, y, z = (ord(ch) + 3 for ch in "abcxyz")  # ByteVocabulary: bytes + 3
  np.testing.assert_array_equal(ex[0]["encoder_input_tokens"], [a, b, 1, 0, 0])
  np.testing.assert_array_equal(ex[0]["decoder_target_tokens"], [c, 1, 0, 0])
  np.testing.assert_array_equal(ex[0]["decoder_input_tokens"], [0, c, 1, 0])
  np.testing.assert_array_equal(ex[0]["decoder_loss_weights"], [1, 1, 0, 0])
  np.testing.assert_array_equal(ex[1]["decoder_target_tokens"], [y, z, 1, 0])
  np.testing.assert_array_equal(ex[1]["decoder_input_tokens"], [0, y, z, 1])
  assert ex[0]["rewards"] == 1.0 and ex[1]["rewards"] == 0.25
  assert ex[1]["ref_logprobs"] == -2.0
  for k, v in ex[0].items():
    assert v.dtype == (np.float32 if k in ("rewards", "ref_logprobs") else np.int32), k
  # Batched: rewards [B], tokens [B, L]; ref_logprobs can be dropped on request.
  ds = seqio.get_dataset("t_unpacked", {"inputs": 5, "targets": 4},
                         feature_converter=DROFeatureConverter(ref_logprobs=False),
                         batch_size=2)
  batch = next(ds.as_numpy_iterator())
  assert batch["rewards"].shape == (2,) and batch["encoder_input_tokens"].shape == (2, 5)
  assert "ref_logprobs" not in batch
  with pytest.raises(ValueError, match="PackedDROFeatureConverter"):
    DROFeatureConverter(pack=True)


def test_bad_log_raises_plain_error_from_get_dataset():
  _task("t_bad", os.path.join(LOGS, "bad_nan_reward.jsonl"))
  with pytest.raises(logs.BadRecordError, match=r"bad_nan_reward.jsonl:2: reward: not finite"):
    seqio.get_dataset("t_bad", {"inputs": 8, "targets": 8},
                      feature_converter=DROFeatureConverter())
  _task("t_bad_skip", os.path.join(LOGS, "bad_nan_reward.jsonl"), on_bad_record="skip")
  assert len(_get("t_bad_skip", {"inputs": 32, "targets": 32})) == 2


def test_long_records_counted_as_truncated_not_rejected():
  _task("t_long", os.path.join(LOGS, "ok_long_record.jsonl"))
  ex = _get("t_long", {"inputs": 64, "targets": 32})
  assert len(ex) == 3
  stats = dtasks.get_truncation_stats("t_long")
  assert (stats.examples, stats.truncated, stats.inputs_truncated,
          stats.targets_truncated) == (3, 1, 1, 1)
  # The kept part is the head of the response; the EOS is cut off with the tail.
  np.testing.assert_array_equal(ex[1]["decoder_target_tokens"][:4],
                                [ord(ch) + 3 for ch in "Once"])
  assert ex[1]["decoder_loss_weights"].sum() == 32


def test_truncation_is_warned_once_however_often_the_dataset_is_built(caplog):
  """A run builds a split's dataset several times (probe, training, every evaluation)."""
  import logging

  _task("t_long_once", os.path.join(LOGS, "ok_long_record.jsonl"))
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      _get("t_long_once", {"inputs": 64, "targets": 32})
  assert caplog.text.count("will be truncated") == 1, caplog.text
  assert dtasks.get_truncation_stats("t_long_once").truncated == 1  # still counted every time


def test_sharding_and_deterministic_shuffle():
  import tasks.sample  # pylint: disable=g-import-not-at-top,unused-import
  lengths = {"inputs": 24, "targets": 40}
  key = lambda e: (tuple(e["encoder_input_tokens"]), tuple(e["decoder_target_tokens"]))
  full = sorted(map(key, _get("dro_sample_feedback", lengths)))
  assert len(full) == 200
  shards = [_get("dro_sample_feedback", lengths, shuffle=True, seed=3,
                 shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
  assert sorted(map(key, shards[0] + shards[1])) == full
  assert len(shards[0]) == len(shards[1]) == 100
  again = _get("dro_sample_feedback", lengths, shuffle=True, seed=3,
               shard_info=seqio.ShardInfo(0, 2))
  other = _get("dro_sample_feedback", lengths, shuffle=True, seed=4,
               shard_info=seqio.ShardInfo(0, 2))
  assert list(map(key, again)) == list(map(key, shards[0]))
  assert list(map(key, other)) != list(map(key, shards[0]))
  assert sorted(map(key, other)) == sorted(map(key, shards[0]))


def test_standardised_rewards_and_stats_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  recs = [{"prompt": f"p{i}", "response": "r", "reward": float(rng.normal(3, 2))}
          for i in range(40)] + [{"prompt": "q", "response": "s", "label": b}
                                 for b in (True, False, True)]
  path = _write(tmp_path / "log.jsonl", recs)
  _task("t_std", path, reward_mapping=RewardMapping(standardize=True))
  r = np.array([e["rewards"] for e in _get("t_std", {"inputs": 8, "targets": 8})],
               np.float64)
  assert abs(r.mean()) < 1e-6 and abs(r.var() - 1) < 1e-5
  stats = dtasks.get_reward_stats("t_std")
  assert stats.count == 43
  stats.save(str(tmp_path / "run" / "reward_stats.json"))
  loaded = RewardStats.load(str(tmp_path / "run" / "reward_stats.json"))
  assert loaded == stats
  # Resume: the stored stats win over anything recomputed.
  other = RewardStats(mean=1.0, std=2.0, count=5)
  dtasks.set_reward_stats("t_std", other)
  r2 = np.array([e["rewards"] for e in _get("t_std", {"inputs": 8, "targets": 8})])
  raw = [rec.reward for rec in logs.read_feedback_log(path)]
  np.testing.assert_allclose(r2, (np.array(raw) - 1.0) / 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="missing key 'std'"):
    RewardStats.from_json('{"mean": 1}')
  with pytest.raises(ValueError, match="malformed JSON"):
    RewardStats.from_json('{"mean": 1')


def test_registration_is_idempotent(tmp_path):
  path = os.path.join(LOGS, "ok_bom_crlf_blank.jsonl")
  t1 = dtasks.register_feedback_task("t_idem", paths=path, vocabulary=BYTE)
  t2 = dtasks.register_feedback_task("t_idem", paths=path, vocabulary=seqio.ByteVocabulary())
  assert t1 is t2
  with pytest.raises(ValueError, match="already registered"):
    dtasks.register_feedback_task("t_idem", paths=[path, path], vocabulary=BYTE)


def test_segment_sum():
  vals = np.arange(12, dtype=np.float32).reshape(2, 6)
  seg = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 1, 0, 0, 0]])
  out = np.asarray(segment_sum(vals, seg, 3))
  np.testing.assert_allclose(out, [[1, 9, 0], [8, 0, 13]])


def test_packed_equals_unpacked_per_segment(tmp_path):
  rng = np.random.default_rng(1)
  words = ["ab", "cde", "f", "ghij", "k"]
  recs = [{"prompt": " ".join(rng.choice(words, rng.integers(1, 6))),
           "response": " ".join(rng.choice(words, rng.integers(0, 5))),
           "reward": float(i), "ref_logprob": -float(i) / 10} for i in range(37)]
  path = _write(tmp_path / "log.jsonl", recs)
  _task("t_pack", path)
  lengths = {"inputs": 32, "targets": 24}
  unpacked = _get("t_pack", lengths)
  k = 4
  packed = _get("t_pack", lengths, PackedDROFeatureConverter(max_segments=k, window=16))
  assert len(packed) < len(unpacked)
  tok = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
         "decoder_loss_weights")

  # Compare the decoder inputs at real target positions only: unpacked rows
  # also shift the EOS into the first padding position (loss weight 0 there).
  def masked(e, f):
    return e[f] * e["decoder_loss_weights"] if f == "decoder_input_tokens" else e[f]

  # Each field's token sequence over the example's real positions (a non-pad token), in order.
  def real(e, f, where=True):
    pad = e["encoder_input_tokens" if f.startswith("encoder") else "decoder_target_tokens"] == 0
    return tuple(int(t) for t in masked(e, f)[~pad & where])

  want = sorted(tuple(real(e, f) for f in tok) + (float(e["rewards"]), float(e["ref_logprobs"]))
                for e in unpacked)
  got = sorted(tuple(real(p, f, p["encoder_segment_ids" if f.startswith("encoder") else "decoder_segment_ids"]
                          == s + 1) for f in tok)
               + (float(p["rewards"][s]), float(p["ref_logprobs"][s]))
               for p in packed for s in range(k) if p["segment_weights"][s] == 1)
  assert len(want) == 37 and got == want
  b = {f: np.stack([p[f] for p in packed]) for f in packed[0]}
  # Empty segments carry zeros; positions restart per segment.
  assert np.all(b["rewards"][b["segment_weights"] == 0] == 0)
  row = packed[0]
  starts = np.flatnonzero(np.diff(row["decoder_segment_ids"], prepend=0) > 0)
  assert np.all(row["decoder_positions"][starts] == 0)
  assert np.all(row["decoder_input_tokens"][starts] == 0)


def test_gin_feedback_log_task_and_ultrafeedback():
  import tasks.feedback  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  gin.parse_config(f"""
      NAME = @feedback.feedback_log_task()
      feedback.feedback_log_task.name = "t_gin_uf"
      feedback.feedback_log_task.paths = ["{SHARED}/ultrafeedback_*_sample.jsonl"]
      feedback.feedback_log_task.standardize = True
  """)
  name = gin.query_parameter("%NAME").scoped_configurable_fn()
  gin.clear_config()
  assert name == "t_gin_uf"
  ex = _get(name, {"inputs": 64, "targets": 128})
  assert len(ex) == 6 + 8
  r = np.array([e["rewards"] for e in ex], np.float64)
  assert abs(r.mean()) < 1e-6 and abs(r.std() - 1) < 1e-5


def test_per_record_weights_feature(tmp_path, caplog):
  # A log that gives weights carries them, even when every one is 1; absent ones weigh 1.
  ones = _write(tmp_path / "ones.jsonl", [
      {"prompt": "a", "response": "b", "label": True, "weight": 1.0},
      {"prompt": "c", "response": "d", "label": False, "weight": 1}])
  _task("t_weights_ones", ones)
  ex = _get("t_weights_ones", {"inputs": 4, "targets": 4}, DROFeatureConverter(carry_weights=True))
  assert [e["weights"] for e in ex] == [1.0, 1.0]
  mixed = _write(tmp_path / "mixed.jsonl", [
      {"prompt": "a", "response": "b", "label": True, "weight": 0.0},
      {"prompt": "c", "response": "d", "label": False}])
  _task("t_weights_mixed", mixed)
  ex = _get("t_weights_mixed", {"inputs": 4, "targets": 4}, DROFeatureConverter(carry_weights=True))
  assert [e["weights"] for e in ex] == [0.0, 1.0]
  # Not asked for: dropped from the batch (the trainer says so, see test_weights_ignored_or_missing).
  ex = _get("t_weights_mixed", {"inputs": 4, "targets": 4})
  assert "weights" not in ex[0]
  # Every weight 0: nothing would be learnt; said at load.
  zeros = _write(tmp_path / "zeros.jsonl", [
      {"prompt": "a", "response": "b", "label": True, "weight": 0},
      {"prompt": "c", "response": "d", "label": False, "weight": 0.0}])
  _task("t_weights_zeros", zeros)
  caplog.clear()
  with caplog.at_level("WARNING"):
    _get("t_weights_zeros", {"inputs": 4, "targets": 4}, DROFeatureConverter(carry_weights=True))
  assert "every record has weight 0" in caplog.text and "zeros.jsonl" in caplog.text, caplog.text
  # A log without any weight carries 1s (a mixture needs the same features in every task).
  none = _write(tmp_path / "none.jsonl", [{"prompt": "a", "response": "b", "label": True}])
  _task("t_weights_none", none)
  assert [e["weights"] for e in _get("t_weights_none", {"inputs": 4, "targets": 4},
                                     DROFeatureConverter(carry_weights=True))] == [1.0]
  assert not seqio.get_mixture_or_task("t_weights_none").source.load("train").has_weights
  # A dataset without rewards is not a feedback task's.
  with pytest.raises(ValueError, match="no 'weights' feature"):
    DROFeatureConverter(carry_weights=True)(
        tf.data.Dataset.from_tensors({"inputs": [3], "targets": [4], "rewards": 1.0}), {"inputs": 4, "targets": 4})


def _mixture(name, tasks):
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks, default_rate=1.0)


def test_a_mixture_of_weighted_and_unweighted_logs_trains_with_absent_weights_as_1(tmp_path):
  from dro_jax import trainer

  _task("t_mixw_a", _write(tmp_path / "a.jsonl", [
      {"prompt": f"a{i}", "response": "r", "reward": 1.0, "weight": 0.5} for i in range(4)]))
  _task("t_mixw_b", _write(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "response": "r", "reward": 1.0}
                                                  for i in range(4)]))
  _mixture("t_mixw", ["t_mixw_a", "t_mixw_b"])
  for carry in (False, True):
    batches = trainer.make_dataset("t_mixw", {"inputs": 4, "targets": 4}, 8,
                                   trainer.DataConfig(shuffle=False, carry_weights=carry))
    batch = next(batches)
    assert ("weights" in batch) == carry
  from_a = batch["encoder_input_tokens"][:, 0] == ord("a") + 3  # byte ids are shifted by 3
  assert 0 < from_a.sum() < 8  # the mixture samples both (its seed is fixed)
  assert np.all(batch["weights"][from_a] == 0.5) and np.all(batch["weights"][~from_a] == 1.0)


def test_a_mixture_of_scored_and_unscored_logs_is_refused_in_one_line(tmp_path):
  from dro_jax import trainer

  _task("t_mixs_a", _write(tmp_path / "scored.jsonl", [
      {"prompt": "a", "response": "r", "label": True, "ref_logprob": -2.0}]))
  bare = _write(tmp_path / "bare.jsonl", [{"prompt": "b", "response": "r", "label": False}])
  _task("t_mixs_b", bare)
  _mixture("t_mixs", ["t_mixs_a", "t_mixs_b"])
  with pytest.raises(ValueError) as e:
    trainer.make_dataset("t_mixs", {"inputs": 4, "targets": 4}, 2, trainer.DataConfig())
  assert str(e.value).startswith(f"{bare}: ref_logprob: none in task t_mixs_b's 'train' log, while task t_mixs_a's")
  assert "\n" not in str(e.value) and "read_ref_logprobs=False" in str(e.value)
  # The remedy it names: the scored log read without its scores mixes.
  _task("t_mixs_a", str(tmp_path / "scored.jsonl"), read_ref_logprobs=False)
  _mixture("t_mixs", ["t_mixs_a", "t_mixs_b"])  # a mixture holds the tasks it was made with
  batch = next(trainer.make_dataset("t_mixs", {"inputs": 4, "targets": 4}, 2, trainer.DataConfig()))
  assert "ref_logprobs" not in batch and len(batch["rewards"]) == 2


def test_a_shard_with_no_records_is_an_empty_dataset(tmp_path):
  """More hosts than evaluation records: a host's share is empty, and evaluation pads it."""
  task = _task("t_empty_shard", _write(tmp_path / "one.jsonl", [{"prompt": "a", "response": "r", "label": True}]))
  for shuffle in (False, True):
    parts = [list(task.source.get_dataset("train", shuffle=shuffle, seed=1,
                                          shard_info=seqio.ShardInfo(index=i, num_shards=2)).as_numpy_iterator())
             for i in range(2)]
    assert [len(p) for p in parts] == [1, 0]


def test_truncation_stats_refuses_non_positive_lengths():
  _task("t_trunc_len", os.path.join(LOGS, "ok_long_record.jsonl"))
  data = seqio.get_mixture_or_task("t_trunc_len").source.load("train")
  assert dtasks.truncation_stats(data, {"inputs": 64, "targets": None}).truncated == 1
  for bad in (0, -1, 8.0, True):
    with pytest.raises(ValueError, match=r"sequence_length\['inputs'\] must be a positive"):
      dtasks.truncation_stats(data, {"inputs": bad, "targets": 8})


def test_ref_logprobs_scored_at_other_lengths_are_refused_where_they_cut_differently(tmp_path):
  scored_at = {"inputs": 8, "targets": 8}
  path = _write(tmp_path / "log.jsonl", [
      {"prompt": "ab", "response": "c", "label": True, "ref_logprob": -1.5, "ref_logprob_lengths": scored_at},
      {"prompt": "x", "response": "a long reply", "label": False, "ref_logprob": -9.0,
       "ref_logprob_lengths": scored_at}])
  _task("t_ref_lengths", path)
  # the scoring lengths, or others that cut no record differently: fine
  dtasks.check_ref_logprob_lengths("t_ref_lengths", "train", {"inputs": 8, "targets": 8})
  dtasks.check_ref_logprob_lengths("t_ref_lengths", "train", {"inputs": 4, "targets": 8})
  # longer targets keep more of record 2's response than its score saw
  with pytest.raises(logs.BadRecordError) as e:
    dtasks.check_ref_logprob_lengths("t_ref_lengths", "train", {"inputs": 8, "targets": 16})
  assert str(e.value).startswith(
      f"{path}:2: ref_logprob: scored at inputs=8, targets=8 tokens, but inputs=8, targets=16 cut "
      "1 record(s) differently"), str(e.value)
  assert "--inputs_length=8 --targets_length=16" in str(e.value)
  # the dataset itself is built at any lengths: a run that does not read ref_logprobs may use it
  assert len(_get("t_ref_lengths", {"inputs": 8, "targets": 16})) == 2


def test_stale_ref_logprobs_are_refused_through_a_mixture(tmp_path):
  scored_at = {"inputs": 64, "targets": 64}
  fresh = _write(tmp_path / "fresh.jsonl", [{"prompt": "a", "response": "b", "label": True}])
  stale = _write(tmp_path / "stale.jsonl", [
      {"prompt": "a prompt of twenty", "response": "a response of twenty", "label": True,
       "ref_logprob": -3.0, "ref_logprob_lengths": scored_at}])
  _task("t_mix_fresh", fresh)
  _task("t_mix_stale", stale)
  seqio.MixtureRegistry.remove("t_mix_ref")
  seqio.MixtureRegistry.add("t_mix_ref", ["t_mix_fresh", "t_mix_stale"], default_rate=1.0)
  assert [t.name for t in dtasks.feedback_tasks("t_mix_ref")] == ["t_mix_fresh", "t_mix_stale"]
  dtasks.check_ref_logprob_lengths("t_mix_ref", "train", scored_at)
  with pytest.raises(logs.BadRecordError, match=f"^{stale}:1: ref_logprob: scored at inputs=64"):
    dtasks.check_ref_logprob_lengths("t_mix_ref", "train", {"inputs": 8, "targets": 8})


@pytest.mark.parametrize("value", [5000.3, 1000000.1, -0.1])
def test_constant_rewards_standardise_to_zero(value):
  # The float mean of equal numbers can differ from them by rounding; that must not become a std.
  stats = RewardStats.from_rewards([value] * 1000)
  assert stats.std == 0.0 and stats.mean == value and stats.all_equal
  assert np.all(stats.standardize(np.full(3, value)) == 0.0)


def test_rows_are_the_vocabulary_ids_plus_eos_in_int32(tmp_path):
  """Token ids are held compactly (uint16) and widened per row; multi-byte UTF-8 included."""
  texts = [("héllo ✓ 🙂", "a"), ("x", "line\nbreak ü"), ("日本語のプロンプト", "🙂" * 5)]
  path = _write(tmp_path / "u.jsonl", [{"prompt": p, "response": r, "label": True} for p, r in texts])
  task = _task("t_unicode_rows", path)
  held = task.source.load("train")
  assert held.inputs.values.dtype.name == "uint16"
  rows = list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
  assert len(rows) == len(texts)
  for row, (p, r) in zip(rows, texts):
    for key, text in (("inputs", p), ("targets", r)):
      assert row[key].dtype == np.int32
      np.testing.assert_array_equal(row[key], list(BYTE.encode(text)) + [BYTE.eos_id], err_msg=key)


def test_weights_ignored_or_missing(tmp_path, caplog):
  """The trainer says when a log's weights are ignored, and refuses to carry weights no log gives."""
  import logging

  from dro_jax import trainer

  _task("t_w_given", _write(tmp_path / "w.jsonl", [{"prompt": "a", "response": "r", "label": True, "weight": 2}]))
  bare = _write(tmp_path / "bare.jsonl", [{"prompt": "a", "response": "r", "label": True}])
  _task("t_w_bare", bare)
  with caplog.at_level(logging.WARNING, logger="dro_jax"):
    trainer._check_weights("t_w_given", trainer.DataConfig())
    trainer._check_weights("t_w_given", trainer.DataConfig(carry_weights=True))
    trainer._check_weights("t_w_bare", trainer.DataConfig())
  warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
  assert len(warned) == 1 and "t_w_given" in warned[0] and "carry_weights=True" in warned[0], warned
  with pytest.raises(trainer.ConfigError, match=f"carry_weights=True, but no record .* \\({bare}\\) has a `weight`"):
    trainer._check_weights("t_w_bare", trainer.DataConfig(carry_weights=True))


def test_skipped_records_are_one_warning_naming_the_files_and_the_first_lines(tmp_path, caplog):
  good = {"prompt": "a", "response": "r", "label": True}
  a = _write(tmp_path / "a.jsonl", [good, {"prompt": "a", "response": "r"}])
  b = tmp_path / "b.jsonl"
  b.write_text(json.dumps(good) + "\n{broken\n")
  task = _task("t_skip_warn", [a, str(b)], on_bad_record="skip")
  with caplog.at_level("WARNING"):
    assert task.source.load("train").num_examples == 2
  warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(warned) == 1, warned
  assert warned[0].startswith(f"Feedback log {a}, {b}: skipped 2 bad records: ")
  assert f"the first: {a}:2: " in warned[0] and f" | {b}:2: " in warned[0]
