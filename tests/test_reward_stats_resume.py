"""Reward standardisation: statistics computed once over the log, stored with the run, reused on resume."""
import json
import os

import numpy as np
import pytest
import seqio

from dro_jax import models, optim, sharding, trainer
from dro_jax.data import rewards as data_rewards
from dro_jax.data import tasks as data_tasks
from tiny import tiny_config

TASK = "reward_stats_resume_test"


def _write_log(path, rewards):
    with open(path, "w") as f:
        for i, r in enumerate(rewards):
            f.write(json.dumps({"prompt": f"q{i % 7}", "response": f"a{i}", "reward": float(r)}) + "\n")


def _register(path):
    data_tasks.register_feedback_task(TASK, paths=str(path), vocabulary=seqio.ByteVocabulary(),
                                      reward_mapping=data_rewards.RewardMapping(standardize=True), overwrite=True)


def _train(model_dir, steps):
    return trainer.train(
        model_dir=model_dir, model=models.DROModel(tiny_config(vocab_size=384)), task_name=TASK,
        task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=8, train_steps=steps, log_every=1,
        mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
        policy_optimizer=optim.OptimizerConfig(warmup_steps=0), value_optimizer=optim.OptimizerConfig(warmup_steps=0),
        checkpoint_config=trainer.CheckpointConfig(save_every_steps=1))


def test_standardisation_stats_are_stored_and_survive_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    raw = np.random.default_rng(0).normal(30.0, 2.0, size=40)
    _write_log(log, raw)
    _register(log)
    model_dir = str(tmp_path / "run")
    first = _train(model_dir, 1)
    stored = data_rewards.RewardStats.load(os.path.join(model_dir, trainer.REWARD_STATS_FILE))
    np.testing.assert_allclose([stored.mean, stored.std], [raw.mean(), raw.std()], rtol=1e-6)
    # standardised over the whole log: mean 0 / variance 1
    z = [stored.standardize(r) for r in raw]
    np.testing.assert_allclose([np.mean(z), np.var(z)], [0.0, 1.0], atol=1e-6)
    # batches carry standardised rewards (|z| < 3 for these 40 draws), not raw ones (~30)
    assert abs(first["reward/mean"]) < 3.0

    # The log's rewards change (the same number of records: a log that grew is refused), the
    # task is read afresh as a new process would, and the run resumes: it must standardise with
    # the statistics it started with, not the new log's (which would give |z| < 3 again).
    _write_log(log, raw + 50.0)
    seqio.TaskRegistry.remove(TASK)
    _register(log)
    resumed = _train(model_dir, 2)
    now = data_tasks.get_reward_stats(TASK)
    np.testing.assert_allclose([now.mean, now.std], [stored.mean, stored.std], rtol=1e-9)
    assert resumed["reward/mean"] > 15.0  # (raw + 50 - 30) / 2: about 25


def test_a_fresh_start_ignores_stats_an_earlier_attempt_left(tmp_path):
    """An attempt killed before its first checkpoint leaves reward_stats.json; a fresh start
    (perhaps on another log) standardises with its own log's statistics and replaces the file."""
    log = tmp_path / "log.jsonl"
    raw = np.random.default_rng(1).normal(100.0, 10.0, size=40)
    _write_log(log, raw)
    _register(log)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    data_rewards.RewardStats(mean=0.0, std=1.0, count=3).save(str(model_dir / trainer.REWARD_STATS_FILE))
    metrics = _train(str(model_dir), 1)
    stored = data_rewards.RewardStats.load(str(model_dir / trainer.REWARD_STATS_FILE))
    np.testing.assert_allclose([stored.mean, stored.std], [raw.mean(), raw.std()], rtol=1e-6)
    assert abs(metrics["reward/mean"]) < 3.0  # standardised, not raw (~100)


def test_huge_rewards_give_finite_stats_and_strict_json(tmp_path):
    # Squaring 1e200 overflows float64: the std used to be inf, written as `Infinity`.
    stats = data_rewards.RewardStats.from_rewards([1e200, -1e200])
    assert (stats.mean, stats.std) == (0.0, 1e200)
    path = str(tmp_path / "reward_stats.json")
    stats.save(path)
    with open(path) as f:
        json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data_rewards.RewardStats.load(path) == stats
    with pytest.raises(ValueError, match="finite"):
        data_rewards.RewardStats(mean=0.0, std=float("inf"), count=2)


@pytest.mark.parametrize("text", ['{"count": 2, "mean": 0.0, "std": Infinity}',
                                  '{"mean": 0.0, "std": -1.0, "count": 2}',
                                  '{"mean": 0.0, "count": 2}', '{"mean": 0', '\xff'])
def test_bad_stats_file_names_the_file(tmp_path, text):
    path = tmp_path / "reward_stats.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        data_rewards.RewardStats.load(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}:0: reward_stats: ") and "\n" not in msg, msg
    if text == '{"mean": 0.0, "count": 2}':  # valid JSON: the key is what is wrong
        assert "missing key 'std' (the file holds ['count', 'mean'])" in msg, msg


def test_resume_refuses_a_switched_standardisation(tmp_path):
    """Started without standardisation, resumed with it (or the other way): the rewards, and so
    the objective, would change in the middle of the run."""
    log = tmp_path / "log.jsonl"
    _write_log(log, np.random.default_rng(2).normal(5.0, 1.0, size=24))
    for first, then in ((False, True), (True, False)):
        model_dir = str(tmp_path / f"run_{first}")
        for standardize, steps in ((first, 1), (then, 2)):
            data_tasks.register_feedback_task(
                TASK, paths=str(log), vocabulary=seqio.ByteVocabulary(),
                reward_mapping=data_rewards.RewardMapping(standardize=standardize), overwrite=True)
            if steps == 1:
                _train(model_dir, steps)
                assert os.path.isfile(os.path.join(model_dir, trainer.REWARD_STATS_FILE)) == first
            else:
                with pytest.raises(trainer.ConfigError, match=f"was started {'with' if first else 'without'} "
                                                              "reward standardisation"):
                    _train(model_dir, steps)


def test_a_mixture_stores_and_restores_each_tasks_stats(tmp_path, capsys):
    """A mixture of two standardised logs: each task's statistics are stored with the run, each
    task's truncation is reported, and a resume reuses each task's own statistics."""
    raw = {"mix_a": np.random.default_rng(3).normal(30.0, 2.0, size=24),
           "mix_b": np.random.default_rng(4).normal(-100.0, 10.0, size=24)}
    names = {}
    for key, values in raw.items():
        names[key] = f"{TASK}_{key}"
        _write_log(tmp_path / f"{key}.jsonl", values)
        data_tasks.register_feedback_task(names[key], paths=str(tmp_path / f"{key}.jsonl"),
                                          vocabulary=seqio.ByteVocabulary(),
                                          reward_mapping=data_rewards.RewardMapping(standardize=True), overwrite=True)
    mixture = f"{TASK}_mixture"
    seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, sorted(names.values()), default_rate=1.0)
    model_dir = str(tmp_path / "run")
    metrics = trainer.train(
        model_dir=model_dir, model=models.DROModel(tiny_config(vocab_size=384)), task_name=mixture,
        task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=8, train_steps=1, log_every=1,
        mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
        policy_optimizer=optim.OptimizerConfig(warmup_steps=0), value_optimizer=optim.OptimizerConfig(warmup_steps=0),
        checkpoint_config=trainer.CheckpointConfig(save_every_steps=1))
    assert abs(metrics["reward/mean"]) < 3.0  # both standardised (raw means 30 and -100)
    out = capsys.readouterr().out
    assert not os.path.exists(os.path.join(model_dir, trainer.REWARD_STATS_FILE))
    for key, name in names.items():
        assert f"[data] {name}/train: 24 examples," in out, out
        stored = data_rewards.RewardStats.load(os.path.join(model_dir, f"reward_stats.{name}.json"))
        np.testing.assert_allclose([stored.mean, stored.std], [raw[key].mean(), raw[key].std()], rtol=1e-6)
    # One log's rewards change and it is read afresh: the resume keeps the stored statistics.
    _write_log(tmp_path / "mix_a.jsonl", raw["mix_a"] + 500.0)
    seqio.TaskRegistry.remove(names["mix_a"])
    data_tasks.register_feedback_task(names["mix_a"], paths=str(tmp_path / "mix_a.jsonl"),
                                      vocabulary=seqio.ByteVocabulary(),
                                      reward_mapping=data_rewards.RewardMapping(standardize=True))
    seqio.MixtureRegistry.remove(mixture)  # it holds the task objects it was made with
    seqio.MixtureRegistry.add(mixture, sorted(names.values()), default_rate=1.0)
    trainer._restore_reward_stats(model_dir, mixture)  # pylint: disable=protected-access
    for key, name in names.items():
        now = data_tasks.get_reward_stats(name)
        np.testing.assert_allclose([now.mean, now.std], [raw[key].mean(), raw[key].std()], rtol=1e-6)


def test_a_mixture_run_from_before_per_task_statistics_resumes(tmp_path, caplog):
    """Runs written before per-task statistics stored none for a mixture's tasks (and no
    `objective` in dro_jax_model.json): they resume with a warning and store them from then on."""
    import logging

    _write_log(tmp_path / "old.jsonl", np.random.default_rng(5).normal(3.0, 1.0, size=16))
    name = f"{TASK}_old"
    data_tasks.register_feedback_task(name, paths=str(tmp_path / "old.jsonl"), vocabulary=seqio.ByteVocabulary(),
                                      reward_mapping=data_rewards.RewardMapping(standardize=True), overwrite=True)
    seqio.MixtureRegistry.remove(f"{name}_mixture")
    seqio.MixtureRegistry.add(f"{name}_mixture", [name], default_rate=1.0)
    model_dir = str(tmp_path / "run")
    kw = dict(model=models.DROModel(tiny_config(vocab_size=384)), task_name=f"{name}_mixture",
              task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=8, log_every=1,
              mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False)
    trainer.train(model_dir=model_dir, train_steps=1, **kw)
    stats_file = os.path.join(model_dir, f"reward_stats.{name}.json")
    os.remove(stats_file)  # as such a run left its directory
    meta_file = os.path.join(model_dir, "dro_jax_model.json")
    meta = json.load(open(meta_file))
    del meta["objective"]
    json.dump(meta, open(meta_file, "w"))
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer.train(model_dir=model_dir, train_steps=2, **kw)
    assert "older than per-task statistics" in caplog.text
    assert os.path.isfile(stats_file)


def test_resume_refuses_another_thumbs_mapping():
    """A thumbs-down worth 0 instead of -1 is another objective (and `evaluate` reads the record);
    an older run's record without an objective is not checked."""
    started = {"objective": {"tau": 1.0, "logprob_normalization": "sum"},
               "reward_mapping": {"thumbs_up": 1.0, "thumbs_down": -1.0, "standardize": False}}
    now = {"objective": {"tau": 1.0, "logprob_normalization": "sum", "value_kind": "separate"},
           "reward_mapping": {"thumbs_up": 1.0, "thumbs_down": 0.0, "standardize": False}}
    with pytest.raises(trainer.ConfigError, match=r"was started with the task's reward_mapping.thumbs_down=-1.0, "
                                                  r"this configuration has 0.0; resume with the run's own config"):
        trainer._check_same_objective("run", started, now)
    trainer._check_same_objective("run", {"reward_mapping": started["reward_mapping"]}, now)
    trainer._check_same_objective("run", started, dict(now, reward_mapping=started["reward_mapping"]))


def test_resume_refuses_a_log_that_grew(tmp_path):
    """Records appended to the log since the start change the shuffled order, so skipping the
    checkpoint's batches would not continue the run's data: refused, naming the counts."""
    log = tmp_path / "log.jsonl"
    _write_log(log, np.random.default_rng(5).normal(0.0, 1.0, size=24))
    _register(log)
    model_dir = str(tmp_path / "run")
    _train(model_dir, 1)
    with open(log, "a") as f:
        f.write(json.dumps({"prompt": "q", "response": "more", "reward": 0.5}) + "\n")
    seqio.TaskRegistry.remove(TASK)  # as a new process would, read the log again
    _register(log)
    with pytest.raises(trainer.ConfigError, match=rf"was started with a 'train' log of \{{'{TASK}': 24\}} records "
                                                  rf"\(by task\), which now has \{{'{TASK}': 25\}} \(records added or removed, "
                                                  rf"or other files matched by its paths\), so .* resume "
                                                  "with the log as it was or start a new MODEL_DIR"):
        _train(model_dir, 2)
