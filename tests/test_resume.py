"""Preemption and crashes: kill -9 and SIGTERM, then resume, equal an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dro_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough that each signal lands before the end even with fast (scanned, cached) steps: the
# Ctrl-C stage starts a few steps after the SIGTERM one stopped, and 20 steps once left it none.
STEPS = 40


def _cmd(model_dir):
    return [sys.executable, "-m", "dro_jax.train", "--gin_file=gin_configs/runs/dro_tiny.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}", "--gin.SAVE_EVERY_STEPS=2",
            "--gin.LOG_EVERY_STEPS=1", "--gin.network.T5Config.dropout_rate=0.1",
            "--gin.trainer.CheckpointConfig.keep=100"]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _start_and_interrupt(model_dir, sig, after_step, group=False):
    """Starts a run and sends `sig` once a checkpoint of at least `after_step` exists; `group`:
    to its whole process group, as a terminal's Ctrl-C does (the stderr filter included)."""
    proc = subprocess.Popen(_cmd(model_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if any(s >= after_step for s in _steps(model_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    time.sleep(np.random.default_rng(0).uniform(0.0, 0.5))  # somewhere inside a later step
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _run_to_end(model_dir):
    proc = subprocess.run(_cmd(model_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _final(model_dir):
    ckpt = checkpoints.load_model_checkpoint(model_dir)
    assert ckpt.step == STEPS
    return jax.tree_util.tree_leaves({"p": ckpt.params, "v": ckpt.value_params})


def _assert_finite(model_dir):
    for step in _steps(model_dir):
        ckpt = checkpoints.load_model_checkpoint(os.path.join(model_dir, "checkpoints", str(step)))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves((ckpt.params, ckpt.value_params)))


def test_kill9_and_sigterm_then_resume_equals_uninterrupted(tmp_path):
    reference = str(tmp_path / "uninterrupted")
    _run_to_end(reference)

    resumed = str(tmp_path / "interrupted")
    rc, _, _ = _start_and_interrupt(resumed, signal.SIGKILL, after_step=2)
    assert rc == -signal.SIGKILL
    killed_at = _steps(resumed)
    assert killed_at and max(killed_at) < STEPS

    rc, out, err = _start_and_interrupt(resumed, signal.SIGTERM, after_step=max(killed_at) + 2)
    assert rc == 0, err[-3000:]  # preemption: save and exit 0
    assert "[train] done" not in out  # a preempted run is not a finished one
    assert "resumed from step" in err
    after_term = _steps(resumed)
    assert max(after_term) > max(killed_at) and max(after_term) < STEPS

    # Ctrl-C saves too, and exits 0, rather than losing the steps since the last save
    rc, out, err = _start_and_interrupt(resumed, signal.SIGINT, after_step=max(after_term) + 2, group=True)
    assert rc == 0 and "Ctrl-C: saving a checkpoint after this step" in err and "Traceback" not in err, err[-3000:]
    assert "SIGINT: saving step" in err
    after_int = _steps(resumed)
    assert max(after_int) > max(after_term) and max(after_int) < STEPS

    proc = _run_to_end(resumed)
    assert "resumed from step" in proc.stderr
    for a, b in zip(_final(reference), _final(resumed)):
        # XLA may reorder float reductions between a fresh and a restored process
        # (observed |diff| ~4e-6 after 14 steps); a wrong data order or RNG is ~1e-2.
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    _assert_finite(resumed)  # (a finished run run again: tests/test_train_cli.py)


def test_resuming_under_another_process_count_is_refused(tmp_path):
    """Each process reads its own shard of the data, so the batches of a resumed run depend on
    the process count: a run started on 2 hosts does not continue its data order on 1."""
    import pytest

    from dro_jax import models, trainer
    from dro_jax.trainer import DataConfig
    from tiny import tiny_config

    model = models.DROModel(tiny_config())
    lengths = {"inputs": 8, "targets": 8}
    here = trainer._data_order(lengths, DataConfig())
    assert here["processes"] == jax.process_count()
    checkpoints.write_run_metadata(str(tmp_path), config=model.config, vocabulary_path="byte",
                                   extra={"task": "t", "model": "DROModel", "batch_size": 8,
                                          "data_order": dict(here, processes=2)})
    with pytest.raises(trainer.ConfigError, match=r"started with the number of processes=2, this configuration "
                                                  r"has 1, so the resumed run would not continue .*resume with 2 "
                                                  r"processes"):
        trainer._check_resumable(str(tmp_path), model, "t", 8, here)
    with pytest.raises(trainer.ConfigError, match=r"started with the number of processes=2, this configuration "
                                                  r"has 1, so the resumed run would not continue"):
        trainer._check_resumable(str(tmp_path), model, "t", 8, here)
    checkpoints.write_run_metadata(str(tmp_path), config=model.config, vocabulary_path="byte",
                                   extra={"task": "t", "model": "DROModel", "batch_size": 8, "data_order": here})
    trainer._check_resumable(str(tmp_path), model, "t", 8, here)


def test_resume_position_is_exact_and_reading_up_to_it_shows_progress(monkeypatch, capsys):
    import seqio

    from dro_jax import trainer
    from dro_jax.data import tasks as data_tasks

    sample = os.path.join(REPO, "tasks", "data", "sample_feedback.jsonl")
    data_tasks.register_feedback_task("skip_progress_test", paths=sample, vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    args = ("skip_progress_test", {"inputs": 16, "targets": 16}, 8, trainer.DataConfig())
    whole = trainer.make_dataset(*args)
    expected = [next(whole) for _ in range(9)][5:]
    monkeypatch.setattr(trainer, "SKIP_PROGRESS_EVERY_S", 0.0)
    resumed = trainer.make_dataset(*args, skip_batches=5)
    for want in expected:
        got = next(resumed)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    out = capsys.readouterr().out
    assert "[data] resuming: read 1/5 batches to reach the checkpoint's position (20%), ETA" in out
    assert "[data] resuming: read 5 batches in" in out


def test_the_loops_signal_check_is_one_poll_late_on_every_host():
    """With several processes the step loop does not wait for the device in every step: a poll
    returns the previous poll's max over all devices (tests/multiprocess_worker.py runs it on 2
    processes; here the same path on one process's 8 devices)."""
    from dro_jax import sharding, trainer

    mesh = sharding.create_mesh(sharding.MeshConfig(data=4, model=2))
    agreement = trainer._LaggedAgreement(mesh, multi_host=True)
    assert [agreement.poll(f) for f in (False, True, False, False, True, True)] == [
        False, False, True, False, False, True]
    assert [trainer._LaggedAgreement(mesh).poll(f) for f in (False, True)] == [False, True]  # one process
