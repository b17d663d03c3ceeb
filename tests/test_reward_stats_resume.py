"""Reward standardisation: statistics computed once over the log, stored with the run, reused on resume."""
import json
import os

import numpy as np
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

    # The log changes (new records), the task is registered afresh, and the run resumes:
    # it must standardise with the statistics it started with, not the new log's.
    _write_log(log, np.concatenate([raw, np.full(40, 80.0)]))
    _register(log)
    _train(model_dir, 2)
    now = data_tasks.get_reward_stats(TASK)
    np.testing.assert_allclose([now.mean, now.std], [stored.mean, stored.std], rtol=1e-9)
