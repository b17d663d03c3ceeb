"""Gradient accumulation and the reference modes of the pure train step."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_jax import models, optim, sharding, train_state
from tiny import random_batch, tiny_config


SGD = optim.OptimizerConfig(name="sgd", learning_rate=0.05, warmup_steps=0, clip_norm=None)


def _run(model, batches, microbatches=1, with_ref=True, data=1, hlo=None, optimizer=SGD,
         initial=None):
    mesh_config = sharding.MeshConfig(data=data, model=1)
    mesh = sharding.create_mesh(mesh_config, jax.devices()[:data])
    rules = sharding.logical_axis_rules(mesh_config)
    txs, scheds = {}, {}
    for k in ("policy", "value"):
        txs[k], scheds[k] = optim.make_optimizer(optimizer, 10)
    shapes = {k: v.shape for k, v in batches[0].items()}
    state, sh = train_state.create_state(model, txs, shapes, mesh, rules, with_ref=with_ref)
    step = train_state.jit_train_step(
        train_state.make_train_step(model, txs, scheds, microbatches=microbatches, dropout=False), sh, mesh)
    out = []
    if initial is not None:
        initial.append(jax.device_get(state.params))
    with sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        if hlo is not None:
            hlo.append(step.lower(state, sharding.host_batch_to_global(batches[0], mesh)).compile().as_text())
        for b in batches:
            state, m = step(state, sharding.host_batch_to_global(b, mesh))
            out.append(jax.device_get(m))
    return jax.device_get(state.params), out


def test_microbatches_stay_on_their_devices():
    """Accumulation equals the full batch, and on a data-sharded batch each microbatch takes
    rows from every device (a strided split), so no batch data moves between devices."""
    model = models.DROModel(tiny_config())
    batches = [random_batch(seed=0, batch=16, reward_kind="scalar")]
    hlo = []
    full, m_full = _run(model, batches, data=8)
    acc, m_acc = _run(model, batches, microbatches=2, data=8, hlo=hlo)
    np.testing.assert_allclose(m_full[0]["loss/total"], m_acc[0]["loss/total"], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(acc)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    moves = re.findall(r"\b(all-gather|collective-permute|all-to-all)(?:-start)?\(", hlo[0])
    assert not moves, f"microbatching moves batch data between devices: {sorted(set(moves))}"


def test_microbatches_equal_full_batch_with_unequal_denominators():
    """Weighted DRO and filtered SFT: microbatch means are weighted by their own denominators."""
    weighted = [dict(random_batch(seed=s, batch=8, reward_kind="scalar"),
                     weights=np.array([1, 1, 1, 1, 0, 0, 0, 5], np.float32)) for s in range(2)]
    sft_batches = [random_batch(seed=s, batch=8) for s in range(2)]
    for b in sft_batches:  # one microbatch without any thumbs-up response
        b["rewards"][:2] = -1.0
    for model, batches in ((models.DROModel(tiny_config()), weighted),
                           (models.FilteredSFTModel(tiny_config()), sft_batches)):
        full, m_full = _run(model, batches)
        acc, m_acc = _run(model, batches, microbatches=4)
        for a, b in zip(m_full, m_acc):  # every metric, the */std ones included
            assert set(a) == set(b)
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"{type(model).__name__} {k}")
        for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(acc)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=type(model).__name__)


def test_frozen_reference_starts_at_zero_logratio_and_stays_frozen():
    model = models.DROModel(tiny_config())
    batches = [random_batch(seed=s, batch=8) for s in range(3)]
    _, metrics = _run(model, batches)
    assert abs(float(metrics[0]["logratio/mean"])) < 1e-6  # reference == initial policy
    assert abs(float(metrics[-1]["logratio/mean"])) > 1e-4  # policy moved, reference did not


def test_reference_copy_in_bfloat16_scores_identically_in_half_the_memory():
    """The frozen reference stores matmul weights in the compute dtype: same log-probs."""
    import jax.numpy as jnp

    for tied in (False, True):
        cfg = tiny_config(dtype="bfloat16", tie_word_embeddings=tied)
        model = models.DROModel(cfg)
        batch = random_batch(seed=1)
        shapes = {k: v.shape for k, v in batch.items()}
        policy = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]["policy"])
        ref = train_state.reference_params(policy, cfg)
        dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(ref)}
        assert all(d == jnp.bfloat16 for k, d in dtypes.items() if k.endswith("['kernel']")), dtypes
        assert all(d == jnp.float32 for k, d in dtypes.items() if k.endswith("['scale']")), dtypes
        emb = [d for k, d in dtypes.items() if k.endswith("['embedding']")]
        assert emb == [jnp.float32 if tied else jnp.bfloat16], (tied, emb)
        nbytes = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))
        assert nbytes(ref) < 0.55 * nbytes(policy)
        got = jax.jit(model.reference_features)(ref, batch)["ref_logprobs"]
        want = jax.jit(model.reference_features)(policy, batch)["ref_logprobs"]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"tied={tied}")


def test_frozen_relative_attention_bias_gets_no_gradient_and_no_update():
    """freeze_relative_attention_bias: the rel_embedding tables get zero gradients (every other
    gradient is the trainable-bias model's) and stay put under AdamW's weight decay."""
    batch = random_batch(seed=3, batch=8, reward_kind="scalar")
    batch["ref_logprobs"] = np.full(8, -20.0, np.float32)
    trained = models.DROModel(tiny_config())
    frozen = models.DROModel(tiny_config(freeze_relative_attention_bias=True))
    params = nn.meta.unbox(trained.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})["params"])
    # The value head starts at zero (no gradient reaches the value encoder): nudge it.
    params["value"] = jax.tree_util.tree_map(lambda x: x + 0.05, params["value"])
    grads = [jax.jit(jax.grad(lambda p: m.loss_fn(p, batch, None)[0]))(params)
             for m in (trained, frozen)]
    is_relpos = lambda path: "relpos_bias" in train_state._keypath(path)
    n_relpos = 0
    for (path, g_trained), g_frozen in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                                           jax.tree_util.tree_leaves(grads[1])):
        if is_relpos(path):
            n_relpos += 1
            assert np.abs(g_trained).max() > 0 and not np.any(g_frozen), path
        else:
            np.testing.assert_allclose(g_frozen, g_trained, rtol=1e-5, atol=1e-7)
    assert n_relpos == 3  # policy encoder and decoder, value encoder

    adamw = optim.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=0,
                                  weight_decay=0.1, clip_norm=None)
    init = []
    after, _ = _run(frozen, [batch], optimizer=adamw, initial=init)
    for (path, p0), p1 in zip(jax.tree_util.tree_leaves_with_path(init[0]),
                              jax.tree_util.tree_leaves(after)):
        if is_relpos(path):
            np.testing.assert_array_equal(p1, p0)
        elif "kernel" in train_state._keypath(path):
            assert np.abs(p1 - p0).max() > 1e-4, path  # weight decay alone moves these


def test_one_sided_rewards_warn_for_kto_sign_and_filtered_sft(caplog):
    import logging

    from dro_jax import trainer

    raw_scores = np.array([3.0, 7.0, 9.0, 1.0], np.float32)  # UltraFeedback-style 1-10
    thumbs = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer._check_one_sided(models.KTOModel(tiny_config()), raw_scores, "of the log")
        assert "KTOModel's threshold 0" in caplog.text and "desirable='batch_mean'" in caplog.text
        caplog.clear()
        trainer._check_one_sided(models.FilteredSFTModel(tiny_config()), raw_scores, "of the log")
        assert "is above MIN_REWARD=0; raise MIN_REWARD" in caplog.text
        caplog.clear()
        # No warning: thumbs on both sides, the batch-mean rule, or DRO-V (which uses rewards as they are).
        trainer._check_one_sided(models.KTOModel(tiny_config()), thumbs, "of the log")
        trainer._check_one_sided(models.FilteredSFTModel(tiny_config()), thumbs, "of the log")
        trainer._check_one_sided(models.KTOModel(tiny_config(), desirable="batch_mean"), raw_scores, "of the log")
        trainer._check_one_sided(models.DROModel(tiny_config()), raw_scores, "of the log")
        assert caplog.text == ""
    # Filtered SFT with nothing above its threshold (e.g. an all-thumbs-up log, standardised to 0s)
    with pytest.raises(trainer.ConfigError, match="filtered SFT has nothing to train on: no reward of the training log"):
        trainer._check_one_sided(models.FilteredSFTModel(tiny_config()), np.zeros(6, np.float32), "of the training log")
    # a first batch alone (a task that is not a feedback log) may be unlucky: a warning only
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer._check_one_sided(models.FilteredSFTModel(tiny_config()), np.zeros(6, np.float32), "of the first batch")
    assert "every reward of the first batch" in caplog.text
    # DRO-V on raw scores: a word on their scale (standardised rewards and thumbs get none)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer._check_reward_scale(models.DROModel(tiny_config()), raw_scores, "of the training log")
        assert "have mean 5 and std 3.16; the paper standardises them" in caplog.text, caplog.text
        caplog.clear()
        trainer._check_reward_scale(models.DROModel(tiny_config()), thumbs, "of the training log")
        standardised = (raw_scores - raw_scores.mean()) / raw_scores.std()
        trainer._check_reward_scale(models.DROModel(tiny_config()), standardised, "of the training log")
        trainer._check_reward_scale(models.KTOModel(tiny_config(), desirable="batch_mean"), raw_scores, "of the log")
        assert caplog.text == ""


def test_the_whole_log_decides_one_sidedness_not_the_first_batch(tmp_path, caplog):
    """A log with one thumbs down among many thumbs up: a first batch of only thumbs up must not
    warn; an all-thumbs-up log, standardised (all 0), stops filtered SFT before anything is written."""
    import json
    import logging

    import seqio

    from dro_jax import sharding, trainer
    from dro_jax.data import rewards as data_rewards
    from dro_jax.data import tasks as data_tasks

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "label": i != 15}) + "\n"
                           for i in range(16)))
    kw = dict(task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=4, train_steps=1,
              mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
              data=trainer.DataConfig(shuffle=False))
    data_tasks.register_feedback_task("one_sided_test", paths=str(log), vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer.train(model_dir=str(tmp_path / "kto"), model=models.KTOModel(tiny_config(vocab_size=384)),
                      task_name="one_sided_test", **kw)
    assert "threshold" not in caplog.text, caplog.text
    log.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "label": True}) + "\n" for i in range(8)))
    data_tasks.register_feedback_task("one_sided_test", paths=str(log), vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True, reward_mapping=data_rewards.RewardMapping(standardize=True))
    with pytest.raises(trainer.ConfigError, match="filtered SFT has nothing to train on"):
        trainer.train(model_dir=str(tmp_path / "sft"), model=models.FilteredSFTModel(tiny_config(vocab_size=384)),
                      task_name="one_sided_test", **kw)
    assert not (tmp_path / "sft").exists()
    # with carried weights, a thumbs up of weight 0 trains nothing: only weight > 0 counts
    log.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "label": i % 2 == 0,
                                       "weight": 0.0 if i % 2 == 0 else 1.0}) + "\n" for i in range(8)))
    data_tasks.register_feedback_task("one_sided_test", paths=str(log), vocabulary=seqio.ByteVocabulary(),
                                      overwrite=True)
    kw["data"] = trainer.DataConfig(shuffle=False, carry_weights=True)
    with pytest.raises(trainer.ConfigError, match="no reward of the training log's records of weight > 0"):
        trainer.train(model_dir=str(tmp_path / "sft_w"), model=models.FilteredSFTModel(tiny_config(vocab_size=384)),
                      task_name="one_sided_test", **kw)
    assert not (tmp_path / "sft_w").exists()


def test_warmup_is_not_cut_to_a_short_run():
    """A run shorter than WARMUP_STEPS ramps as a longer one would, so resuming with more steps
    continues the same ramp (the rate never drops)."""
    cfg = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=5)
    short, longer = optim.make_schedule(cfg, 3), optim.make_schedule(cfg, 6)
    rates = [float(short(s)) for s in range(3)] + [float(longer(s)) for s in range(3, 6)]
    np.testing.assert_allclose(rates, [0.0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose([float(longer(s)) for s in range(3)], rates[:3], rtol=1e-6)


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    """dro.gin's 150 warm-up steps in a 100-step run: the rate peaks at 66% (the schedule's own
    rate at the last step), and a decay never starts; KTO has no value network to warn about."""
    import logging

    from dro_jax import trainer

    cfg = optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=150)
    decaying = dataclasses.replace(cfg, schedule="cosine")
    last = float(optim.make_schedule(cfg, 100)(99)) / 1e-4
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer._check_warmup(models.DROModel(tiny_config()), {"policy": cfg, "value": decaying}, 100)
    assert [r.getMessage() for r in caplog.records] == [
        f"WARMUP_STEPS=150 is not shorter than TRAIN_STEPS=100: the policy learning rate reaches only "
        f"{100 * last:.0f}% of its peak (0.0001), at the last step",
        f"WARMUP_STEPS=150 is not shorter than TRAIN_STEPS=100: the value learning rate reaches only "
        f"{100 * last:.0f}% of its peak (0.0001), at the last step, and its cosine never starts"]
    assert f"{100 * last:.0f}" == "66"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        trainer._check_warmup(models.KTOModel(tiny_config()), {"policy": cfg, "value": cfg}, 150)
        trainer._check_warmup(models.DROModel(tiny_config()), {"policy": cfg, "value": cfg}, 151)
    assert [r.getMessage() for r in caplog.records] == [
        "WARMUP_STEPS=150 is not shorter than TRAIN_STEPS=150: the policy learning rate reaches only 99% of its "
        "peak (0.0001), at the last step"]


def test_adafactor_clips_updates_as_optax_does_and_keeps_older_runs_state_tree():
    """update_clipping=1.0 gives optax.adafactor(clipping_threshold=1.0)'s updates (t5x's default),
    while the optimiser state keeps the tree runs started without it saved (they resume). After a
    quiet stretch, a gradient spike's update is clipped."""
    params = {"k": np.zeros((256, 4, 64), np.float32), "b": np.zeros(7, np.float32),
              "m": np.zeros((130, 140), np.float32)}
    rng = np.random.default_rng(0)
    grads = [jax.tree_util.tree_map(lambda x, t=t: (rng.normal(size=x.shape) * (1e-3 if t < 8 else 1.0))
                                    .astype(np.float32), params) for t in range(10)]
    for wd in (0.0, 0.01):
        cfg = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=wd)
        ours, schedule = optim.make_optimizer(cfg, 10)

        def optax_adafactor(threshold):
            opt = optax.adafactor(learning_rate=schedule, decay_rate=0.8, multiply_by_parameter_scale=False,
                                  clipping_threshold=threshold, weight_decay_rate=0.0 if wd else None)
            opt = optim.decoupled_weight_decay(opt, wd, schedule) if wd else opt
            return optax.chain(optax.clip_by_global_norm(1.0), opt)

        before = optax_adafactor(None)  # what runs started before update clipping used
        assert (jax.tree_util.tree_structure(ours.init(params))
                == jax.tree_util.tree_structure(before.init(params)))

        def run(opt):
            state, out = opt.init(params), []
            for g in grads:
                u, state = opt.update(g, state, params)
                out.append(u)
            return out

        mine, theirs, unclipped = run(ours), run(optax_adafactor(1.0)), run(before)
        for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
        rms = lambda u: float(np.sqrt(np.mean(np.square(u["m"]))))  # noqa: E731
        assert rms(mine[8]) <= 1.0001 * float(schedule(8)) < rms(unclipped[8]) / 2, (rms(mine[8]), rms(unclipped[8]))


def test_adafactor_factored_statistics_take_their_kept_axes_specs():
    """v_row drops the largest axis, v_col the second largest (optax's order): each keeps the
    mesh axes of the axes it keeps, a square kernel and a 3-D kernel included."""
    import optax
    from jax.sharding import PartitionSpec as P

    params = {"sq": jax.ShapeDtypeStruct((128, 128), np.float32),
              "k3": jax.ShapeDtypeStruct((256, 4, 128), np.float32)}
    specs = {"sq": P("data", "model"), "k3": P("data", None, "model")}
    opt = jax.eval_shape(optax.adafactor(1e-3).init, params)
    out = train_state.optimizer_state_specs(opt, params, specs)
    found = {}
    for (path, spec), (_, leaf) in zip(jax.tree_util.tree_leaves_with_path(out, is_leaf=lambda x: isinstance(x, P)),
                                       jax.tree_util.tree_leaves_with_path(opt)):
        kp = train_state._keypath(path)
        if kp[-2] in ("v_row", "v_col"):
            found[(kp[-1], kp[-2])] = (tuple(leaf.shape), tuple(spec))
    assert found == {("sq", "v_row"): ((128,), ("data",)), ("sq", "v_col"): ((128,), ("model",)),
                     ("k3", "v_row"): ((4, 128), (None, "model")), ("k3", "v_col"): ((256, 4), ("data", None))}


def test_ctrl_c_asks_to_save_once_then_stops_and_an_ignored_ctrl_c_stays_ignored(capsys):
    import os
    import signal

    from dro_jax import trainer

    with trainer._Preemption() as preempt:
        os.kill(os.getpid(), signal.SIGINT)
        assert preempt.requested and preempt.signal_name == "SIGINT"
        assert "Ctrl-C: saving a checkpoint after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    # A background job of a script starts with Ctrl-C ignored: the run must not take it over.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with trainer._Preemption() as preempt:
            os.kill(os.getpid(), signal.SIGINT)
            assert not preempt.requested
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("name", ["adafactor", "adamw", "sgd"])
def test_weight_decay_is_decoupled_and_follows_the_learning_rate(name):
    """Every optimiser decays as AdamW does: p -= lr(step) * weight_decay * p, so nothing moves
    while the warm-up's rate is 0 (optax's Adafactor decay ignored the rate: -0.1 a step here)."""
    config = optim.OptimizerConfig(name=name, learning_rate=1e-3, warmup_steps=2, weight_decay=0.1, clip_norm=None)
    tx, schedule = optim.make_optimizer(config, 10)
    params = {"w": jnp.full((4, 4), 2.0)}
    state = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for step in range(4):
        updates, state = tx.update(zero, state, params)
        np.testing.assert_allclose(updates["w"], -float(schedule(step)) * 0.1 * params["w"], rtol=1e-6, atol=1e-12,
                                   err_msg=f"step {step}")
        params = optax.apply_updates(params, updates)
    assert float(schedule(0)) == 0.0 and float(schedule(3)) == pytest.approx(1e-3)


def test_weight_decay_keeps_the_optimiser_state_tree_of_older_runs():
    """Runs started with optax's own Adafactor decay (or SGD, which ignored it) must still
    restore: the decay adds no state."""
    params = {"w": jnp.ones((4, 4))}
    schedule = optim.make_schedule(optim.OptimizerConfig(), 10)
    # as make_optimizer built them before (no clipping: an empty chain around the optimiser)
    old = {"adafactor": optax.chain(optax.adafactor(schedule, decay_rate=0.8, multiply_by_parameter_scale=False,
                                                    clipping_threshold=None, weight_decay_rate=0.1)),
           "sgd": optax.chain(optax.sgd(schedule))}
    for name, before in old.items():
        tx, _ = optim.make_optimizer(optim.OptimizerConfig(name=name, weight_decay=0.1, clip_norm=None), 10)
        assert (jax.tree_util.tree_structure(tx.init(params))
                == jax.tree_util.tree_structure(before.init(params))), name
