"""Evaluation on a held-out split during training: equals the model's loss on the whole split."""
import json
import os

import jax
import numpy as np
import pytest
import seqio

from dro_jax import checkpoints, models, optim, sharding, trainer
from dro_jax.data import tasks as data_tasks
from dro_jax.data.converters import DROFeatureConverter
from test_train_cli import tensor_scalars
from tiny import tiny_config

LENGTHS = {"inputs": 8, "targets": 8}


def _write(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"q{i % 5}", "response": f"a{rng.integers(100)}", "reward": float(rng.normal()),
                                "ref_logprob": float(-20 + rng.normal())}) + "\n")
    return str(path)


def _train(tmp_path, task, model, eval_config, steps=3, mesh=sharding.MeshConfig(data=2, model=1),
           data=trainer.DataConfig()):
    return trainer.train(data=data,
        model_dir=str(tmp_path / "run"), model=model, task_name=task, task_feature_lengths=LENGTHS, batch_size=4,
        train_steps=steps, log_every=1, mesh_config=mesh, dropout=False, eval_config=eval_config,
        policy_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=0),
        value_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=0))


def test_eval_metrics_equal_the_loss_on_the_whole_split(tmp_path, capsys):
    """7 held-out records in batches of 4 (the last padded): the eval metrics equal the model's
    own loss_fn on all 7 as one batch, with the parameters of the step they were taken at."""
    paths = {"train": _write(tmp_path / "train.jsonl", 16, 0), "validation": _write(tmp_path / "val.jsonl", 7, 1)}
    data_tasks.register_feedback_task("validation_test", paths=paths, vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    model = models.DROModel(tiny_config(vocab_size=384), tau=0.5)
    last = _train(tmp_path, "validation_test", model, trainer.EvalConfig(period=2))
    out = capsys.readouterr().out
    assert "[data] validation_test/validation: 7 examples, 0 truncated" in out, out
    assert [l.split(" (")[0].split()[2] for l in out.splitlines() if l.startswith("[eval]")] == ["2/3", "3/3"], out

    ckpt = checkpoints.load_model_checkpoint(str(tmp_path / "run"))
    assert ckpt.step == 3
    ds = seqio.get_dataset("validation_test", task_feature_lengths=LENGTHS, dataset_split="validation",
                           shuffle=False, num_epochs=1, feature_converter=DROFeatureConverter(pack=False))
    whole = next(ds.batch(7).as_numpy_iterator())
    _, expected = model.loss_fn({"policy": ckpt.params, "value": ckpt.value_params}, whole, None)
    assert last["eval/examples"] == 7
    for key in ("loss/policy", "loss/value", "logratio/mean", "logratio/std", "value/mean", "value/std",
                "reward/mean", "reward/std", "advantage/mean"):
        np.testing.assert_allclose(last[f"eval/{key}"], float(expected[key]), rtol=2e-5, atol=1e-6, err_msg=key)
    tags = tensor_scalars(str(tmp_path / "run"))
    assert len(tags["eval/loss/policy"]) == 2 and tags["eval/loss/policy"][-1] == pytest.approx(
        last["eval/loss/policy"], rel=1e-6)
    # named as training names it (loss/total), so the two plot side by side
    assert "loss/total" in tags and "eval/loss" not in tags
    np.testing.assert_allclose(tags["eval/loss/total"][-1], float(expected["loss/policy"] + expected["loss/value"]),
                               rtol=2e-5)


def test_a_missing_eval_split_is_one_config_error_and_writes_nothing(tmp_path):
    data_tasks.register_feedback_task("validation_missing", paths=_write(tmp_path / "train.jsonl", 8, 0),
                                      vocabulary=seqio.ByteVocabulary(), overwrite=True)
    with pytest.raises(trainer.ConfigError, match="EVAL_PERIOD is set, but task validation_missing has no usable "
                                                  "'validation' split"):
        _train(tmp_path, "validation_missing", models.DROModel(tiny_config(vocab_size=384)),
               trainer.EvalConfig(period=1))
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ValueError, match="EVAL_PERIOD"):
        trainer.EvalConfig(period=0)


@pytest.mark.parametrize("kind", ["packed_dro_v", "sft", "kto"])
def test_eval_of_packed_rows_sft_and_kto(tmp_path, kind):
    """Packed DRO-V and filtered SFT also equal their loss on the whole split; KTO's batch-level
    KL point differs by batch, so it is only checked to run and be finite."""
    paths = {"train": _write(tmp_path / "train.jsonl", 16, 2), "validation": _write(tmp_path / "val.jsonl", 7, 3)}
    data_tasks.register_feedback_task(f"validation_{kind}", paths=paths, vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    model = {"packed_dro_v": models.DROModel(tiny_config(vocab_size=384)),
             "sft": models.FilteredSFTModel(tiny_config(vocab_size=384), min_reward=-10.0),
             "kto": models.KTOModel(tiny_config(vocab_size=384))}[kind]
    last = _train(tmp_path, f"validation_{kind}", model, trainer.EvalConfig(period=3), steps=3,
                  data=trainer.DataConfig(pack=kind == "packed_dro_v"))
    key = {"packed_dro_v": "loss/policy", "sft": "loss/sft", "kto": "loss/kto"}[kind]
    assert np.isfinite(last[f"eval/{key}"])
    # examples/s counts examples, not rows: a packed row of 4 holds several (one window = one step)
    per_step = last["perf/examples_per_sec"] / last["perf/steps_per_sec"]
    if kind == "packed_dro_v":
        assert per_step == pytest.approx(last["examples"], rel=1e-5) and per_step > 4
    else:
        assert per_step == pytest.approx(4, rel=1e-5)
    if kind == "kto":  # the padding row of the last batch is in no count
        assert last["eval/kto/num_desirable"] + last["eval/kto/num_undesirable"] == 7
        return
    assert last["eval/examples"] == 7  # SFT keeps every reward above -10, but not the padding row
    ckpt = checkpoints.load_model_checkpoint(str(tmp_path / "run"))
    ds = seqio.get_dataset(f"validation_{kind}", task_feature_lengths=LENGTHS, dataset_split="validation",
                           shuffle=False, num_epochs=1, feature_converter=DROFeatureConverter(pack=False))
    whole = next(ds.batch(7).as_numpy_iterator())
    params = {"policy": ckpt.params, "value": ckpt.value_params or {}}
    _, expected = model.loss_fn(params, whole, None)
    np.testing.assert_allclose(last[f"eval/{key}"], float(expected[key]), rtol=2e-5, atol=1e-6)


def test_a_mixture_is_evaluated_on_every_record_of_each_task(tmp_path, capsys):
    """seqio's mixture sampler stops at its first exhausted task; evaluation reads each in full."""
    names = []
    for k, (n_train, n_val) in enumerate(((12, 5), (8, 3))):
        name = f"validation_mix_{k}"
        data_tasks.register_feedback_task(name, vocabulary=seqio.ByteVocabulary(), overwrite=True, paths={
            "train": _write(tmp_path / f"train{k}.jsonl", n_train, 10 + k),
            "validation": _write(tmp_path / f"val{k}.jsonl", n_val, 20 + k)})
        names.append(name)
    seqio.MixtureRegistry.remove("validation_mix")
    seqio.MixtureRegistry.add("validation_mix", names, default_rate=1.0)
    model = models.DROModel(tiny_config(vocab_size=384))
    last = _train(tmp_path, "validation_mix", model, trainer.EvalConfig(period=2), steps=2)
    assert last["eval/examples"] == 8
    ckpt = checkpoints.load_model_checkpoint(str(tmp_path / "run"))
    parts = [next(seqio.get_dataset(name, task_feature_lengths=LENGTHS, dataset_split="validation", shuffle=False,
                                    num_epochs=1, feature_converter=DROFeatureConverter(pack=False))
                  .batch(8).as_numpy_iterator()) for name in names]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _, expected = model.loss_fn({"policy": ckpt.params, "value": ckpt.value_params}, whole, None)
    np.testing.assert_allclose(last["eval/loss/policy"], float(expected["loss/policy"]), rtol=2e-5, atol=1e-6)
