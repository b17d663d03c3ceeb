"""A train step sharded over a 4 x 2 (data x model) mesh equals the single-device step."""
import jax
import pytest
import numpy as np
from jax.sharding import PartitionSpec as P

from dro_jax import models, optim, sharding, train_state
from tiny import random_batch, tiny_config

STEPS = 3


def _run(mesh_config, devices, model, batches, with_ref):
    mesh = sharding.create_mesh(mesh_config, devices)
    rules = sharding.logical_axis_rules(mesh_config)
    txs, scheds = {}, {}
    for k in ("policy", "value"):
        txs[k], scheds[k] = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10)
    shapes = {k: v.shape for k, v in batches[0].items()}
    state, state_sh = train_state.create_state(model, txs, shapes, mesh, rules, with_ref=with_ref)
    step = train_state.jit_train_step(train_state.make_train_step(model, txs, scheds), state_sh, mesh)
    history = []
    with sharding.use_mesh(mesh):
        for b in batches:
            state, metrics = step(state, sharding.host_batch_to_global(b, mesh))
            history.append(jax.device_get(metrics))
    return state, history, mesh, rules


def test_sharded_equals_single_device():
    """The sharded model also fuses its projections (stacked kernels split over `model`), which
    must not change the numbers either."""
    model = models.DROModel(tiny_config(), tau=1.0)
    fused = models.DROModel(tiny_config(fused_projections=True), tau=1.0)
    batches = [random_batch(seed=s, batch=8, reward_kind="scalar") for s in range(STEPS)]
    single, h1, _, _ = _run(sharding.MeshConfig(data=1, model=1), jax.devices()[:1], model, batches, True)
    multi, h8, mesh, rules = _run(sharding.MeshConfig(data=4, model=2), jax.devices()[:8], fused, batches, True)
    assert len(jax.devices()) == 8
    for a, b in zip(h1, h8):
        for k in ("loss/policy", "loss/value", "value/mean", "logratio/mean"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-5, err_msg=k)
    leaves1 = jax.tree_util.tree_leaves_with_path(jax.device_get(single.params))
    leaves8 = jax.tree_util.tree_leaves(jax.device_get(multi.params))
    for (path, a), b in zip(leaves1, leaves8):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # parameters moved, so the comparison is not vacuous
    init, _ = train_state.create_state(model, {k: optim.make_optimizer(optim.OptimizerConfig(), 10)[0]
                                               for k in ("policy", "value")},
                                       {k: v.shape for k, v in batches[0].items()}, mesh, rules)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(init.params), leaves8)]
    assert max(moved) > 1e-3


@pytest.mark.parametrize("fsdp", [False, True])
def test_partition_specs_follow_rules(fsdp):
    model = models.DROModel(tiny_config())
    shapes = {k: v.shape for k, v in random_batch().items()}
    mesh_config = sharding.MeshConfig(data=4, model=2, fsdp=fsdp)
    mesh = sharding.create_mesh(mesh_config, jax.devices()[:8])
    rules = sharding.logical_axis_rules(mesh_config)
    txs = {k: optim.make_optimizer(optim.OptimizerConfig(), 10)[0] for k in ("policy", "value")}
    boxed, _, _ = train_state.abstract_state_and_shardings(model, txs, shapes, mesh, rules)
    state, _ = train_state.create_state(model, txs, shapes, mesh, rules)
    rule_map = dict(rules)
    pad = lambda s, n: tuple(s) + (None,) * (n - len(tuple(s)))
    checked = 0
    for (path, spec), leaf in zip(
            jax.tree_util.tree_leaves_with_path(sharding.partition_specs(boxed), is_leaf=lambda x: isinstance(x, P)),
            jax.tree_util.tree_leaves(state.params)):
        expected = P(*[rule_map.get(name) if name else None for name in spec])
        got = leaf.sharding.spec
        assert pad(got, leaf.ndim) == pad(expected, leaf.ndim), (jax.tree_util.keystr(path), got, expected)
        checked += any(x is not None for x in expected)
    assert checked > 5  # some parameters really are split over the mesh
    mlp = [leaf.sharding.spec for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
           if "'mlp'" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    assert mlp and all("model" in tuple(s) for s in mlp)
    # Written out by hand (Megatron-style tensor parallelism, as t5x's default rules): heads and the
    # MLP's hidden units over `model`, the vocabulary over `model`; FSDP adds `data` on `embed`.
    e = "data" if fsdp else None
    by_hand = {
        "['encoder']['layers']['attention']['query']['kernel']": (None, e, "model", None),  # [layers, D, H, K]
        "['encoder']['layers']['mlp']['wi_0']['kernel']": (None, e, "model"),  # [layers, D, F]
        "['encoder']['layers']['mlp']['wo']['kernel']": (None, "model", e),  # [layers, F, D]
        "['encoder']['layers']['pre_attention_layer_norm']['scale']": (None, e),  # [layers, D]
        "['encoder']['relpos_bias']['rel_embedding']": (None, "model"),  # [buckets, H]
        "['lm_head']['kernel']": (e, "model"),  # [D, V]
        "['token_embedder']['embedding']": ("model", e),  # [V, D]
    }
    policy = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state.params["policy"])}
    for name, want in by_hand.items():
        assert pad(policy[name].sharding.spec, len(want)) == want, (name, policy[name].sharding.spec)
    # FSDP also splits the embed axis over `data`, optimiser state included
    has_data = any("data" in tuple(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params))
    assert has_data == fsdp
    opt_data = any("data" in tuple(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.opt_state)
                   if hasattr(leaf, "sharding") and leaf.ndim > 0)
    assert opt_data == fsdp
