"""Smoke test of the input-pipeline benchmark and the packing efficiency figure."""
import argparse
import logging

from dro_jax.data import bench


def test_bench_runs_and_packing_gains(tmp_path):
  log = bench.synthetic_log(str(tmp_path / "log.jsonl"), 300, seed=1)
  args = argparse.Namespace(log=log, num_records=0, inputs_length=256,
                            targets_length=128, batch_size=16, max_segments=8,
                            vocabulary="byte")
  res = bench.run(args)
  u, p = res["unpacked"], res["packed"]
  assert u["examples"] == p["examples"] == 300
  assert p["rows"] < u["rows"] and p["total"] > u["total"]
  assert u["warm_examples_per_s"] > 0 and res["truncated_examples"] > 0


def test_bad_vocabulary_is_one_line(tmp_path, capsys):
  assert bench.main(["--vocabulary", str(tmp_path / "none.model"), "--num_records", "10"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {tmp_path / 'none.model'}: vocabulary: no such file (expected 'byte' or a "
                 "SentencePiece .model path)"], err


def test_truncation_is_warned_once_per_task(tmp_path, caplog):
  """Each task's dataset is built twice (end-to-end, then steady state); its truncation warning shows once."""
  log = bench.synthetic_log(str(tmp_path / "log.jsonl"), 40, seed=2)
  args = argparse.Namespace(log=log, num_records=0, inputs_length=32,
                            targets_length=32, batch_size=8, max_segments=4,
                            vocabulary="byte")
  filters_before = list(logging.getLogger("absl").filters)  # a failed checkpoint test may leave its own
  with caplog.at_level(logging.WARNING):
    assert bench.run(args)["truncated_examples"] > 0
  warned = [r.getMessage() for r in caplog.records if "longer than the feature lengths" in r.getMessage()]
  assert [m.split(":")[0] for m in warned] == ["Task dro_bench_unpacked split train",
                                               "Task dro_bench_packed split train"], warned
  # the filter is gone afterwards: other runs still warn
  assert logging.getLogger("absl").filters == filters_before
