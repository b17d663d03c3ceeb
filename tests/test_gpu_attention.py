"""GPU only: cuDNN flash attention with T5's bias equals the XLA path (DRO-V loss and grads).

Skipped without a GPU (CI). On a GPU machine:
    CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu_attention.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dro_jax import flops, models, network
from tiny import random_batch, tiny_config

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a GPU (cuDNN); tests/conftest.py hides GPUs unless run with "
           "CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda")

# cuDNN needs a head dim that is a multiple of 8 and even lengths when training with a bias.
GPU_TINY = dict(vocab_size=256, d_model=128, d_kv=64, num_heads=2, d_ff=256, dtype="bfloat16")


def _loss_and_grads(attention: str, params, batch, scan: bool):
  cfg = tiny_config(**GPU_TINY, attention_impl=attention, scan_layers=scan)
  model = models.DROModel(cfg, tau=1.0)
  fn = lambda p: model.loss_fn(p, batch, None)[0]
  return jax.jit(jax.value_and_grad(fn))(params)


def _assert_close_grads(g_c, g_x):
  flat_x = jax.tree_util.tree_leaves_with_path(g_x)
  flat_c = jax.tree_util.tree_leaves(g_c)
  assert len(flat_x) == len(flat_c)
  for (path, gx), gc in zip(flat_x, flat_c):
    gx, gc = np.asarray(gx, np.float32), np.asarray(gc, np.float32)
    scale = max(np.abs(gx).max(), 1e-8)
    np.testing.assert_allclose(gc / scale, gx / scale, atol=5e-2,
                               err_msg=jax.tree_util.keystr(path))


# Unrolled layers were checked on an H200 on 2026-11-27; scanned ones not yet.
@pytest.mark.parametrize("scan", [False, True])
def test_cudnn_dro_v_loss_and_grads_match_xla(scan):
  """Unpacked, right-padded batch: bias [1, H, T, S], key lengths and the causal flag."""
  b = random_batch(seed=5, batch=8, inputs_len=32, targets_len=16, vocab=256,
                   reward_kind="scalar")
  b["ref_logprobs"] = np.random.default_rng(1).normal(size=8).astype(np.float32) - 60.0
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  model = models.DROModel(tiny_config(**GPU_TINY, scan_layers=scan), tau=1.0)
  shapes = {k: v.shape for k, v in batch.items()}
  params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  loss_x, g_x = _loss_and_grads("xla", params, batch, scan)
  loss_c, g_c = _loss_and_grads("cudnn", params, batch, scan)
  assert np.isfinite(float(loss_c))
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2, atol=2e-2)
  _assert_close_grads(g_c, g_x)
  # The relative-position tables get their gradient through cuDNN's bias gradient.
  rel = g_c["policy"]["encoder"]["relpos_bias"]["rel_embedding"]
  assert np.abs(np.asarray(rel, np.float32)).max() > 0


@pytest.mark.parametrize("scan", [False, True])
def test_cudnn_packed_matches_xla(scan):
  """Packed rows: the segment mask is folded into a [B, H, T, S] bias."""
  cfg = tiny_config(**GPU_TINY, scan_layers=scan)
  rng = np.random.default_rng(2)
  enc = jnp.asarray(rng.integers(2, 256, (4, 32)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 256, (4, 16)), jnp.int32)
  kw = dict(encoder_segment_ids=jnp.asarray(np.repeat([[1, 2]], 4, 0).repeat(16, 1)),
            decoder_segment_ids=jnp.asarray(np.repeat([[1, 2]], 4, 0).repeat(8, 1)))
  params = nn.meta.unbox(network.T5(cfg).init(jax.random.PRNGKey(0), enc, dec))["params"]

  def loss(p, attention):
    out = network.T5(cfg.replace(attention_impl=attention)).apply({"params": p}, enc, dec, **kw)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  loss_x, g_x = jax.jit(jax.value_and_grad(lambda p: loss(p, "xla")))(params)
  loss_c, g_c = jax.jit(jax.value_and_grad(lambda p: loss(p, "cudnn")))(params)
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2)
  _assert_close_grads(g_c, g_x)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cudnn_packed_rows_with_padding_stay_finite(dtype):
  """Padding (segment 0) rows attend to nothing: the folded mask must stay finite in the compute
  dtype (-1e10 is -inf in float16, and a row of -inf is NaN in cuDNN). Not yet run on a GPU."""
  cfg = tiny_config(**{**GPU_TINY, "dtype": dtype})
  rng = np.random.default_rng(3)
  enc = jnp.asarray(rng.integers(2, 256, (4, 32)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 256, (4, 16)), jnp.int32)
  enc_seg = np.repeat([[1] * 16 + [2] * 12 + [0] * 4], 4, 0)
  dec_seg = np.repeat([[1] * 8 + [2] * 6 + [0] * 2], 4, 0)
  kw = dict(encoder_segment_ids=jnp.asarray(enc_seg), decoder_segment_ids=jnp.asarray(dec_seg))
  params = nn.meta.unbox(network.T5(cfg).init(jax.random.PRNGKey(0), enc, dec))["params"]
  valid = jnp.asarray(dec_seg > 0)[..., None]

  def loss(p, attention):
    out = network.T5(cfg.replace(attention_impl=attention)).apply({"params": p}, enc, dec, **kw)
    return jnp.mean(jnp.where(valid, jnp.square(out.astype(jnp.float32)), 0.0))

  loss_x, g_x = jax.jit(jax.value_and_grad(lambda p: loss(p, "xla")))(params)
  loss_c, g_c = jax.jit(jax.value_and_grad(lambda p: loss(p, "cudnn")))(params)
  assert np.isfinite(float(loss_c)) and all(np.isfinite(np.asarray(g, np.float32)).all()
                                           for g in jax.tree_util.tree_leaves(g_c))
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2)
  _assert_close_grads(g_c, g_x)


def test_attention_remat_policy_keeps_the_cudnn_forward():
  """'dots_with_no_batch_dims_and_attention_saveable' saves cuDNN's forward outputs, so the
  backward pass does not run the attention forward again (as it does under
  'dots_with_no_batch_dims_saveable'), and the loss and gradients stay those of no remat."""
  b = random_batch(seed=6, batch=8, inputs_len=32, targets_len=16, vocab=256,
                   reward_kind="scalar")
  b["ref_logprobs"] = np.random.default_rng(2).normal(size=8).astype(np.float32) - 60.0
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  shapes = {k: v.shape for k, v in batch.items()}
  counts, results = {}, {}
  for policy in ("none", "dots_with_no_batch_dims_saveable",
                 "dots_with_no_batch_dims_and_attention_saveable"):
    cfg = tiny_config(**GPU_TINY, attention_impl="cudnn", remat_policy=policy)
    model = models.DROModel(cfg, tau=1.0)
    if policy == "none":
      params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    fn = lambda p: model.loss_fn(p, batch, None)[0]
    grad_fn = jax.value_and_grad(fn)
    counts[policy] = flops.count_equations(
        jax.make_jaxpr(grad_fn)(params), lambda name: name.startswith("dot_product_attention_fwd"))
    results[policy] = jax.jit(grad_fn)(params)
  assert counts["dots_with_no_batch_dims_saveable"] > counts["none"] > 0
  assert counts["dots_with_no_batch_dims_and_attention_saveable"] == counts["none"]
  loss0, g0 = results["none"]
  loss1, g1 = results["dots_with_no_batch_dims_and_attention_saveable"]
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-3)
  _assert_close_grads(g1, g0)


def test_frozen_bias_cudnn_matches_xla():
  """freeze_relative_attention_bias: cuDNN's backward without the bias gradient gives the
  XLA path's gradients, and the tables get none."""
  b = random_batch(seed=7, batch=8, inputs_len=32, targets_len=16, vocab=256,
                   reward_kind="scalar")
  b["ref_logprobs"] = np.random.default_rng(3).normal(size=8).astype(np.float32) - 60.0
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  cfg = tiny_config(**GPU_TINY, freeze_relative_attention_bias=True)
  model = models.DROModel(cfg, tau=1.0)
  shapes = {k: v.shape for k, v in batch.items()}
  params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  results = {}
  for attention in ("xla", "cudnn"):
    m = models.DROModel(cfg.replace(attention_impl=attention), tau=1.0)
    grad_fn = jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0])
    results[attention] = jax.jit(grad_fn)(params)
  # This JAX's cuDNN backward is really asked for no bias gradient (the hook took effect).
  bwd = flops.find_equations(jax.make_jaxpr(grad_fn)(params),
                             lambda name: name.startswith("dot_product_attention_bwd"))
  assert bwd and all(not e.params["variadic_args"][1] for e in bwd)
  (loss_x, g_x), (loss_c, g_c) = results["xla"], results["cudnn"]
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2, atol=2e-2)
  _assert_close_grads(g_c, g_x)
  assert not np.any(np.asarray(g_c["policy"]["encoder"]["relpos_bias"]["rel_embedding"]))
