"""The demo: the environment's hidden rater, and a reduced end-to-end run where DRO-V must beat the reference."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dro_jax.demo import env as env_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_rule_and_noise():
    env = env_lib.Environment(follow_prob=0.1, label_noise=0.2)
    assert env.ideal_response("shout: bako") == "bako!"
    assert env.follows_rule("ask: dure", "dure?") and not env.follows_rule("ask: dure", "dure!")
    assert not env.follows_rule("say: zimo", "zimo. ")
    assert env.reward("say: zimo", "zimo.") == 1.0 and env.reward("say: zimo", "zim.") == -1.0
    with pytest.raises(ValueError):
        env.parse("sing: la")
    train = env.prompts(500, seed=1)
    held = env.prompts(200, seed=2, exclude=train)
    assert len(set(train)) == 500 and not set(train) & set(held)
    assert env.prompts(500, seed=1) == train  # reproducible
    rng = np.random.default_rng(0)
    demos = [env.demonstration(p, rng) for p in train * 4]
    rate = np.mean([env.follows_rule(p, d) for p, d in zip(train * 4, demos)])
    # 0.1 + 0.9 / 3 (one of three marks at random); 2,000 draws: 3 sigma is 0.033
    assert env.expected_demo_rate() == pytest.approx(0.4) and abs(rate - 0.4) < 0.033
    responses = [env.ideal_response(p) for p in train * 4]
    labels = env.rate(train * 4, responses, np.random.default_rng(0))
    assert abs(np.mean(labels) - 0.8) < 0.027  # every reply is right; 20% of 2,000 labels flipped (3 sigma)
    with pytest.raises(ValueError):
        env_lib.Environment(label_noise=0.5)


def test_reduced_demo_dro_v_beats_reference(tmp_path):
    """`python -m dro_jax.demo --reduced`: reference 20-60% thumbs-up; DRO-V clearly above it."""
    out = tmp_path / "report"
    env = dict(os.environ)
    # One CPU device and full LLVM optimisation: this run is compute-bound, unlike the rest.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f
                                and "backend_optimization_level" not in f)
    # the suite's compilation cache, not the user's ~/.cache/dro_jax
    env["DRO_JAX_COMPILATION_CACHE"] = env.get("JAX_COMPILATION_CACHE_DIR", "")
    proc = subprocess.run([sys.executable, "-m", "dro_jax.demo", "--reduced", "--methods=dro_v", "--seed=0",
                           f"--output={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| DRO-V |" in proc.stdout  # the table is printed
    results = json.loads((out / "results.json").read_text())
    ref, dro = results["methods"]["reference"], results["methods"]["dro_v"]
    for m in (ref, dro):
        assert set(m) >= {"thumbs_up_rate", "thumbs_up_ci95", "kl_to_reference", "n_eval", "heldout_dro_loss"}
        lo, hi = m["thumbs_up_ci95"]
        assert 0 <= lo <= m["thumbs_up_rate"] <= hi <= 1 and m["n_eval"] >= 200
    assert 0.2 <= ref["thumbs_up_rate"] <= 0.6, ref
    margin = dro["thumbs_up_rate"] - ref["thumbs_up_rate"]
    widths = [m["thumbs_up_ci95"][1] - m["thumbs_up_ci95"][0] for m in (ref, dro)]
    assert margin > max(widths), (ref, dro)              # larger than either whole 95% interval
    assert dro["thumbs_up_ci95"][0] > ref["thumbs_up_ci95"][1]  # the intervals do not overlap
    assert dro["kl_to_reference"] > 0.0
    assert results["curves"]["dro_v"][0]["step"] == 0 and len(results["curves"]["dro_v"]) >= 3
    assert (out / "results.md").is_file()
    for png in ("thumbs_up_over_steps.png", "thumbs_up_vs_kl.png"):
        assert (out / png).stat().st_size > 1000


def test_demo_stopped_during_training_writes_no_report(tmp_path, capsys, monkeypatch):
    """A first Ctrl-C makes trainer.train save the step it reached and return normally: the demo
    must stop there (exit 1, one line) instead of reporting the short run as the full one. (A
    SIGTERM reaches the demo's own handler after the save: test_train_cli tests that part.)

    The stop is simulated (a real signal needs a compiled training step, about 20 s more)."""
    from dro_jax import trainer
    from dro_jax.demo import __main__ as demo_main

    def preempted(*, model_dir, train_steps, **kw):  # what the trainer leaves after a Ctrl-C at step 3
        assert train_steps > 3
        os.makedirs(os.path.join(model_dir, "checkpoints", "3"))
        return {}

    monkeypatch.setattr(trainer, "train", preempted)
    out = tmp_path / "report"
    # A previous demo's output there: replaced at start, so no old report outlives the stop.
    (out / "runs" / "kto").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"methods": {}, "config": {}, "wall_time_s": 1.0}))
    (out / "results.md").write_text("old table")
    rc = _demo_main(monkeypatch, ["--reduced", "--methods=dro_v", f"--output={out}", "--steps=50"])
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert captured.err.strip().splitlines() == [
        "error: training reference stopped at step 3 of 300 (Ctrl-C?); nothing is reported"], captured.err
    # --steps=50, below the default eval period (75), was taken: the period follows it
    assert "trained reference" not in captured.out and "2/5" not in captured.out
    assert "replacing the previous demo there" in captured.out
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
    assert not (out / "runs" / "kto").exists() and (out / demo_main.MARKER).is_file()


def _demo_main(monkeypatch, argv):
    """The demo's main in this process, restoring its process-wide logging settings."""
    import logging

    from absl import logging as absl_logging

    from dro_jax.demo import __main__ as demo_main

    monkeypatch.setattr(demo_main, "_compilation_cache", lambda: None)
    loggers = logging.root.manager.loggerDict
    levels = {n: lg.level for n, lg in loggers.items() if isinstance(lg, logging.Logger)}
    verbosity = absl_logging.get_verbosity()
    try:
        return demo_main.main(argv)
    finally:
        for n, lg in list(loggers.items()):
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(n, logging.NOTSET))
        absl_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_outside_training_is_one_line(tmp_path, capsys, monkeypatch, signum, code):
    """A real signal while the demo draws its prompts (outside any training run)."""
    from dro_jax.demo import pipeline

    real = pipeline.draw_prompts

    def signalled(*a, **kw):
        os.kill(os.getpid(), signum)
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "draw_prompts", signalled)
    out = tmp_path / "report"
    before = signal.getsignal(signal.SIGTERM)
    assert _demo_main(monkeypatch, ["--reduced", "--methods=dro_v", f"--output={out}"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert err == [f"error: stopped by {name} (environment: '<shout|ask|say>: <word>', the user wants the word "
                   "+ '!'/'?'/'.'; demonstrator follows it 10% of the time, label noise 10%); nothing is reported"], err
    assert signal.getsignal(signal.SIGTERM) == before and not (out / "results.json").exists()


def test_an_output_folder_with_other_files_is_refused(tmp_path, capsys, monkeypatch):
    """The demo replaces only its own output: a folder holding anything else is left alone."""
    mine = tmp_path / "experiments" / "runs" / "reference" / "my_model.msgpack"
    mine.parent.mkdir(parents=True)
    mine.write_text("precious")
    assert _demo_main(monkeypatch, ["--reduced", f"--output={tmp_path / 'experiments'}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --output={tmp_path / 'experiments'}: {tmp_path / 'experiments'} holds files that are not a demo's "
        "(such as runs), which the demo would not replace; give a new or empty folder, or remove it"]
    assert mine.read_text() == "precious" and not captured.out
    # the runs/ an older demo (before the marker) leaves when stopped in training is the demo's
    (tmp_path / "old" / "runs" / "reference").mkdir(parents=True)
    (tmp_path / "old" / "runs" / "data").mkdir()
    (tmp_path / "old" / "runs" / "data" / "eval_prompts.jsonl").write_text('{"prompt": "say: x"}\n')
    from dro_jax.demo import __main__ as demo_main
    assert demo_main._check_output(str(tmp_path / "old")) is True


@pytest.mark.parametrize("args,expected", [
    (["--steps=0"], "--steps must be positive, got 0"),
    (["--eval_every=1000"], "--eval_every must be at most --steps (150) for a curve, got 1000"),
    (["--tau=nan"], "--tau must be a finite number > 0, got nan"),
    (["--n_log=3"], "--n_log must be at least the batch size"),
    (["--label_noise=0.7"], "--label_noise must be in [0, 0.5), got 0.7"),
    # held-out prompts differ from the 1500 SFT and the log ones: 7350 in all, fewer than 8000
    (["--n_log=8000"], "--n_log must be at most 6219 with --n_eval=256 ("),
    (["--n_log=6220"], "--n_log must be at most 6219 with --n_eval=256 ("),
    (["--n_eval=5000"], "--n_eval must be at most 4926 with --n_log=1024 ("),
    (["--n_log=5000", "--n_eval=2000"], "--n_eval must be at most 1347 with --n_log=5000 ("),
    (["--seed=-1"], "--seed must be in [0, "),
    (["--seed=9223372036854775807"], "--seed must be in [0, 9223372036854775], got"),
    (["--output=FILE"], "FILE is not a folder"),
    (["--output=FILE/report"], "FILE is not a folder"),
])
def test_bad_demo_flags_name_the_flag(tmp_path, capsys, args, expected):
    from dro_jax.demo import __main__ as demo_main

    import logging

    import jax

    cache_dir, absl_level = jax.config.jax_compilation_cache_dir, logging.getLogger("absl").level
    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    output = [] if any(a.startswith("--output=") for a in args) else [f"--output={tmp_path}/out"]
    assert demo_main.main(["--reduced", *output, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and expected.replace("FILE", str(tmp_path / "FILE")) in err[0], err
    assert not captured.out  # refused before "[demo] writing to ..."
    assert not os.path.exists(tmp_path / "out") and (tmp_path / "FILE").read_text() == "not a folder"
    # refused flags leave the calling process's settings alone
    assert (jax.config.jax_compilation_cache_dir, logging.getLogger("absl").level) == (cache_dir, absl_level)
