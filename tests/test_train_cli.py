"""The real `python -m dro_jax.train` CLI on the bundled sample log."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "gin_configs/runs/dro_tiny.gin"


def run_train(*args, timeout=600, devices=1, cwd=REPO):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the CLI runs on the one real CPU device, as a user would
    env.pop("PYTHONPATH", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "dro_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def scalar_tags(model_dir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(model_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensor_scalars(model_dir):
    """clu writes scalars as tensor summaries; read both kinds."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(model_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    out = {tag: [float(e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags()["tensors"]:
        vals = []
        for e in acc.Tensors(tag):
            arr = np.frombuffer(e.tensor_proto.tensor_content, np.float32) if e.tensor_proto.tensor_content \
                else np.array(e.tensor_proto.float_val, np.float32)
            if arr.size == 1:
                vals.append(float(arr[0]))
        if vals:
            out[tag] = vals
    return out


def tensor_scalar_steps(model_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of clu's scalar tensor summaries."""
    from tensorboard.backend.event_processing import event_accumulator

    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(model_dir, size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
        if all(v.size == 1 and v.dtype.kind == "f" for v in values.values()):  # not hparams' text
            out[tag] = {step: float(v.reshape(-1)[0]) for step, v in values.items()}
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("dro_tiny"))
    # a 4 x 2 (data x model) mesh: checkpoints written by sharded arrays. Two saves: the
    # save-time finiteness check once deadlocked XLA:CPU's collectives here.
    proc = run_train(f"--gin_file={RECIPE}", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=12",
                     "--gin.SAVE_EVERY_STEPS=6", "--gin.LOG_EVERY_STEPS=3", "--gin.MESH_MODEL=2",
                     devices=8)
    return model_dir, proc


def test_cli_trains_and_writes_checkpoints_and_metrics(tiny_run):
    model_dir, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # console progress with the DRO-V quantities
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[train] step")]
    assert lines and "step 12/12" in lines[-1]
    # what the run chose and waits for, and its end once the final checkpoint is written
    assert "[train] reference: a frozen copy of the initial policy" in proc.stdout, proc.stdout
    assert "[train] compiling the train step (step 1 waits for it)" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f"[train] done: step 12, checkpoint {os.path.join(model_dir, 'checkpoints', '12')} (written)")
    for key in ("loss/policy=", "loss/value=", "value/mean=", "logratio/mean=", "ETA"):
        assert key in lines[-1], lines[-1]
    # checkpoints at the save period and at the end
    steps = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())
    assert steps == [6, 12]
    # TensorBoard events with the loss parts and diagnostics
    tags = tensor_scalars(model_dir)
    for tag in ("loss/policy", "loss/value", "loss/total", "grad_norm/policy", "grad_norm/value",
                "learning_rate/policy", "learning_rate/value", "perf/tokens_per_sec", "perf/examples_per_sec",
                "perf/steps_per_sec", "nonfinite_steps_total", "skipped_nonfinite",
                *(f"{name}/{stat}" for name in ("value", "logratio", "advantage", "reward")
                  for stat in ("mean", "std"))):
        assert tag in tags, sorted(tags)
        assert all(np.isfinite(tags[tag]))
    assert len(tags["loss/policy"]) == 4
    # the operative gin config and the model metadata
    config = open(os.path.join(model_dir, "config.gin")).read()
    assert "trainer.train" in config and "DROModel" in config
    meta = json.load(open(os.path.join(model_dir, "dro_jax_model.json")))
    assert meta["vocabulary"] == "byte" and meta["network"]["d_model"] > 0


def test_checkpoint_loads_and_parameters_changed(tiny_run):
    import jax
    from dro_jax import checkpoints

    model_dir, proc = tiny_run
    assert proc.returncode == 0
    first = checkpoints.load_model_checkpoint(os.path.join(model_dir, "checkpoints", "6"))
    last = checkpoints.load_model_checkpoint(model_dir)
    assert last.step == 12 and first.step == 6
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(last.params))]
    assert max(diffs) > 0
    assert last.value_params is not None and "value_head" in last.value_params
    # only the params are read from the step (not the optimiser state and reference: RAM)
    state_dir = os.path.join(model_dir, "checkpoints", "12", "state")
    only = checkpoints._restore_tree(state_dir, only="params")
    full = checkpoints._restore_tree(state_dir)
    assert set(only) == {"params"} and {"opt_state", "params"} <= set(full)
    jax.tree_util.tree_map(np.testing.assert_array_equal, only["params"], full["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, last.params, full["params"]["policy"])
    with pytest.raises(checkpoints.CheckpointError, match="holds no 'nothing'"):
        checkpoints._restore_tree(state_dir, only="nothing")
    # a run trained on 2 devices loads on 1 (score/infer/convert on a smaller machine)
    code = ("from dro_jax import checkpoints; import jax; c = checkpoints.load_model_checkpoint(%r); "
            "print(len(jax.devices()), c.step)" % model_dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["1", "12"]
    # the step's metadata sits one level above the restored item: no warning that reads as damage
    assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-2000:]


def test_bad_log_stops_with_one_line_and_no_checkpoint(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "yo", "label": true}\n{"prompt": "hi", "label": true}\n')
    gin_file = tmp_path / "bad.gin"
    gin_file.write_text(
        f"include '{RECIPE}'\n"
        "import tasks.feedback\n"
        "MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()\n"
        "feedback.feedback_log_task.name = 'bad_log_for_test'\n"
        f"feedback.feedback_log_task.paths = ['{bad}']\n")
    model_dir = tmp_path / "run"
    proc = run_train(f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1, proc.stderr[-2000:]
    assert f"{bad}:2" in err[0] and "response" in err[0]
    assert "Traceback" not in proc.stderr
    assert not glob.glob(str(model_dir / "checkpoints" / "*"))


def test_missing_log_file_is_one_line(tmp_path):
    gin_file = tmp_path / "missing.gin"
    gin_file.write_text(
        f"include '{RECIPE}'\n"
        "import tasks.feedback\n"
        "MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()\n"
        "feedback.feedback_log_task.name = 'missing_log_for_test'\n"
        f"feedback.feedback_log_task.paths = ['{tmp_path}/nope.jsonl']\n")
    proc = run_train(f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{tmp_path}/run'")
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "nope.jsonl" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("recipe,loss_key", [("kto_tiny", "loss/kto"), ("sft_tiny", "loss/sft")])
def test_kto_and_sft_recipes_train_through_cli(tmp_path, capsys, recipe, loss_key):
    """The CLI's entry point in this process (the subprocess path is the DRO-V tests')."""
    model_dir = str(tmp_path / recipe)
    assert _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.LOG_EVERY_STEPS=2",
                            "--gin.SAVE_EVERY_STEPS=4", recipe=f"gin_configs/runs/{recipe}.gin") == 0
    assert f"{loss_key}=" in capsys.readouterr().out
    tags = tensor_scalars(model_dir)
    assert loss_key in tags and all(np.isfinite(tags[loss_key]))
    assert "learning_rate/policy" in tags and "learning_rate/value" not in tags  # no value network
    assert os.path.isdir(os.path.join(model_dir, "checkpoints", "4"))


def _main_in_process(*args, recipe=RECIPE):
    """The CLI's own entry point, in this process (its 8 fake devices), for errors that come
    before or during a short run; gin's global config is cleared around it."""
    import gin
    from dro_jax import train

    gin.clear_config()
    try:
        return train.main([f"--gin_file={recipe}", *args])
    finally:
        gin.clear_config()


@pytest.mark.parametrize("args,expected", [
    (("--gin.MODEL_DIR=%gin.REQUIRED",), "MODEL_DIR is not set"),
    (("--gin.BATCH_SIZE=5", "--gin.MESH_DATA=2"), "BATCH_SIZE=5 is not divisible"),
    (("--gin.INITIAL_CHECKPOINT_PATH='{tmp}/nowhere'",), "INITIAL_CHECKPOINT_PATH=%s/nowhere: no such file or directory"),
    (("--gin.BATCH_SIZE=6", "--gin.MESH_DATA=2", "--gin.trainer.train.microbatches=2"),
     "BATCH_SIZE=6 does not split into microbatches=2 on 2 data-parallel devices; use a multiple of 4"),
    (("--gin.TRAIN_STPES=2",), "--gin.TRAIN_STPES: no gin file uses the macro %TRAIN_STPES (did you mean TRAIN_STEPS?)"),
    (("--gin.TRAIN_STEPS=7.5",), "TRAIN_STEPS must be a positive integer, got 7.5"),
    (("--gin.LOG_EVERY_STEPS=0",), "LOG_EVERY_STEPS (trainer.train.log_every) must be a positive integer, got 0"),
    (("--gin.MESH_MODEL=3",), "mesh: model=3 does not divide the 8 devices"),
    (("--gin.MESH_DATA=16",), "mesh: data=16 x model=1 (MESH_DATA x MESH_MODEL) does not match the 8 devices here"),
    (("--gin.MESH_MODEL=8",), "MESH_MODEL=8 does not divide the 'heads' dimension (4) of parameter "),
    (("--gin.MODEL_DIR='{tmp}/a_file/run'",), "a_file is a file, not a directory"),
    (("--gin.TAU=oops",), """--gin.TAU=oops: cannot parse the value (a string needs inner quotes: --gin.TAU="'oops'")"""),
    (("--gin.MODEL_DIR={tmp}/run",), "--gin.MODEL_DIR=%s/run: cannot parse the value (a string needs inner quotes"),
    (("--gin.TASK_FEATURE_LENGTHS={{'inputs': 0, 'targets': 8}}",),
     "TASK_FEATURE_LENGTHS['inputs'] must be a positive integer, got 0"),
    (("--gin.TASK_FEATURE_LENGTHS={{'inputs': 8, 'targets': '8'}}",),
     "TASK_FEATURE_LENGTHS['targets'] must be a positive integer, got '8'"),
    # values that gin accepts and that would train wrongly without a word
    (("--gin.policy/optim.OptimizerConfig.clip_norm=-1",),
     "error: policy/OptimizerConfig.clip_norm (None: no clipping) must be a finite number > 0, got -1"),
    (("--gin.trainer.CheckpointConfig.keep=0",), "CheckpointConfig.keep (None keeps all) must be an integer >= 1, got 0"),
    (("--gin.trainer.DataConfig.shuffle='False'",), "DataConfig.shuffle must be True or False, got 'False'"),
    (("--gin.TAU=1e400",), "tau (TAU) must be a finite number > 0, got inf"),
    (("--gin.POLICY_LEARNING_RATE='x'",), "policy/OptimizerConfig.learning_rate (POLICY_LEARNING_RATE) must be a finite number > 0, got 'x'"),
    (("--gin.VALUE_LEARNING_RATE=-1",), "error: value/OptimizerConfig.learning_rate (VALUE_LEARNING_RATE) must be a finite number > 0"),
    (("--gin.SEED=1.5",), "seed (SEED) must be an integer, got 1.5"),
    (("--gin.trainer.train.dropout='False'",), "trainer.train.dropout must be True or False, got 'False'"),
    (("--gin.trainer.train.data=5",), "trainer.train.data must be a DataConfig (@trainer.DataConfig()), got 5"),
    (("--gin_file=gin_configs/runs/kto_tiny.gin", "--gin.trainer.DataConfig.pack=True"),
     "KTOModel cannot train on packed rows"),
    (("--gin_file=gin_configs/runs/kto_tiny.gin", "--gin.trainer.train.microbatches=2"),
     "KTOModel cannot accumulate microbatches (trainer.train.microbatches=2)"),
    (("--gin.EVAL_PERIOD=5",), "EVAL_PERIOD is set, but task"),
    (("--gin.EVAL_PERIOD=0",), "EVAL_PERIOD (trainer.EvalConfig.period; None: no evaluation) must be an integer >= 1"),
    (("--gin_file=gin_configs/runs/kto_tiny.gin", "--gin.BATCH_SIZE=1"),
     "BATCH_SIZE=1: KTO needs at least 2 examples a batch"),
    # values of the wrong type, which once ended in tracebacks deep inside
    (("--gin.DROPOUT_RATE=None",), "error: T5Config.dropout_rate must be a number in [0, 1), got None"),
    (("--gin.MODEL_CONFIG='tiny'",), "DROModel.config (MODEL_CONFIG) must be a network.T5Config"),
    (("--gin.trainer.train.model=None",), "trainer.train.model must be a model (@models.DROModel()"),
    (("--gin.INITIAL_CHECKPOINT_PATH=5",), "INITIAL_CHECKPOINT_PATH must be a path string or None, got 5"),
    (("--gin.MODEL_DIR=5",), "MODEL_DIR must be a string, got 5"),
    (("--gin.value/optim.OptimizerConfig.name='adm'",), "value/OptimizerConfig.name: expected adafactor|adamw|sgd"),
    (("--gin.MIXTURE_OR_TASK_NAME='dro_sample_feedbak'",),
     "MIXTURE_OR_TASK_NAME='dro_sample_feedbak': no seqio task or mixture of that name is registered; "
     "did you mean dro_sample_feedback"),
    (("--gin.TRAIN_STEPS", "3"), "unknown arguments: --gin.TRAIN_STEPS 3 (a binding is one argument: --gin.NAME=VALUE)"),
    (("--gin_file=gin_configs/t5x/dro_finetune_tiny.gin",),
     "No module named 't5x': this is a t5x recipe (gin_configs/t5x/), run it with python -m t5x.train"),
])
def test_configuration_mistakes_are_one_line(tmp_path, capsys, args, expected):
    (tmp_path / "a_file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    expected = expected.replace("%s", str(tmp_path)) if "%s" in expected else expected
    if not any("MODEL_DIR" in a for a in args):
        args.append(f"--gin.MODEL_DIR='{tmp_path}/run'")
    assert _main_in_process(*args) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("args,expected", [
    (("--gin_file=gin_configs/models/small.gin",), "was started with network.T5Config.d_ff=128, this configuration has 1024"),
    (("--gin_file=gin_configs/runs/kto_tiny.gin",), "holds a DROModel run, but this configuration trains a KTOModel"),
    (("--gin.BATCH_SIZE=8",), "was started with BATCH_SIZE=16, this configuration has 8"),
    (("--gin.SEED=7",), "was started with SEED (trainer.DataConfig.seed)=0, this configuration has 7, so the "
                        "resumed run would not continue the run's data order"),
    (("--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}",),
     "was started with TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 32}, this configuration has "
     "{'inputs': 8, 'targets': 8}"),
    (("--gin.trainer.DataConfig.pack=True",), "was started with trainer.DataConfig.pack=False, this configuration has True"),
    (("--gin.TAU=0.5",), "was started with TAU (models.DROModel.tau)=1.0, this configuration has 0.5"),
    (("--gin.models.DROModel.value_kind='shared'",),
     "was started with models.DROModel.value_kind='separate', this configuration has 'shared'"),
])
def test_resuming_under_another_model_is_one_line(tiny_run, capsys, args, expected):
    model_dir, proc = tiny_run
    assert proc.returncode == 0
    before = sorted(os.listdir(model_dir))
    assert _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=24", *args) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert sorted(os.listdir(model_dir)) == before


def test_a_finished_run_run_again_changes_nothing(tiny_run, capsys):
    """No file written or touched, and it says so; only the lock file names its new holder."""
    from dro_jax import io_utils

    model_dir, proc = tiny_run
    assert proc.returncode == 0

    def snapshot():
        return {os.path.relpath(os.path.join(d, f), model_dir): (os.stat(os.path.join(d, f)).st_size,
                                                                  os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(model_dir) for f in files}

    before = snapshot()
    # a resume never reads the initial checkpoint, which may be gone by then
    assert _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=12", "--gin.SAVE_EVERY_STEPS=6",
                            "--gin.LOG_EVERY_STEPS=3", "--gin.MESH_MODEL=2",
                            "--gin.INITIAL_CHECKPOINT_PATH='/nowhere/gone'") == 0
    assert "nothing to do" in capsys.readouterr().out
    after = snapshot()
    assert after.pop(io_utils.LOCK_FILE) and before.pop(io_utils.LOCK_FILE)
    assert after == before


def test_a_recipe_without_a_model_size_names_the_unset_macro(tmp_path, capsys):
    import gin
    from dro_jax import train

    gin.clear_config()
    try:
        code = train.main(["--gin_file=gin_configs/runs/dro.gin", f"--gin.MODEL_DIR='{tmp_path}/run'"])
    finally:
        gin.clear_config()
    assert code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert err == ["error: gin config: %MODEL_CONFIG used but never set (add a model size: "
                   "--gin_file=gin_configs/models/{tiny,small,base,large,xl,xxl}.gin)"], err
    assert not os.path.exists(tmp_path / "run")


def test_a_preempted_run_resumes_on_another_mesh_and_logs_every_step(tmp_path, capsys, monkeypatch):
    """SIGTERM between log lines: the steps since the last line are logged before the save. The
    run resumes on another slice shape (data=4 x model=2 with fsdp, from data=8) and ends where
    an uninterrupted run does, up to float32 reduction order. The resumed run's first line is its
    compiling step alone: its time, but no rate or ETA. The logged learning rate is the rate at
    that step, not the window's mean of the warm-up."""
    import signal

    from dro_jax import checkpoints, optim, trainer

    real, calls = trainer.make_dataset, []

    def dataset_with_a_sigterm(*a, **kw):
        for batch in real(*a, **kw):
            calls.append(1)
            if len(calls) == 7:  # the probe's batch, then the one of step 6: a real SIGTERM to this process
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    run = tmp_path / "run"
    args = (f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=10", "--gin.LOG_EVERY_STEPS=4",
            "--gin.SAVE_EVERY_STEPS=100", "--gin.POLICY_LEARNING_RATE=1e-3", "--gin.WARMUP_STEPS=10")
    monkeypatch.setattr(trainer, "make_dataset", dataset_with_a_sigterm)
    assert _main_in_process(*args) == 0
    monkeypatch.setattr(trainer, "make_dataset", real)
    saved = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert len(saved) == 1 and saved[0] in (6, 7), saved  # the poll may see the signal one step late
    logged = tensor_scalar_steps(str(run))
    assert sorted(logged["loss/policy"]) == [4, saved[0]]
    schedule = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=10), 10)[1]
    assert logged["learning_rate/policy"][4] == pytest.approx(float(schedule(3)), rel=1e-6)  # step 4 uses count 3
    capsys.readouterr()

    # resumed on another mesh; its first step compiles
    assert _main_in_process(*args, "--gin.LOG_EVERY_STEPS=1", "--gin.MESH_MODEL=2",
                            "--gin.sharding.MeshConfig.fsdp=True") == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[train] step")]
    assert lines[0].startswith(f"[train] step {saved[0] + 1}/10") and "compiling the step took" in lines[0], lines
    assert "steps/s" not in lines[0] and "ETA" in lines[1] and "steps/s" in lines[1], lines
    logged = tensor_scalar_steps(str(run))
    assert saved[0] + 1 not in logged["perf/steps_per_sec"] and 10 in logged["perf/steps_per_sec"]
    assert saved[0] + 1 in logged["loss/policy"]

    straight = tmp_path / "straight"
    assert _main_in_process(f"--gin.MODEL_DIR='{straight}'", *args[1:]) == 0
    a, b = checkpoints.load_model_checkpoint(str(run)), checkpoints.load_model_checkpoint(str(straight))
    assert a.step == b.step == 10
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.value_params)),
                    jax.tree_util.tree_leaves((b.params, b.value_params))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)  # measured: 2.4e-7 at most


def test_a_sigterm_in_the_last_step_reaches_the_callers_handler_after_the_save(tmp_path, capsys, monkeypatch):
    """The run is complete and saved, but a caller with a SIGTERM handler of its own (the demo,
    through io_utils.sigterm_interrupts) must stop as well, not go on to its next stage. The
    trainer's own handler is gone afterwards."""
    import signal

    from dro_jax import io_utils, trainer

    real, calls = trainer.make_dataset, []

    def dataset_with_a_sigterm(*a, **kw):
        for batch in real(*a, **kw):
            calls.append(1)
            if len(calls) == 4:  # the probe's batch, then steps 1-3: a real SIGTERM during the last step
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(trainer, "make_dataset", dataset_with_a_sigterm)
    run = tmp_path / "run"
    with io_utils.sigterm_interrupts():
        handler = signal.getsignal(signal.SIGTERM)
        code = _main_in_process(f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=3", "--gin.LOG_EVERY_STEPS=1")
        assert signal.getsignal(signal.SIGTERM) is handler
    assert code == 143
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [3]
    err = capsys.readouterr().err
    assert "[train] stopped by SIGTERM" in err and "Ctrl-C" not in err, err


def test_gin_mistakes_inside_files_name_the_file_and_line(tmp_path, capsys):
    """A typo'd macro, an unclosed bracket, a missing include, a recipe without a model."""
    cases = {
        "trainer.train.seed = %SEEDS\n": "%SEEDS used but never set, in dro_jax.trainer.train.seed ({f}:2); "
                                         "did you mean %SEED?",
        "trainer.train.seed = [1,\n\n": "{f}:2: '[' opened here is never closed",
        "include 'gin_configs/runs/dro_tinyy.gin'\n": "Unable to open file: gin_configs/runs/dro_tinyy.gin",
    }
    for i, (text, expected) in enumerate(cases.items()):
        f = tmp_path / f"case{i}.gin"
        f.write_text(f"include '{RECIPE}'\n{text}")
        assert _main_in_process(f"--gin_file={f}", f"--gin.MODEL_DIR='{tmp_path}/run'") == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(err) == 1 and expected.format(f=f) in err[0], err  # gin's own "Path not found" logs too
    assert _main_in_process(f"--gin.MODEL_DIR='{tmp_path}/run'", recipe="gin_configs/runs/base.gin") == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "nothing sets the model (trainer.train.model); give a recipe" in err[0], err
    assert not os.path.exists(tmp_path / "run")


def test_the_readmes_multi_host_variables_reach_jax_distributed(tmp_path):
    """JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID as the README gives them (jax
    itself reads only the first): a real one-process coordinator, then the run goes on to the mesh
    check. Bad values are one line."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
    env.pop("XLA_FLAGS", None)
    flags = [f"--gin_file={RECIPE}", f"--gin.MODEL_DIR='{tmp_path}/run'", "--gin.MESH_MODEL=3"]
    # The CLI's main, then what jax's distributed client was started with (one process alone
    # would reach the same mesh error without it).
    script = ("import json, sys\nfrom dro_jax import train\nfrom jax._src import distributed\n"
              f"code = train.main({flags!r})\ns = distributed.global_state\n"
              "print(json.dumps([s.client is not None, s.coordinator_address, s.num_processes, s.process_id]))\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: mesh: model=3 does not divide the 1 devices"], proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, f"localhost:{port}", 1, 0], proc.stdout
    args = [sys.executable, "-m", "dro_jax.train", *flags]
    proc = subprocess.run(args, cwd=REPO, env=dict(env, JAX_PROCESS_ID="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: JAX_PROCESS_ID=1 is not in [0, JAX_NUM_PROCESSES=1)"), proc.stderr[-2000:]


def test_gin_includes_resolve_from_another_directory(tmp_path):
    """The real CLI started outside the repository (no PYTHONPATH): the recipe, its includes and
    the task module are found, and the run gets as far as the mesh check."""
    proc = run_train(f"--gin_file={RECIPE}", f"--gin.MODEL_DIR='{tmp_path}/run'", "--gin.MESH_MODEL=3",
                     cwd=str(tmp_path), timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "mesh: model=3 does not divide" in errors[0], proc.stderr


def test_a_run_file_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A write other than a checkpoint's (here the run's metadata, where a folder is in the way;
    a full disk or a read-only mount alike) stops with one line naming the file, exit 1."""
    model_dir = tmp_path / "run"
    (model_dir / "dro_jax_model.json").mkdir(parents=True)
    assert _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2") == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "dro_jax_model.json" in err[0], err


def test_nonfinite_stop_leaves_no_half_written_checkpoint(tmp_path, capsys):
    """Step 1 blows the weights up, steps 2-4 are non-finite: the check at step 4 stops the run
    one step after step 3's asynchronous save started, and the run waits for that save."""
    model_dir = tmp_path / "run"
    code = _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=40", "--gin.LOG_EVERY_STEPS=1",
                            "--gin.SAVE_EVERY_STEPS=3", "--gin.POLICY_LEARNING_RATE=1e30",
                            "--gin.VALUE_LEARNING_RATE=1e30", "--gin.WARMUP_STEPS=0",
                            "--gin.trainer.train.max_nonfinite_steps=3")
    assert code == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "3 steps in a row had a non-finite loss" in err[0] and "(last at step 4)" in err[0], err
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["3"]  # no '*.orbax-checkpoint-tmp' left


def test_a_damaged_checkpoint_stops_the_resume_with_one_line(tiny_run, tmp_path, capsys):
    import shutil

    model_dir, proc = tiny_run
    assert proc.returncode == 0
    run = str(tmp_path / "run")
    shutil.copytree(model_dir, run)
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(run, "checkpoints", "12")) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:  # a disk that filled up, or a copy cut short
        f.truncate(os.path.getsize(largest) // 2)
    code = _main_in_process(f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=14", "--gin.MESH_MODEL=2")
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert f"{run}/checkpoints/12: cannot restore (" in err[0] and "move that folder away" in err[0], err
    assert "TensorStore details" not in err[0] and "<bound method" not in err[0], err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["12", "6"]  # nothing removed or added


_HOLD_LOCK = """
import sys, time
from dro_jax import io_utils
with io_utils.exclusive_dir_lock(sys.argv[1], "MODEL_DIR"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_a_busy_model_dir_is_one_line(tmp_path, capsys):
    from dro_jax import io_utils

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        import select

        assert select.select([holder.stdout], [], [], 120)[0], "the lock holder did not start"
        assert holder.stdout.readline().strip() == "locked"
        code = _main_in_process(f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=2")
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(err) == 1, err
        assert f"MODEL_DIR={run} is in use by another training run (pid {holder.pid} on " in err[0], err
        assert sorted(os.listdir(run)) == [io_utils.LOCK_FILE]  # the second run wrote nothing
    finally:
        holder.kill()  # as kill -9: no chance to unlock
        holder.wait()
    # the kernel dropped the dead holder's lock; its file is left and blocks nothing
    with io_utils.exclusive_dir_lock(str(run), "MODEL_DIR"):
        with open(run / io_utils.LOCK_FILE) as f:
            assert f.read().startswith(f"pid {os.getpid()} on ")


def test_a_short_run_whose_every_step_is_nonfinite_fails(tmp_path, capsys):
    # Rewards in the wrong units: finite, but (r - V)^2 overflows float32 in every batch. The
    # run is too short for max_nonfinite_steps (10) to stop it, yet it learned nothing.
    log_path = tmp_path / "huge.jsonl"
    log_path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "reward": (-1) ** i * 1e20}) + "\n"
                                for i in range(32)))
    gin_file = tmp_path / "huge.gin"
    gin_file.write_text("import tasks.feedback\n"
                        "MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()\n"
                        "feedback.feedback_log_task.name = 'huge_rewards_for_test'\n"
                        f"feedback.feedback_log_task.paths = ['{log_path}']\n")
    code = _main_in_process(f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                            "--gin.TRAIN_STEPS=3", "--gin.LOG_EVERY_STEPS=3")
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 1 and len(err) == 1 and "all 3 steps of this run had a non-finite loss" in err[0], err
    # no final checkpoint: a retry must not find the run "finished"
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*")), os.listdir(tmp_path / "run" / "checkpoints")


def test_a_log_scored_at_other_lengths_is_refused_only_when_its_scores_are_read(tmp_path, capsys):
    src = os.path.join(REPO, "tasks", "data", "sample_feedback.jsonl")
    records = [json.loads(l) for l in open(src)]
    log_path = tmp_path / "scored_at_8.jsonl"  # scores made at targets=8; the recipe cuts at 32
    log_path.write_text("".join(json.dumps({**r, "ref_logprob": -10.0,
                                            "ref_logprob_lengths": {"inputs": 16, "targets": 8}}) + "\n"
                                for r in records))
    gin_file = tmp_path / "scored.gin"
    gin_file.write_text("import tasks.feedback\n"
                        "MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()\n"
                        "feedback.feedback_log_task.name = 'scored_at_8_for_test'\n"
                        f"feedback.feedback_log_task.paths = ['{log_path}']\n")
    common = (f"--gin_file={gin_file}", "--gin.TRAIN_STEPS=1", "--gin.LOG_EVERY_STEPS=1")
    code = _main_in_process(*common, f"--gin.MODEL_DIR='{tmp_path / 'precomputed'}'")
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert f"{log_path}:" in err[0] and "ref_logprob: scored at inputs=16, targets=8 tokens" in err[0], err
    assert not os.path.exists(tmp_path / "precomputed")
    # a frozen reference never reads the log's scores
    assert _main_in_process(*common, f"--gin.MODEL_DIR='{tmp_path / 'frozen'}'",
                            "--gin.trainer.train.reference='frozen'") == 0


def test_a_log_scored_by_another_policy_is_warned_about(tmp_path, caplog):
    """ref_logprob made by some other checkpoint (here -10 for every record) while the run starts
    from random weights: trained against, but said at the first step."""
    src = os.path.join(REPO, "tasks", "data", "sample_feedback.jsonl")
    log_path = tmp_path / "scored_elsewhere.jsonl"
    log_path.write_text("".join(json.dumps({**json.loads(l), "ref_logprob": -10.0,
                                            "ref_logprob_lengths": {"inputs": 16, "targets": 32}}) + "\n"
                                for l in open(src)))
    gin_file = tmp_path / "scored.gin"
    gin_file.write_text("import tasks.feedback\n"
                        "MIXTURE_OR_TASK_NAME = @feedback.feedback_log_task()\n"
                        "feedback.feedback_log_task.name = 'scored_elsewhere_for_test'\n"
                        f"feedback.feedback_log_task.paths = ['{log_path}']\n")
    with caplog.at_level("WARNING", logger="dro_jax"):
        assert _main_in_process(f"--gin_file={gin_file}", "--gin.TRAIN_STEPS=1", "--gin.LOG_EVERY_STEPS=1",
                                f"--gin.MODEL_DIR='{tmp_path / 'run'}'") == 0
    warned = [r.getMessage() for r in caplog.records if "differs from the initial policy's log-probs" in r.getMessage()]
    assert len(warned) == 1 and "is INITIAL_CHECKPOINT_PATH unset?" in warned[0], caplog.text[-2000:]


def test_a_lock_that_cannot_be_taken_is_one_line(tmp_path):
    from dro_jax import io_utils

    (tmp_path / "file").write_text("")
    with pytest.raises(io_utils.DirectoryInUse) as e:
        with io_utils.exclusive_dir_lock(str(tmp_path / "file" / "run"), "MODEL_DIR"):
            pass
    assert str(e.value).startswith(f"MODEL_DIR={tmp_path}/file/run: cannot open the lock file ")
    assert len(str(e.value).splitlines()) == 1


def test_a_lock_held_without_a_note_is_still_one_line(tmp_path):
    import fcntl

    from dro_jax import io_utils

    run = tmp_path / "run"
    run.mkdir()
    with open(run / io_utils.LOCK_FILE, "w") as held:  # a holder that has not written its note
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(io_utils.DirectoryInUse, match=r"in use by another training run \(unknown process\)"):
            with io_utils.exclusive_dir_lock(str(run), "MODEL_DIR"):
                pass


def test_filtered_sft_with_carried_weights_warns(tmp_path, caplog):
    """Filtered SFT trains on thumbs-up records with weight 1: carried weights would be ignored."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        # stops right after the warning, at the mesh check, before any data is read
        assert _main_in_process("--gin_file=gin_configs/runs/sft_tiny.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
                                "--gin.trainer.DataConfig.carry_weights=True", "--gin.MESH_MODEL=3") == 2
    assert any("filtered SFT ignores per-record weights" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(tmp_path, capsys):
    """Disk full, a quota or a file-size limit: exit 1 and one line naming the folder (orbax's
    own error was a ValueError, reported as bad configuration with exit 2)."""
    import resource

    model_dir = tmp_path / "run"
    # files of at most 200 KiB while it runs (Python ignores SIGXFSZ: a larger write fails with EFBIG)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, hard))
    try:
        code = _main_in_process(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.SAVE_EVERY_STEPS=2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    stderr = capsys.readouterr().err
    assert code == 1, stderr[-3000:]
    err = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {model_dir}/checkpoints: a checkpoint write failed"), \
        stderr[-3000:]
    assert "rerun to resume from the last one" in err[0]


def test_a_value_error_inside_training_is_a_traceback_not_bad_input(tmp_path, monkeypatch, capsys):
    """The CLI reports ValueError as bad input (exit 2, one line); one raised after the checks,
    inside the step loop, is a bug and must keep its traceback."""
    from dro_jax import sharding

    calls = []

    def failing(batch, mesh):
        calls.append(1)
        raise ValueError("injected")

    monkeypatch.setattr(sharding, "host_batch_to_global", failing)
    with pytest.raises(ValueError, match=r"injected") as info:
        _main_in_process(f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=2")
    assert calls and any(entry.name == "failing" for entry in info.traceback)  # where it was raised
    assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]


def test_a_stopped_run_says_where_a_rerun_starts(tmp_path):
    """After a second Ctrl-C: the latest checkpoint, or none (the hint once named one that did not exist)."""
    import gin

    from dro_jax import gin_utils, train

    run = tmp_path / "run"
    gin.clear_config()
    try:
        gin_utils.parse([RECIPE], [f"MODEL_DIR='{run}'"])
        assert train._resume_point() == "no checkpoint was saved, so a rerun starts from the beginning"
        for step in ("4", "12"):
            (run / "checkpoints" / step).mkdir(parents=True)
        assert train._resume_point() == f"the latest checkpoint, {run}/checkpoints/12, is the resume point"
    finally:
        gin.clear_config()


def test_infer_and_evaluate_read_at_the_runs_lengths_unless_told(tiny_run, tmp_path, capsys):
    """A run trained at 16/32 tokens: its tools default to those, not to 512/256 (which cut nothing
    the run saw cut, so evaluate's numbers differed from the run's own evaluation)."""
    from dro_jax import evaluate, infer

    model_dir, proc = tiny_run
    assert proc.returncode == 0
    (tmp_path / "p.txt").write_text("hello\n")
    assert infer.main([f"--checkpoint={model_dir}", f"--prompts={tmp_path}/p.txt", f"--output={tmp_path}/o.jsonl",
                       "--max_length=4"]) == 0
    assert "[infer] --inputs_length=16: the run's TASK_FEATURE_LENGTHS" in capsys.readouterr().err
    # and responses that its training would not cut: targets 32 less the end-of-sequence token
    assert infer.main([f"--checkpoint={model_dir}", f"--prompts={tmp_path}/p.txt", f"--output={tmp_path}/o2.jsonl"]) == 0
    assert "[infer] --max_length=31: the run's TASK_FEATURE_LENGTHS targets less" in capsys.readouterr().err
    log = tmp_path / "long.jsonl"  # 30-byte prompts, 50-byte responses: cut at 16/32, not at 512/256
    log.write_text("".join(json.dumps({"prompt": f"{i:02d}" + "p" * 28, "response": "r" * 50, "label": i % 2 == 0})
                           + "\n" for i in range(6)))
    assert evaluate.main([f"--checkpoint={model_dir}", f"--log={log}", f"--reference={model_dir}"]) == 0
    out = capsys.readouterr()
    assert "[evaluate] --inputs_length=16 --targets_length=32: the run's TASK_FEATURE_LENGTHS" in out.err
    m = json.loads(out.out[out.out.index("{"):])
    assert (m["inputs_truncated"], m["targets_truncated"]) == (6, 6)
    # score too: its ref_logprobs are then those the run's own training would compute
    from dro_jax import score
    assert score.main([f"--checkpoint={model_dir}", f"--input={log}", f"--output={tmp_path}/scored.jsonl"]) == 0
    assert "[score] --inputs_length=16 --targets_length=32: the run's TASK_FEATURE_LENGTHS" in capsys.readouterr().err
    first = json.loads(open(tmp_path / "scored.jsonl").readline())
    assert first["ref_logprob_lengths"] == {"inputs": 16, "targets": 32}
    # reward mode samples up to --max_length: only the inputs' length is the run's
    (tmp_path / "demo_prompts.txt").write_text("shout: bako\n")  # one the demo's rater knows
    assert evaluate.main([f"--checkpoint={model_dir}", f"--prompts={tmp_path}/demo_prompts.txt", "--max_length=4",
                          "--gin_file=gin_configs/demo/evaluate_reward.gin"]) == 0
    err = capsys.readouterr().err
    assert "[evaluate] --inputs_length=16: the run's" in err and "--targets_length" not in err, err
