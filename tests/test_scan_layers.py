"""T5Config(scan_layers=True): nn.scan over layers gives the unrolled network's numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dro_jax import bench, decoding, flops, models, network
from tiny import random_batch, tiny_config


@pytest.fixture(scope="module")
def batch():
  b = random_batch(seed=1, batch=4, reward_kind="scalar")
  b["ref_logprobs"] = np.full(4, -30.0, np.float32)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _params(model, batch):
  shapes = {k: v.shape for k, v in batch.items()}
  return model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]


def test_stack_unstack_round_trip_and_layout(batch):
  unrolled = nn.meta.unbox(_params(models.DROModel(tiny_config(scan_layers=False)), batch))
  boxed = _params(models.DROModel(tiny_config(scan_layers=True)), batch)
  query = boxed["policy"]["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert query.names == ("layers", "embed", "heads", "kv")
  assert query.value.shape == (2, 32, 4, 8)
  assert "layers_0" not in boxed["policy"]["decoder"] and "layers" in boxed["value"]["encoder"]
  stacked = network.match_layer_layout(unrolled, nn.meta.unbox(boxed))
  assert (jax.tree_util.tree_structure(stacked)
          == jax.tree_util.tree_structure(nn.meta.unbox(boxed)))
  back = network.match_layer_layout(stacked, unrolled)
  for a, b in zip(jax.tree_util.tree_leaves(unrolled), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      stacked["policy"]["decoder"]["layers"]["mlp"]["wo"]["kernel"][1],
      unrolled["policy"]["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])


@pytest.mark.parametrize("remat,unroll,layers,fused", [
    ("none", 1, 2, False), ("dots_saveable", 1, 2, True),
    ("dots_with_no_batch_dims_saveable", 2, 3, False)])
def test_scanned_dro_v_loss_and_grads_equal_unrolled(batch, remat, unroll, layers, fused):
  """unroll 2 of 3 layers: one two-layer iteration and a remainder. fused: the stacked q/k/v,
  cross k/v and wi_0/wi_1 matmuls give the separate projections' numbers."""
  depth = dict(num_encoder_layers=layers, num_decoder_layers=layers)
  model = models.DROModel(tiny_config(scan_layers=False, **depth))
  scanned = models.DROModel(tiny_config(scan_layers=True, remat_policy=remat,
                                        scan_unroll=unroll, fused_projections=fused, **depth))
  params = nn.meta.unbox(_params(model, batch))
  # Perturb the value net so that its gradients differ from the policy encoder's.
  params["value"] = jax.tree_util.tree_map(lambda x: x * 1.1, params["value"])
  loss0, g0 = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))(params)
  loss1, g1 = jax.jit(jax.value_and_grad(lambda p: scanned.loss_fn(p, batch, None)[0]))(
      network.stack_layers(params))
  if fused:  # the option is live: per layer body, 3 + 2 + 2 projections become 1 + 1 + 1
    dots = [flops.count_equations(jax.make_jaxpr(lambda p: m.loss_fn(p, batch, None)[0])(
        network.stack_layers(params)), lambda name: name == "dot_general")
            for m in (models.DROModel(scanned.config.replace(fused_projections=False)), scanned)]
    assert dots[1] < dots[0], dots
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  g1 = network.unstack_layers(g1)
  assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
    scale = float(np.abs(a).max()) + 1e-12
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_scanned_and_fused_greedy_decoding_equals_unrolled(batch, feed_forward_proj):
  """Decoding (cached self-attention K/V, cross K/V projected once) is unchanged by scanned
  layers and fused projections."""
  cfg = tiny_config(scan_layers=False, feed_forward_proj=feed_forward_proj)
  params = nn.meta.unbox(_params(models.DROModel(cfg), batch))["policy"]
  enc = batch["encoder_input_tokens"]
  ours = decoding.generate(network.T5(cfg), params, enc, max_length=7)
  for changes in (dict(scan_layers=True), dict(scan_layers=True, fused_projections=True)):
    other = decoding.generate(network.T5(cfg.replace(**changes)),
                              network.stack_layers(params), enc, max_length=7)
    np.testing.assert_array_equal(np.asarray(other), np.asarray(ours), err_msg=str(changes))


def _stacked_float32_kernel_grads(model, params, batch):
  """Outputs of the step's scans that are float32 with a stacked kernel's shape (all outputs:
  JAX versions name the carry count differently; a carry has no layer axis)."""
  kernels = {leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if "layers" in jax.tree_util.keystr(path) and path[-1].key == "kernel"}
  grad = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])
  scans = flops.find_equations(jax.make_jaxpr(grad)(params), lambda name: name == "scan")
  return [v.aval.shape for e in scans for v in e.outvars
          if v.aval.dtype == jnp.float32 and v.aval.shape in kernels]


@pytest.mark.parametrize("fused,unroll,layers", [(False, 1, 2), (True, 2, 3)])
def test_kernels_cast_before_the_scan_give_the_same_params_loss_and_grads(batch, fused, unroll,
                                                                          layers):
  """cast_kernels_before_scan (bfloat16): init gives the same float32 params, the loss,
  gradients and greedy decoding are the same, and the backward loop stacks no float32 kernel
  gradients; also with fused projections and two layers per loop iteration (3 layers)."""
  cfg = tiny_config(dtype="bfloat16", scan_layers=True, fused_projections=fused,
                    scan_unroll=unroll, num_encoder_layers=layers, num_decoder_layers=layers,
                    remat_policy="dots_with_no_batch_dims_saveable")
  plain, hoisted = models.DROModel(cfg), models.DROModel(cfg.replace(cast_kernels_before_scan=True))
  params = nn.meta.unbox(_params(plain, batch))
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(nn.meta.unbox(_params(hoisted, batch)))):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  params["value"] = jax.tree_util.tree_map(lambda x: x * 1.1, params["value"])
  (loss0, g0), (loss1, g1) = (
      jax.jit(jax.value_and_grad(lambda p, m=m: m.loss_fn(p, batch, None)[0]))(params)
      for m in (plain, hoisted))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert _stacked_float32_kernel_grads(plain, params, batch)
  assert not _stacked_float32_kernel_grads(hoisted, params, batch)
  enc = batch["encoder_input_tokens"]
  tokens = [decoding.generate(m.module, params["policy"], enc, max_length=7) for m in (plain, hoisted)]
  np.testing.assert_array_equal(np.asarray(tokens[1]), np.asarray(tokens[0]))


def test_bench_scan_layers_keeps_the_formula_and_shards():
  """The traced step with scanned layers (and fused projections) has the unrolled dot FLOPs
  (jaxpr count multiplies a scan body by its length), and its state shards on a 4x2 mesh."""
  bc = bench.BenchConfig(size="tiny", algo="dro_v", batch=8, inputs_len=24, targets_len=12,
                         scan_layers=True, remat="full", mesh="4,2", fused_projections=True)
  built = bench.build_step(bc, abstract=False)
  assert built["cfg"].fused_projections
  dots = flops.jaxpr_dot_flops(bench.trace_step(built).jaxpr)
  exe = flops.train_step_flops(built["cfg"], "dro_v", 8, 24, 12, precomputed_ref=False,
                               executed=True)
  assert dots == pytest.approx(exe["total"], rel=2e-3)
  wi = built["state"].params["policy"]["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert wi.shape == (2, 64, 128)
  assert tuple(wi.sharding.spec) == (None, None, "model")


def test_trainer_loads_an_unrolled_checkpoint_into_a_scanned_model(tmp_path):
  """INITIAL_CHECKPOINT_PATH in the unrolled layout trains a scan_layers=True model (also with
  the other runtime options changed) to the same metrics as the unrolled model (the trainer
  converts the layout)."""
  import os
  from dro_jax import checkpoints, optim, sharding, trainer
  from dro_jax.data import tasks as data_tasks
  import seqio
  sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tasks", "data", "sample_feedback.jsonl")
  data_tasks.register_feedback_task("scan_test", paths=sample, vocabulary=seqio.ByteVocabulary(),
                                    overwrite=True)
  config = tiny_config(vocab_size=384, scan_layers=False)
  shapes = {"encoder_input_tokens": (2, 16), "decoder_input_tokens": (2, 32)}
  params = nn.meta.unbox(models.DROModel(config).get_initial_variables(
      jax.random.PRNGKey(1), shapes)["params"])
  init = str(tmp_path / "init")
  checkpoints.save_model_checkpoint(init, config=config, params=params["policy"],
                                    vocabulary_path="byte")

  def train(name, cfg):
    return trainer.train(
        model_dir=str(tmp_path / name), model=models.DROModel(cfg), task_name="scan_test",
        task_feature_lengths={"inputs": 16, "targets": 32}, batch_size=8, train_steps=2,
        initial_checkpoint_path=init, reference="frozen", log_every=1,
        policy_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=1e-2, warmup_steps=0),
        value_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=1e-1, warmup_steps=0),
        mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
        data=trainer.DataConfig(seed=3))

  unrolled = train("unrolled", config)
  scanned = train("scanned", config.replace(scan_layers=True, scan_unroll=2,
                                            fused_projections=True))
  for key in ("loss/policy", "loss/value", "logratio/mean", "value/mean"):
    np.testing.assert_allclose(scanned[key], unrolled[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # The scanned run's checkpoint is stacked; loading it back gives the unrolled layout.
  ckpt = checkpoints.load_model_checkpoint(str(tmp_path / "scanned"))
  assert ckpt.config.scan_layers and "layers" in ckpt.params["encoder"]


def test_hf_export_of_a_scanned_model_round_trips(tmp_path, batch):
  """A scan_layers=True tree exports to HF's per-layer tensors and reads back unrolled."""
  from dro_jax import hf
  cfg = tiny_config(scan_layers=True)
  scanned = nn.meta.unbox(_params(models.DROModel(cfg), batch))["policy"]
  hf.export_hf_t5(str(tmp_path / "hf"), cfg, scanned)
  config, params = hf.load_hf_t5(str(tmp_path / "hf"))
  assert not config.scan_layers
  expected = network.unstack_layers(scanned)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(b, a, rtol=1e-6)
