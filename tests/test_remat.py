"""Every rematerialisation policy gives the same loss and gradients as no remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dro_jax import flops, models, network
from tiny import random_batch, tiny_config

POLICIES = [p for p in network.REMAT_POLICIES if p != "none"]


def _count_remat(jaxpr) -> int:
    """Rematerialised regions (jax.checkpoint / nn.remat) in a jaxpr, recursively."""
    return flops.count_equations(jaxpr, lambda name: name in ("checkpoint", "remat", "remat2"))


@pytest.fixture(scope="module")
def batch():
    b = random_batch(seed=3, batch=4, reward_kind="scalar")
    b["ref_logprobs"] = np.random.default_rng(0).normal(size=4).astype(np.float32) - 30.0
    return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def params(batch):
    # The parameter tree does not depend on the remat policy: initialise once.
    model = models.DROModel(tiny_config(scan_layers=False), tau=1.0)
    shapes = {k: v.shape for k, v in batch.items()}
    p = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    # The value network starts as a copy of the policy's encoder: move it, so that both
    # networks' gradients are distinct and non-trivial.
    p["value"] = jax.tree_util.tree_map(lambda x: x * 1.1, p["value"])
    return p


def _loss_and_grads(remat_policy: str, params, batch):
    # DRO-V covers the policy T5 (encoder + decoder layers) and the separate value encoder.
    model = models.DROModel(tiny_config(scan_layers=False, remat_policy=remat_policy), tau=1.0)
    fn = lambda p, b: model.loss_fn(p, b, None)[0]
    n_remat = _count_remat(jax.make_jaxpr(fn)(params, batch).jaxpr)
    return jax.jit(jax.value_and_grad(fn))(params, batch), n_remat


@pytest.fixture(scope="module")
def baseline(params, batch):
    (loss, grads), n_remat = _loss_and_grads("none", params, batch)
    # losses.token_logprobs already rematerialises its log-softmax chunks: count the rest.
    return loss, grads, n_remat


@pytest.mark.parametrize("policy", POLICIES)
def test_remat_policy_matches_none(policy, params, batch, baseline):
    loss0, grads0, n_remat0 = baseline
    (loss, grads), n_remat = _loss_and_grads(policy, params, batch)
    # 2 encoder + 2 decoder layers of the policy, 2 layers of the value encoder
    assert n_remat >= n_remat0 + 6, "remat policy did not reach the network"
    np.testing.assert_allclose(loss, loss0, rtol=1e-6, atol=1e-6)
    flat0 = jax.tree_util.tree_leaves_with_path(grads0)
    flat = jax.tree_util.tree_leaves(grads)
    assert len(flat0) == len(flat)
    nonzero = 0
    for (path, g0), g in zip(flat0, flat):
        g0, g = np.asarray(g0), np.asarray(g)
        scale = max(np.abs(g0).max(), 1e-12)
        np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"{policy}: {jax.tree_util.keystr(path)}")
        nonzero += np.abs(g0).max() > 0
    assert nonzero > len(flat0) // 2  # the gradients are not vacuous


def test_attention_policy_names_jax_cudnn_forward_primitives():
    """The policy recognises cuDNN's fused-attention forward by primitive name: check that name
    against this JAX's own primitives (the GPU test checks what it saves)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    policy = network.dots_with_no_batch_dims_and_attention_saveable
    prims = [v for v in vars(fused).values() if isinstance(v, jax.extend.core.Primitive)
             and v.name.startswith("dot_product_attention_fwd")]
    assert prims and all(policy(p) for p in prims)
    assert not policy(jax.lax.sin_p)
    assert not any(policy(p) for p in vars(fused).values()
                   if isinstance(p, jax.extend.core.Primitive) and "bwd" in p.name)
