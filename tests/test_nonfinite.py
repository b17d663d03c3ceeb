"""A step with a non-finite reward or loss changes nothing, is counted, and never reaches a checkpoint."""
import jax
import numpy as np
import pytest

from dro_jax import models, optim, sharding, train_state
from tiny import random_batch, tiny_config


# A rate that changes from the first update to the second, so the logged one says which it was.
OPTIMIZER = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="linear_decay")


def _setup():
    model = models.DROModel(tiny_config())
    mesh_config = sharding.MeshConfig(data=1, model=1)
    mesh = sharding.create_mesh(mesh_config, jax.devices()[:1])
    rules = sharding.logical_axis_rules(mesh_config)
    txs, scheds = {}, {}
    for k in ("policy", "value"):
        txs[k], scheds[k] = optim.make_optimizer(OPTIMIZER, 10)
    batch = random_batch()
    state, sh = train_state.create_state(model, txs, {k: v.shape for k, v in batch.items()}, mesh, rules,
                                         with_ref=True)
    step = train_state.jit_train_step(train_state.make_train_step(model, txs, scheds), sh, mesh)
    return state, step, batch, mesh


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_reward_skips_update_and_counts(bad):
    state, step, batch, mesh = _setup()
    before = jax.device_get(state.params)
    batch = dict(batch)
    batch["rewards"] = batch["rewards"].copy()
    batch["rewards"][3] = bad
    with sharding.use_mesh(mesh):
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    assert int(state.nonfinite_total) == 1 and int(state.nonfinite_in_a_row) == 1
    assert int(state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    assert bool(train_state.tree_is_finite((state.params, state.opt_state)))
    # a good batch afterwards updates again and resets the streak
    good = random_batch(seed=1)
    with sharding.use_mesh(mesh):
        state, metrics = step(state, sharding.host_batch_to_global(good, mesh))
    assert float(metrics["skipped_nonfinite"]) == 0.0
    assert int(state.nonfinite_in_a_row) == 0 and int(state.nonfinite_total) == 1
    # the logged learning rate is the one the optimiser used: its count skipped the bad step
    sched = optim.make_schedule(OPTIMIZER, 10)
    assert float(sched(1)) < 0.95 * float(sched(0))
    np.testing.assert_allclose(metrics["learning_rate/policy"], sched(0), rtol=1e-6)
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(state.params))))
    assert moved > 0


def test_tree_is_finite_detects_nan():
    assert not bool(train_state.tree_is_finite({"a": np.array([1.0, np.nan]), "b": np.ones(2)}))
    assert bool(train_state.tree_is_finite({"a": np.array([1.0, 2.0]), "n": np.arange(3)}))


_FINITE_CHECK_ON_A_MESH = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dro_jax import trainer
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", "model")))
params = {f"w{i}": put(np.ones((16, 32), np.float32)) for i in range(100)}
for _ in range(20):
    assert bool(jax.device_get(trainer._state_is_finite(params, {"mu": params})))
bad = np.ones((16, 32), np.float32)
bad[9, 30] = np.nan
assert not bool(jax.device_get(trainer._state_is_finite(params, {"mu": {"w7": put(bad)}})))
print("finite-check-ok")
"""


def test_save_time_finite_check_runs_on_a_sharded_cpu_mesh():
    # Regression: run eagerly, this check dispatched one all-reduce program per leaf, and
    # XLA:CPU deadlocked on them ("Termination timeout ... all reduce"), killing training.
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_collective_call_terminate_timeout_seconds=15"
                        " --xla_cpu_collective_call_warn_stuck_timeout_seconds=10")
    proc = subprocess.run([sys.executable, "-c", _FINITE_CHECK_ON_A_MESH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "finite-check-ok" in proc.stdout, proc.stderr[-2000:]


def test_a_nonfinite_initial_checkpoint_is_refused_before_training(tmp_path):
    import os

    import flax.linen as nn
    import jax.numpy as jnp
    import seqio

    from dro_jax import checkpoints, trainer
    from dro_jax.data import tasks as data_tasks

    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "tasks", "data", "sample_feedback.jsonl")
    data_tasks.register_feedback_task("nonfinite_init_test", paths=sample, vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    config = tiny_config(vocab_size=384)
    shapes = {"encoder_input_tokens": (2, 16), "decoder_input_tokens": (2, 32)}
    params = nn.meta.unbox(models.DROModel(config).get_initial_variables(jax.random.PRNGKey(1), shapes)["params"])
    # bfloat16, as HF and t5x checkpoints often are (numpy does not count it as inexact)
    policy = jax.tree_util.tree_map(lambda x: np.array(x, jnp.bfloat16), params["policy"])
    leaf = jax.tree_util.tree_leaves(policy)[3]
    leaf.reshape(-1)[[0, 5]] = [np.nan, np.inf]
    init = str(tmp_path / "init")
    checkpoints.save_model_checkpoint(init, config=config, params=policy, vocabulary_path="byte")
    with pytest.raises(trainer.ConfigError, match=rf"policy parameter .* holds 2 non-finite values"):
        trainer.train(model_dir=str(tmp_path / "run"), model=models.DROModel(config),
                      task_name="nonfinite_init_test", task_feature_lengths={"inputs": 16, "targets": 32},
                      batch_size=8, train_steps=2, initial_checkpoint_path=init, reference="frozen",
                      mesh_config=sharding.MeshConfig(data=1, model=1))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_skipped_step_does_not_make_its_log_window_inf(tmp_path, capsys):
    """The logged loss of a window averages its finite steps; skipped_nonfinite is the fraction."""
    import types

    from clu import metric_writers

    from dro_jax import trainer

    pending = [{"loss/policy": np.float32(v), "skipped_nonfinite": np.float32(s), "tokens": np.float32(10),
                "sequences": np.float32(8)}
               for v, s in ((1.0, 0), (np.inf, 1), (3.0, 0), (np.nan, 1))]
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    window = {"t": 0.0, "steps": 4, "skip": 0}
    # 7 skipped since the run began, 2 of them in this window
    avg = trainer._log_window(writer, pending, window, 4, 8, 0.0, types.SimpleNamespace(nonfinite_total=np.int32(7)))
    assert avg["loss/policy"] == 2.0 and avg["skipped_nonfinite"] == 0.5 and avg["nonfinite_steps_total"] == 7.0
    assert "loss/policy=2 skipped 2 non-finite steps" in capsys.readouterr().out  # the window's, on the console
    all_bad = trainer._log_window(writer, pending[1:2], dict(window), 5, 8, 0.0,
                                  types.SimpleNamespace(nonfinite_total=np.int32(3)))
    # a preemption right after the step that compiled (reset out of the window): no timed step, no rate
    untimed = trainer._log_window(writer, pending[:1], dict(window, steps=0, skip=1), 1, 8, 0.0,
                                  types.SimpleNamespace(nonfinite_total=np.int32(0)))
    writer.close()
    assert np.isinf(all_bad["loss/policy"]) and all_bad["skipped_nonfinite"] == 1.0
    assert untimed["loss/policy"] == 1.0 and not any(k.startswith("perf/") for k in untimed)


def test_only_write_failures_become_the_save_error_and_none_hides_another(tmp_path, caplog):
    """A failed write (OSError, or tensorstore's ValueError naming the OS error) is one line; any
    other error passes unchanged; and a save failure at the end never replaces an error (or a
    Ctrl-C) already on its way out."""
    import logging

    from dro_jax import trainer

    with pytest.raises(trainer.TrainingError, match=r"^/ckpt: a checkpoint write failed, seen when saving step 4 "
                                                     r"\(\[Errno 28\] No space left"):
        with trainer._saving("/ckpt", "step 4"):
            raise OSError(28, "No space left on device")
    with pytest.raises(trainer.TrainingError, match="OUT_OF_RANGE: Error writing"):
        with trainer._saving("/ckpt", "step 4"):
            raise ValueError('OUT_OF_RANGE: Error writing "params/0" ... [os_error_code=\'27\']')
    bug = ValueError("a shape mismatch")
    with pytest.raises(ValueError) as info:
        with trainer._saving("/ckpt", "step 4"):
            raise bug
    assert info.value is bug

    # The end of a run: orbax's own async manager, whose write fails under a file-size limit
    # (Python ignores SIGXFSZ, so the write gets EFBIG), as the trainer's does.
    import resource

    import orbax.checkpoint as ocp

    def finish(directory, first=None):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            manager = ocp.CheckpointManager(directory, item_names=("state",), options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=True, create=True))
            state = {"w": np.random.default_rng(0).random(2 ** 18, np.float32)}  # 1 MiB, incompressible
            manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
            try:
                if first is not None:
                    raise first
            finally:
                trainer._finish_saves(manager)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    with trainer._QuietFailedWrites():
        with pytest.raises(trainer.TrainingError, match=r"a checkpoint write failed, seen when saving the last"):
            finish(tmp_path / "alone")
        for i, first in enumerate((KeyboardInterrupt(), ValueError("the real error"))):
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="dro_jax"), pytest.raises(type(first)) as info:
                finish(tmp_path / f"under_{i}", first)
            assert info.value is first
            assert f"also: {tmp_path}/under_{i}: a checkpoint write failed" in caplog.text, caplog.text


def test_orbax_reports_of_a_failed_write_are_dropped_and_nothing_else(caplog):
    """While a run writes, orbax's threads report a failed write in pages of tracebacks before
    the save's own error arrives (which the run reports in one line): those reports, and only
    those, are dropped; the hooks are restored afterwards."""
    import logging
    import sys
    import types

    from dro_jax import trainer

    seen = []
    before = sys.unraisablehook
    filters_before = {name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio")}
    sys.unraisablehook = seen.append
    try:
        with caplog.at_level(logging.ERROR), trainer._QuietFailedWrites():
            logging.getLogger("absl").error("_SignalingThread.run() raised an exception: OUT_OF_RANGE: Error writing "
                                            "\"x\" ... [os_error_code='27']")
            logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=(
                ValueError, ValueError("Failed to write 27926 bytes to file 15: File too large"), None))
            logging.getLogger("absl").error("something else broke")
            for exc in (RuntimeError("Event loop is closed"), RuntimeError("another")):
                sys.unraisablehook(types.SimpleNamespace(exc_value=exc))
        assert sys.unraisablehook == seen.append
    finally:
        sys.unraisablehook = before
    assert [r.getMessage() for r in caplog.records] == ["something else broke"]
    assert [str(u.exc_value) for u in seen] == ["another"]
    assert {name: logging.getLogger(name).filters for name in ("absl", "asyncio")} == filters_before


def test_the_orbax_filter_stays_only_after_orbax_failures():
    """After a failed write or read, orbax's threads may still report it, so the filter stays; after
    any other error (a refused resume, a Ctrl-C) it goes, or it would pile up and hide later reports."""
    import logging

    from dro_jax import trainer

    absl = logging.getLogger("absl")
    for error, stays in ((trainer.ConfigError("refused"), False), (KeyboardInterrupt(), False),
                         (trainer.ConfigError("x: cannot restore (Encountered error while reading array)"), True)):
        before = list(absl.filters)
        quiet = trainer._QuietFailedWrites(trainer._WRITE_FAILURE + trainer._READ_FAILURE, stay_after_error=True)
        with pytest.raises(type(error)):
            with quiet:
                raise error
        assert (quiet in absl.filters) == stays, error
        quiet.__exit__(None, None, None)  # this test's own clean-up
        assert absl.filters == before
