"""dro_jax.t5x_models: the t5x adapters.

The layout helpers and the missing-t5x error run everywhere; the tests that build
the t5x model classes are skipped where t5x is not installed (it is not on the
package registry). The losses and metric values themselves are DROModel's and
KTOModel's, tested in test_models.py.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dro_jax import models, t5x_models
from tests import tiny

random_batch = tiny.random_batch
# t5x's parameter layout is the unrolled one (layers_{i}).
tiny_config = functools.partial(tiny.tiny_config, scan_layers=False)

SHAPES = {"encoder_input_tokens": (4, 12), "decoder_input_tokens": (4, 10)}


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(tree)))


def test_without_t5x_one_clear_import_error(monkeypatch):
  for name in ("t5x", "t5x.models", "t5x.metrics", "t5x.optimizers"):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if absent
  for cls in t5x_models._CLASS_NAMES:  # pylint: disable=protected-access
    monkeypatch.delitem(t5x_models.__dict__, cls, raising=False)
  for cls in ("DROEncoderDecoderModel", "KTOEncoderDecoderModel"):
    with pytest.raises(ImportError) as e:
      getattr(t5x_models, cls)
    assert isinstance(e.value, t5x_models.T5XNotInstalledError)
    msg = str(e.value)
    assert "\n" not in msg and "needs t5x" in msg
    assert "pip install" in msg and "github.com/google-research/t5x" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_unknown_attribute_is_attribute_error():
  with pytest.raises(AttributeError):
    t5x_models.NoSuchThing  # pylint: disable=pointless-statement


def test_t5x_layout_round_trip_and_shapes():
  cfg = tiny_config()
  params = models.DROModel(cfg).get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]
  from flax import linen as nn
  params = nn.meta.unbox(params)
  t5x = {k: t5x_models.to_t5x_layout(v) for k, v in params.items()}
  flat = _flat(t5x["policy"])
  h, k, d, r = cfg.num_heads, cfg.d_kv, cfg.d_model, cfg.relative_attention_num_buckets
  assert flat[("decoder", "logits_dense", "kernel")].shape == (d, cfg.vocab_size)
  assert ("lm_head", "kernel") not in flat
  assert flat[("encoder", "relpos_bias", "rel_embedding")].shape == (h, r)
  assert flat[("encoder", "layers_0", "attention", "query", "kernel")].shape == (d, h * k)
  assert flat[("decoder", "layers_1", "encoder_decoder_attention", "out", "kernel")].shape == (h * k, d)
  assert _flat(t5x["value"])[("encoder", "relpos_bias", "rel_embedding")].shape == (h, r)
  back = {k: t5x_models.from_t5x_layout(v, cfg) for k, v in t5x.items()}
  a, b = _flat(params), _flat(back)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_initial_variables_have_axes_for_every_param():
  from flax.linen import partitioning as flax_partitioning
  model = models.DROModel(tiny_config())
  variables = t5x_models.initial_variables_t5x(model, jax.random.PRNGKey(0), SHAPES)
  params, axes = _flat(variables["params"]), traverse_util.flatten_dict(variables["params_axes"])
  assert {k[:-1] + (k[-1][:-len("_axes")],) for k in axes} == set(params)
  for key, meta in axes.items():
    assert isinstance(meta, flax_partitioning.AxisMetadata)
    assert len(meta.names) == params[key[:-1] + (key[-1][:-5],)].ndim
  assert axes[("policy", "encoder", "layers_0", "attention", "query", "kernel_axes")].names == (
      "embed", "joined_kv")
  ref = t5x_models.initial_variables_t5x(models.KTOModel(tiny_config()), jax.random.PRNGKey(0),
                                         SHAPES, reference=True)
  for x, y in zip(jax.tree_util.tree_leaves(ref["reference"]),
                  jax.tree_util.tree_leaves(ref["params"]["policy"])):
    np.testing.assert_array_equal(x, y)


def test_orbax_t5x_checkpoint_loads_as_host_arrays_without_warnings(tmp_path, recwarn):
  """t5x's orbax layout (checkpoint_N/state with 'target' and the optimiser 'state'); a bare
  restore warned that restoring without shardings is unsafe on another topology."""
  import orbax.checkpoint as ocp

  params = t5x_models.initial_variables_t5x(models.DROModel(tiny_config()), jax.random.PRNGKey(0),
                                            SHAPES)["params"]
  state_dir = tmp_path / "checkpoint_3" / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(str(state_dir), {"target": dict(params), "state": {"step": np.int32(3)}})
  recwarn.clear()
  loaded = t5x_models.load_t5x_params(str(tmp_path / "checkpoint_3"))
  assert not [w for w in recwarn if "harding" in str(w.message)], [str(w.message) for w in recwarn]
  want, got = _flat(params), traverse_util.flatten_dict(loaded)
  assert want.keys() == got.keys()
  for key in want:
    assert isinstance(got[key], np.ndarray)
    np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("value_kind", ["separate", "shared", "scalar"])
def test_dro_assignment_map_fits_each_value_kind(value_kind):
  """t5x's apply_assignment_map refuses a rule that matches no key, and every value param
  must be either mapped from the T5 or left to start from scratch (None)."""
  import re
  variables = t5x_models.initial_variables_t5x(
      models.DROModel(tiny_config(), value_kind=value_kind), jax.random.PRNGKey(0), SHAPES)
  keys = ["target/" + "/".join(k) for k in _flat(variables["params"])]
  rules = t5x_models.dro_assignment_map(value_kind)
  for pattern, _ in rules:
    assert any(re.fullmatch(pattern, k) for k in keys), (pattern, value_kind)
  for k in keys:  # t5x applies the first rule that matches
    hits = [target for pattern, target in rules if re.fullmatch(pattern, k)]
    assert hits, k
    from_scratch = k.startswith("target/value/") and (value_kind != "separate" or "value_head" in k)
    assert (hits[0] is None) == from_scratch, k  # only what a plain T5 lacks starts from scratch
  with pytest.raises(ValueError, match="value_kind"):
    t5x_models.dro_assignment_map("tied")


# ---------------------------------------------------------------- with t5x
def _t5x():
  return pytest.importorskip("t5x.models", reason="t5x is not installed (install from source)")


def _batch(model_params, dro, **kw):
  batch = {k: jnp.asarray(v) for k, v in random_batch(batch=4, **kw).items()}
  policy = t5x_models.from_t5x_layout(model_params["policy"], dro.config)
  # reference = the initial policy: log-ratios start at exactly 0
  batch["ref_logprobs"] = dro.sequence_logprobs(policy, batch)
  return batch


def _model(kind):
  _t5x()
  import seqio
  from t5x import adafactor
  cls = getattr(t5x_models, kind)
  return cls(tiny_config(), seqio.ByteVocabulary(), adafactor.Adafactor(decay_rate=0.8))


def test_dro_t5x_model_delegates_to_dro_model():
  model = _model("DROEncoderDecoderModel")
  from clu import metrics as clu_metrics
  assert model.FEATURE_CONVERTER_CLS.__name__ == "DROFeatureConverter"
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  params = variables["params"]
  batch = _batch(params, model.dro)
  loss, metrics = model.loss_fn(params, batch, None)
  ref_loss, ref_metrics = model.dro.loss_fn(
      {k: t5x_models.from_t5x_layout(v, model.dro.config) for k, v in params.items()}, batch, None)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name, value in ref_metrics.items():
    assert isinstance(metrics[name], clu_metrics.Metric)
    np.testing.assert_allclose(metrics[name].compute(), value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["logratio/mean"].compute(), 0.0, atol=1e-5)
  merged = metrics["loss/policy"].merge(metrics["loss/policy"])  # t5x merges microbatches
  np.testing.assert_allclose(merged.compute(), ref_metrics["loss/policy"], rtol=1e-5)
  grads = jax.grad(lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(1))[0])(params)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  assert float(jnp.abs(grads["value"]["value_head"]["kernel"]).sum()) > 0
  scores = model.score_batch(params, batch)
  np.testing.assert_allclose(scores, batch["ref_logprobs"], rtol=1e-5)
  tokens, aux = model.predict_batch_with_aux(params, batch)
  assert tokens.shape == batch["decoder_input_tokens"].shape and aux["scores"].shape == (4,)
  with pytest.raises(ValueError, match="one decode per example"):
    model.predict_batch_with_aux(params, batch, num_decodes=4)
  del batch["ref_logprobs"]
  with pytest.raises(ValueError, match="ref_logprobs"):
    model.loss_fn(params, batch, None)


def test_loss_normalizing_factor_sums_microbatches_to_the_batch_mean():
  _t5x()
  import seqio
  from t5x import adafactor
  model = t5x_models.DROEncoderDecoderModel(tiny_config(), seqio.ByteVocabulary(),
                                            adafactor.Adafactor(), loss_normalizing_factor=4)
  params = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]
  batch = _batch(params, model.dro)
  full = model.loss_fn(params, batch, None)[0]
  halves = [model.loss_fn(params, jax.tree_util.tree_map(lambda x, s=s: x[s], batch), None)[0]
            for s in (slice(0, 2), slice(2, 4))]
  unscaled = model.dro.loss_fn(
      {k: t5x_models.from_t5x_layout(v, model.dro.config) for k, v in params.items()}, batch, None)[0]
  np.testing.assert_allclose(full, unscaled, rtol=1e-6)
  # per-example losses: the two microbatch losses add up to the batch mean
  np.testing.assert_allclose(sum(halves), full, rtol=1e-4, atol=1e-5)


def test_kto_t5x_model_uses_frozen_reference():
  model = _model("KTOEncoderDecoderModel")
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  params, mutables = variables["params"], {"reference": variables["reference"]}
  batch = {k: jnp.asarray(v) for k, v in random_batch(batch=4).items()}
  loss, (metrics, out_mutables) = model.loss_fn(params, batch, None, mutables)
  assert out_mutables is mutables
  np.testing.assert_allclose(metrics["logratio/mean"].compute(), 0.0, atol=1e-5)
  np.testing.assert_allclose(metrics["kto/kl"].compute(), 0.0, atol=1e-5)
  eval_loss, eval_metrics = model.eval_fn(params, batch, mutables)
  np.testing.assert_allclose(eval_loss, loss, rtol=1e-6)
  assert "loss/kto" in eval_metrics
  grads = jax.grad(lambda p: model.loss_fn(p, batch, None, mutables)[0])(params)
  assert float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grads["policy"]))) > 0
  with pytest.raises(ValueError, match="reference"):
    model.loss_fn(params, batch, None, None)


def test_dro_t5x_model_refuses_mean_normalisation():
  _t5x()
  import seqio
  from t5x import adafactor
  with pytest.raises(ValueError, match="logprob_normalization must be 'sum', got 'mean'"):
    t5x_models.DROEncoderDecoderModel(tiny_config(), seqio.ByteVocabulary(), adafactor.Adafactor(),
                                      logprob_normalization="mean")


@pytest.mark.parametrize("factor", ["NUM_REAL_TARGET_TOKENS", 0, True])
def test_t5x_token_count_loss_normalizing_factors_are_refused(factor):
  _t5x()
  import seqio
  from t5x import adafactor
  with pytest.raises(ValueError, match="loss_normalizing_factor must be None"):
    t5x_models.DROEncoderDecoderModel(tiny_config(), seqio.ByteVocabulary(), adafactor.Adafactor(),
                                      loss_normalizing_factor=factor)
