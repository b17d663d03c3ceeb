"""INITIAL_CHECKPOINT_PATH: the vocabulary must be the task's, and a checkpoint whose value
network is of another kind still gives its policy."""
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest

from dro_jax import checkpoints, models, trainer
from tiny import tiny_config

SHAPES = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 6)}


def _params(model, seed):
    return nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(seed), SHAPES)["params"])


def test_another_vocabulary_is_refused(tmp_path):
    sp_a, sp_b, sp_a_copy = (tmp_path / n for n in ("a.model", "b.model", "a_copy.model"))
    sp_a.write_bytes(b"model a")
    sp_b.write_bytes(b"model b")
    sp_a_copy.write_bytes(b"model a")
    for theirs, ours in (("byte", "byte"), (str(sp_a), str(sp_a_copy)), (None, "byte"), (str(sp_a), None)):
        trainer._check_initial_vocabulary("CKPT", theirs, ours)
    for theirs, ours in (("byte", str(sp_a)), (str(sp_a), "byte"), (str(sp_a), str(sp_b))):
        with pytest.raises(trainer.ConfigError, match=r"^INITIAL_CHECKPOINT_PATH=CKPT was trained with .*vocabulary"):
            trainer._check_initial_vocabulary("CKPT", theirs, ours)
    # through _load_initial, with the vocabulary file the checkpoint stores
    config = tiny_config()
    model = models.DROModel(config)
    params = _params(model, 0)
    path = str(tmp_path / "ckpt")
    checkpoints.save_model_checkpoint(path, config=config, params=params["policy"], vocabulary_path=str(sp_a))
    with pytest.raises(trainer.ConfigError, match="trained with SentencePiece model"):
        trainer._load_initial(path, model, params, "byte")
    loaded = trainer._load_initial(path, model, _params(model, 1), str(sp_a_copy))
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(loaded["policy"])[0],
                                  jax.tree_util.tree_leaves(params["policy"])[0])


def test_a_value_network_of_another_kind_leaves_the_value_fresh(tmp_path, caplog):
    config = tiny_config()
    separate = models.DROModel(config)
    params = _params(separate, 0)
    # Trained value weights: a fresh value network (the policy's encoder, a zero head) would
    # equal what a loader that ignored them builds from the policy.
    trained_value = jax.tree_util.tree_map(lambda x: x + 0.25, params["value"])
    path = str(tmp_path / "ckpt")
    checkpoints.save_model_checkpoint(path, config=config, params=params["policy"], vocabulary_path="byte",
                                      value_params=trained_value)
    shared = models.DROModel(config, value_kind="shared")
    fresh = _params(shared, 1)
    with caplog.at_level(logging.WARNING, logger="dro_jax"):
        loaded = trainer._load_initial(path, shared, fresh, "byte")
    assert "its value network is value_kind='separate', this model's is 'shared'" in caplog.text
    for a, b in zip(jax.tree_util.tree_leaves(loaded["policy"]), jax.tree_util.tree_leaves(params["policy"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(loaded["value"]), jax.tree_util.tree_leaves(fresh["value"])):
        np.testing.assert_array_equal(a, b)
    # the same kind loads the checkpoint's value network, and must fit it
    same = trainer._load_initial(path, separate, _params(separate, 1), "byte")
    for a, b in zip(jax.tree_util.tree_leaves(same["value"]), jax.tree_util.tree_leaves(trained_value)):
        np.testing.assert_array_equal(a, b)
    deeper = dict(params["value"], encoder=dict(params["value"]["encoder"], extra={"scale": np.ones(3, np.float32)}))
    other = str(tmp_path / "deeper")
    checkpoints.save_model_checkpoint(other, config=config, params=params["policy"], vocabulary_path="byte",
                                      value_params=deeper)
    with pytest.raises(trainer.ConfigError, match="value parameter tree does not match"):
        trainer._load_initial(other, separate, _params(separate, 1), "byte")


def test_a_checkpoint_is_sharded_from_the_host(tmp_path):
    """The checkpoint's arrays stay on the host until each device takes its shard (placed whole
    on device 0 first, a T5-XXL would not fit), and the state equals the checkpoint."""
    from dro_jax import optim, sharding, train_state

    config = tiny_config()
    model = models.DROModel(config)
    params = _params(model, 0)
    path = str(tmp_path / "ckpt")
    checkpoints.save_model_checkpoint(path, config=config, params=params["policy"], vocabulary_path="byte")
    mesh_config = sharding.MeshConfig(data=4, model=2)
    mesh = sharding.create_mesh(mesh_config, jax.devices()[:8])
    rules = sharding.logical_axis_rules(mesh_config)
    txs = {k: optim.make_optimizer(optim.OptimizerConfig(), 10)[0] for k in ("policy", "value")}
    loaded = []

    def override(p):
        loaded.append(trainer._load_initial(path, model, p, "byte"))
        return loaded[-1]

    state, sh = train_state.create_state(model, txs, SHAPES, mesh, rules, with_ref=True, params_override=override)
    # policy and the value encoder copied from it: host arrays; the value head: as initialised
    host = jax.tree_util.tree_leaves({"policy": loaded[0]["policy"], "value": loaded[0]["value"]["encoder"]})
    assert host and all(isinstance(x, np.ndarray) for x in host)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params["policy"]),
                         jax.tree_util.tree_leaves(params["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    for a, s in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(sh)):
        assert a.sharding.is_equivalent_to(s, a.ndim)
    split = [a for a in jax.tree_util.tree_leaves(state.params) if not a.sharding.is_fully_replicated]
    assert split  # the model axis splits some kernels
