"""`dro_jax.score` then training on the scored log equals scoring the reference on the fly."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import seqio
from flax import linen as nn

from dro_jax import checkpoints, models, optim, sharding, trainer
from dro_jax.data import tasks as data_tasks
from tiny import assert_kept_work_names_the_weights, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "tasks", "data", "sample_feedback.jsonl")
LENGTHS = {"inputs": 16, "targets": 32}


def _train(model_dir, task, model, init, reference):
    return trainer.train(
        model_dir=model_dir, model=model, task_name=task, task_feature_lengths=LENGTHS, batch_size=8,
        train_steps=3, initial_checkpoint_path=init, reference=reference, log_every=1,
        # SGD: Adafactor/Adam normalise the first update, so float-level differences in a
        # near-zero gradient would flip its sign and hide what this test compares.
        policy_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=1e-2, warmup_steps=0),
        value_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=1e-1, warmup_steps=0),
        mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
        data=trainer.DataConfig(seed=3))


def _initial_checkpoint(tmp_path):
    """A random tiny DRO-V model and its policy saved as a byte-vocabulary checkpoint."""
    model = models.DROModel(tiny_config(vocab_size=384))
    shapes = {"encoder_input_tokens": (2, 16), "decoder_input_tokens": (2, 32)}
    params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(1), shapes)["params"])
    init = str(tmp_path / "init")
    checkpoints.save_model_checkpoint(init, config=model.config, params=params["policy"], vocabulary_path="byte")
    return model, init


def test_score_then_train_equals_on_the_fly(tmp_path, caplog):
    model, init = _initial_checkpoint(tmp_path)

    scored = str(tmp_path / "scored.jsonl")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "dro_jax.score", f"--checkpoint={init}", f"--input={SAMPLE}",
                           f"--output={scored}", "--inputs_length=16", "--targets_length=32", "--batch_size=16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = [json.loads(l) for l in open(SAMPLE)]
    rows = [json.loads(l) for l in open(scored)]
    assert len(rows) == len(original)
    for a, b in zip(original, rows):  # same records, plus the score and the lengths it was made at
        assert {k: v for k, v in b.items() if k not in ("ref_logprob", "ref_logprob_lengths")} == a
        assert b["ref_logprob"] < 0 and b["ref_logprob_lengths"] == {"inputs": 16, "targets": 32}

    # New feedback appended to a scored log, plus a bad line: the log is scored again from
    # scratch, and the skipped line is named, not dropped silently.
    partial = str(tmp_path / "partial.jsonl")
    with open(partial, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:3] + original[3:])
        f.write('{"prompt": "x", "response": 3, "label": true}\n')
    rescored = str(tmp_path / "rescored.jsonl")
    proc = subprocess.run([sys.executable, "-m", "dro_jax.score", f"--checkpoint={init}", f"--input={partial}",
                           f"--output={rescored}", "--inputs_length=16", "--targets_length=32",
                           "--batch_size=16", "--on_bad_record=skip"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{partial}:{len(original) + 1}: response: expected a string" in proc.stderr
    assert proc.stderr.count(f"{partial}:{len(original) + 1}:") == 1  # listed once, not again by seqio's summary
    assert "1 bad records skipped" in proc.stdout
    again = [json.loads(l) for l in open(rescored)]
    assert len(again) == len(rows)
    np.testing.assert_allclose([r["ref_logprob"] for r in again], [r["ref_logprob"] for r in rows],
                               rtol=1e-6)

    vocab = seqio.ByteVocabulary()
    data_tasks.register_feedback_task("score_test_plain", paths=SAMPLE, vocabulary=vocab, overwrite=True)
    data_tasks.register_feedback_task("score_test_scored", paths=scored, vocabulary=vocab, overwrite=True)
    on_the_fly = _train(str(tmp_path / "fly"), "score_test_plain", model, init, "frozen")
    with caplog.at_level("WARNING", logger="dro_jax"):
        precomputed = _train(str(tmp_path / "pre"), "score_test_scored", model, init, "precomputed")
    assert "differs from the initial policy's log-probs" not in caplog.text  # scored by this very policy
    for key in ("loss/policy", "loss/value", "logratio/mean", "value/mean"):
        np.testing.assert_allclose(on_the_fly[key], precomputed[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert on_the_fly["logratio/mean"] != 0.0  # the policy moved away from the reference


def test_score_bad_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dro_jax.score", f"--checkpoint={tmp_path}", f"--input={SAMPLE}",
                           f"--output={tmp_path}/out.jsonl"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and str(tmp_path) in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(f"{tmp_path}/out.jsonl")


def test_scored_tfrecord_log_reads_back(tmp_path):
    """A TFRecord log is written back as flat JSONL records (gzipped for .gz) with one feedback key."""
    import tensorflow as tf

    from dro_jax import score
    from dro_jax.data import logs

    _, init = _initial_checkpoint(tmp_path)
    feats = lambda **kw: tf.train.Example(features=tf.train.Features(feature=kw)).SerializeToString()
    b = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode()]))
    i = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    f = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
    log = str(tmp_path / "log.tfrecord")
    with tf.io.TFRecordWriter(log) as w:
        w.write(feats(prompt=b("p1"), response=b("r1"), label=i(1)))
        w.write(feats(prompt=b("p2"), response=b("r2"), reward=f(0.25)))
    out = str(tmp_path / "scored.jsonl.gz")
    assert score.score_log(checkpoint=init, inputs=[log], output=out, inputs_length=16, targets_length=32,
                           progress=False) == (2, 0)
    assert open(out, "rb").read(2) == b"\x1f\x8b"  # a .gz name is written gzipped
    recs = list(logs.read_feedback_log(out))
    assert [(r.prompt, r.label, r.reward) for r in recs] == [("p1", True, 1.0), ("p2", None, 0.25)]
    assert all(r.ref_logprob is not None and r.ref_logprob < 0 for r in recs)


def test_score_refuses_bad_arguments_and_keeps_logs(tmp_path, capsys):
    """Bad flags and paths: one line naming the flag or file, before any reading; nothing created."""
    from dro_jax import score

    log = tmp_path / "log.jsonl"
    log.write_text(open(SAMPLE).read() + '{"prompt": "x", "response": 3, "label": true}\n')
    before = log.read_text()
    base = [f"--checkpoint={tmp_path}/no_ckpt", f"--input={log}", f"--output={tmp_path}/out.jsonl"]
    cases = [(["--inputs_length=0"], "--inputs_length must be positive, got 0"),
             (["--targets_length=-2"], "--targets_length must be positive, got -2"),
             (["--batch_size=0"], "--batch_size must be positive, got 0"),
             (["--input", str(log), str(tmp_path / "log*")], f"{log}:0: file: given twice; each log file must be read once"),
             ([f"--output={log}", "--on_bad_record=skip"], f"--output={log} is also an --input")]
    for extra, expect in cases:
        assert score.main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], (extra, err)
    assert log.read_text() == before  # the skipped bad line is still there

    # A bad record found after loading the checkpoint: no output, not even its directory.
    _, init = _initial_checkpoint(tmp_path)
    out = tmp_path / "new_dir" / "out.jsonl"
    assert score.main([f"--checkpoint={init}", f"--input={log}", f"--output={out}"]) == 2
    assert "response: expected a string" in capsys.readouterr().err
    assert not (tmp_path / "new_dir").exists()


def test_single_completion_ultrafeedback_record_reads_back(tmp_path):
    """An UltraFeedback-original line with one completion is written flat, so its ref_logprob is read back."""
    from dro_jax import score
    from dro_jax.data import logs

    _, init = _initial_checkpoint(tmp_path)
    log = tmp_path / "uf.jsonl"
    log.write_text(json.dumps({"instruction": "Name a prime.", "completions": [
        {"response": "13", "overall_score": 9.0}, {"response": "15", "overall_score": 2.0}]}) + "\n"
        + json.dumps({"instruction": "Say hi.", "completions": [{"response": "hi", "overall_score": 7.0}]}) + "\n")
    out = str(tmp_path / "scored.jsonl")
    assert score.score_log(checkpoint=init, inputs=[str(log)], output=out, inputs_length=16, targets_length=32,
                           progress=False) == (3, 0)
    recs = list(logs.read_feedback_log(out))
    assert [(r.prompt, r.response, r.reward) for r in recs] == [
        ("Name a prime.", "13", 9.0), ("Name a prime.", "15", 2.0), ("Say hi.", "hi", 7.0)]
    assert all(r.ref_logprob is not None and r.ref_logprob < 0 for r in recs)
    assert logs.check_ref_logprobs(recs)  # the whole log is scored


def test_score_refuses_a_tfrecord_output_name(tmp_path, capsys):
    from dro_jax import score

    for name in ("x.tfrecord", "x.tfrecord.gz", "x.TFR", "x-00000-of-00001.tfrecord.jsonl"):
        assert score.main([f"--checkpoint={tmp_path}/no_ckpt", f"--input={SAMPLE}",
                           f"--output={tmp_path / name}"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "score writes JSONL (.jsonl or .jsonl.gz)" in err[0], (name, err)
        assert not (tmp_path / name).exists()


def test_score_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    from dro_jax import score

    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    args = [f"--checkpoint={tmp_path}/no_ckpt", f"--input={SAMPLE}", f"--output={out}"]
    assert score.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output={out} exists; pass --overwrite to replace it"], err
    assert out.read_text() == "keep me\n"
    assert score.main(args + ["--overwrite"]) == 2  # past that check: now the missing checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_ckpt" in err[0] and "--overwrite" not in err[0], err
    assert out.read_text() == "keep me\n"


def test_input_takes_several_files_in_every_form(tmp_path, capsys):
    """`--input=A B C` (as the README writes it), `--input A B C` and `--input A --input B` all read every file."""
    from dro_jax import score

    base = ["--checkpoint=c", "--output=o.jsonl"]
    for form in (["--input=A", "B", "C"], ["--input", "A", "B", "C"], ["--input", "A", "--input=B", "C"],
                 ["--input=A", "--input", "B", "--input=C"]):
        assert score._parse_args(base[:1] + form + base[1:]).input == ["A", "B", "C"], form  # pylint: disable=protected-access
    assert score._parse_args(["--input=-odd.jsonl", *base]).input == ["-odd.jsonl"]  # pylint: disable=protected-access
    # Through main: both files reach the checks (here, the same file twice), not argparse's refusal.
    log = tmp_path / "log.jsonl"
    log.write_text(open(SAMPLE).read())
    assert score.main([f"--checkpoint={tmp_path}/no_ckpt", f"--input={log}", str(log),
                       f"--output={tmp_path}/out.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {log}:0: file: given twice;"), err


def test_original_lines_are_kept_across_files_skipped_lines_and_multi_record_lines(tmp_path):
    """What score writes for each record: its own line (extra fields kept) when that line is one
    flat record, else a flat record; found by walking each file alongside the records."""
    from dro_jax import score
    from dro_jax.data import logs

    a = tmp_path / "a.jsonl"
    a.write_text("\n".join([
        json.dumps({"prompt": "p1", "response": "r1", "label": True, "meta": {"k": 1}}),
        json.dumps({"prompt": "p2", "response": "r2"}),  # bad: no feedback, skipped
        "",
        json.dumps({"prompt": "p3", "response": "r3", "reward": 0.5, "meta": {"k": 3}}),
    ]) + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"instruction": "u", "completions": [
        {"response": "x", "overall_score": 9.0}, {"response": "y", "overall_score": 2.0}]}) + "\n"
        + json.dumps({"prompt": "p4", "response": "r4", "label": False, "id": "q"}) + "\n")
    records = logs.load_feedback_log([str(a), str(b)], on_bad_record="skip")
    objs = list(score._original_objects(records))
    assert objs == [
        {"prompt": "p1", "response": "r1", "label": True, "meta": {"k": 1}},
        {"prompt": "p3", "response": "r3", "reward": 0.5, "meta": {"k": 3}},
        {"prompt": "u", "response": "x", "reward": 9.0, "id": records[2].id},  # the reader's id for it
        {"prompt": "u", "response": "y", "reward": 2.0, "id": records[3].id},
        {"prompt": "p4", "response": "r4", "label": False, "id": "q"},
    ]


def test_scores_in_the_training_dtype_start_the_log_ratio_at_zero(tmp_path):
    """A float32 checkpoint scored as it is, then trained in bfloat16: the log-ratio starts off
    zero by rounding alone. `--dtype=bfloat16` scores as the run computes."""
    import dataclasses

    from dro_jax import score

    _, init = _initial_checkpoint(tmp_path)
    bf16 = models.DROModel(dataclasses.replace(tiny_config(vocab_size=384), dtype="bfloat16"))
    first = {}
    for dtype in (None, "bfloat16"):
        out = str(tmp_path / f"scored_{dtype}.jsonl")
        score.score_log(checkpoint=init, inputs=[SAMPLE], output=out, inputs_length=16, targets_length=32,
                        batch_size=8, progress=False, dtype=dtype)
        task = f"score_dtype_{dtype}"
        data_tasks.register_feedback_task(task, paths=out, vocabulary=seqio.ByteVocabulary(), overwrite=True)
        metrics = trainer.train(
            model_dir=str(tmp_path / f"run_{dtype}"), model=bf16, task_name=task, task_feature_lengths=LENGTHS,
            batch_size=8, train_steps=1, initial_checkpoint_path=init, reference="precomputed", log_every=1,
            mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False)
        first[dtype] = (metrics["logratio/mean"], metrics["logratio/std"])
    # not exactly 0: XLA fuses the training step's bfloat16 ops differently (measured 7e-4 vs 1.6e-2)
    assert max(map(abs, first["bfloat16"])) < max(map(abs, first[None])) / 10, first


def test_a_lone_surrogate_in_a_field_nobody_reads_is_written_back_as_its_escape(tmp_path):
    """JSON allows "\\ud800", which UTF-8 cannot hold: score failed after scoring the whole log."""
    from dro_jax import score

    _, init = _initial_checkpoint(tmp_path)
    log = tmp_path / "log.jsonl"
    log.write_text('{"prompt": "p", "response": "r", "label": true, "meta": "\\ud800"}\n'
                   '{"prompt": "q 🙂", "response": "s", "label": false}\n')
    out = tmp_path / "scored.jsonl"
    assert score.score_log(checkpoint=init, inputs=[str(log)], output=str(out), inputs_length=16, targets_length=32,
                           progress=False) == (2, 0)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert '"meta": "\\ud800"' in lines[0] and json.loads(lines[0])["meta"] == "\ud800"
    assert "ref_logprob" in json.loads(lines[0])
    assert '"q 🙂"' in lines[1]  # other lines stay readable UTF-8


def test_an_interrupted_score_keeps_its_scores_and_the_same_command_finishes_them(tmp_path, capsys, monkeypatch):
    """Ctrl-C and SIGTERM keep the finished batches; rerun, the output equals one uninterrupted run's."""
    import signal

    from dro_jax import io_utils, score

    _, init = _initial_checkpoint(tmp_path)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "reward": i / 10}) + "\n"
                           for i in range(40)))
    run = lambda out, *extra: score.main([f"--checkpoint={init}", f"--input={log}", f"--output={tmp_path}/{out}",
                                          "--inputs_length=8", "--targets_length=8", "--batch_size=8", *extra])
    assert run("whole.jsonl") == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    capsys.readouterr()

    real, calls = io_utils.PartialOutput.maybe_save, []

    def interrupted_after(n, how):
        def maybe_save(self, rows, done):  # called once a batch's scores are kept
            calls.append(1)
            if len(calls) == n:
                if how == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)  # its handler raises here
                raise KeyboardInterrupt
            return real(self, rows, done)
        return maybe_save

    out, partial = tmp_path / "out.jsonl", tmp_path / ("out.jsonl" + io_utils.PartialOutput.SUFFIX)
    monkeypatch.setattr(io_utils.PartialOutput, "maybe_save", interrupted_after(2, "Ctrl-C"))
    assert run("out.jsonl") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"[score] stopped by Ctrl-C after 16 of 40 records; what it finished is kept in {partial}, and the same command "
        "continues from there")
    assert partial.exists() and not out.exists()
    assert_kept_work_names_the_weights(partial, init)
    assert run("out.jsonl", "--targets_length=16") == 2  # other lengths: other scores
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {partial} holds an interrupted run of other settings (targets_length: 8, now 16); rerun that "
        "command to finish it, or pass --overwrite to start over")
    calls.clear()
    monkeypatch.setattr(io_utils.PartialOutput, "maybe_save", interrupted_after(1, "SIGTERM"))
    assert run("out.jsonl") == 143
    err = capsys.readouterr().err
    assert "continuing an interrupted run: 16 of 40 records were done" in err
    assert "[score] stopped by SIGTERM after 24 of 40 records" in err
    monkeypatch.setattr(io_utils.PartialOutput, "maybe_save", real)
    # Stopped while writing, after the last batch: every score is kept.
    def write_interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(io_utils, "write_text_atomically", write_interrupted)
    assert run("out.jsonl") == 130
    assert "[score] stopped by Ctrl-C after 40 of 40 records" in capsys.readouterr().err
    monkeypatch.undo()
    assert run("out.jsonl") == 0
    assert "continuing an interrupted run: 40 of 40 records were done" in capsys.readouterr().err
    assert out.read_text() == whole and not partial.exists()


def test_kept_work_names_the_weights_not_only_their_path():
    """A run directory retrained to the same step has the same path and step: the digest of the
    weights tells the two apart, the same on the host and on a device."""
    from dro_jax import io_utils

    params = {"encoder": {"w": np.arange(20000, dtype=np.float32).reshape(100, 200)}, "b": np.ones(3, np.float32)}
    digest = io_utils.params_digest(params)
    assert io_utils.params_digest(jax.device_put(params)) == digest
    retrained = jax.tree_util.tree_map(lambda x: x + 1e-3, params)
    assert io_utils.params_digest(retrained) != digest
    renamed = {"decoder": params["encoder"], "b": params["b"]}
    assert io_utils.params_digest(renamed) != digest
