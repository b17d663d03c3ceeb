"""decoding.generate: KV cache == full recomputation, EOS/padding, sampling filters, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dro_jax import decoding, network
from tiny import random_params

CFG = network.T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                       num_encoder_layers=2, num_decoder_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=10)


def _numpy_init(model, enc):
  """Random params without compiling model.init (slow on CPU): eval_shape + numpy."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), enc, enc))["params"])
  return random_params(shapes, 0)


@pytest.fixture(scope="module")
def setup():
  model = network.T5(CFG)
  enc = jnp.asarray(np.random.default_rng(0).integers(2, 48, (4, 7)), jnp.int32)
  enc = enc.at[1, 4:].set(0).at[3, 2:].set(0)
  params = _numpy_init(model, enc)
  # Make EOS likely so rows finish at different steps.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, CFG.eos_id].multiply(1.5)
  return model, params, enc


def _check_eos_padding(tokens):
  tokens = np.asarray(tokens)
  for row in tokens:
    eos = np.flatnonzero(row == CFG.eos_id)
    if eos.size:
      assert np.all(row[eos[0] + 1:] == CFG.pad_id)


def test_cached_equals_recomputed_greedy(setup):
  model, params, enc = setup
  max_len = 12  # longer than max_distance: exercises saturated position buckets
  cached = decoding.generate(model, params, enc, max_length=max_len)
  full = decoding.generate(model, params, enc, max_length=max_len, use_cache=False)
  assert cached.shape == (4, max_len) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached, full)
  _check_eos_padding(cached)
  finished = np.any(np.asarray(cached) == CFG.eos_id, axis=1)
  assert finished.any() and not finished.all()  # rows stop at different steps
  assert len(np.unique(np.asarray(cached))) > 3
  # Greedy tokens are the argmax of a teacher-forced forward over the decoded prefix.
  dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), cached[:, :-1]], axis=1)
  logits = jax.jit(model.apply)({"params": params}, enc, dec_in)
  pred = np.asarray(jnp.argmax(logits, -1))
  out = np.asarray(cached)
  for i in range(4):
    eos = np.flatnonzero(out[i] == CFG.eos_id)
    n = eos[0] + 1 if eos.size else max_len
    np.testing.assert_array_equal(pred[i, :n], out[i, :n])


def test_cached_equals_recomputed_sampling(setup):
  model, params, enc = setup
  kw = dict(max_length=12, rng=jax.random.PRNGKey(7), temperature=0.8, top_k=10, top_p=0.9)
  a = decoding.generate(model, params, enc, **kw)
  b = decoding.generate(model, params, enc, use_cache=False, **kw)
  np.testing.assert_array_equal(a, b)
  _check_eos_padding(a)
  c = decoding.generate(model, params, enc, **dict(kw, rng=jax.random.PRNGKey(8)))
  assert not np.array_equal(a, c)


def test_generate_under_outer_jit(setup):
  model, params, enc = setup
  f = jax.jit(lambda p, e: decoding.generate(model, p, e, max_length=5))
  np.testing.assert_array_equal(f(params, enc), decoding.generate(model, params, enc, max_length=5))


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda x: np.asarray(x[0] > -1e30)
  np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_k=2)),
                                [1, 1, 0, 0, 0])
  # Nucleus: smallest prefix whose mass reaches top_p.
  np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.7)),
                                [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.71)),
                                [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.01)),
                                [1, 0, 0, 0, 0])


def test_bad_arguments(setup):
  model, params, enc = setup
  for kw, message in [(dict(max_length=0), "max_length must be >= 1, got 0"),
                      (dict(max_length=3, temperature=-1.0), "temperature must be >= 0, got -1.0"),
                      (dict(max_length=3, temperature=1.0), "sampling .* needs an rng"),
                      (dict(max_length=3, top_p=0.0), "0 < top_p <= 1, got top_k=0, top_p=0.0")]:
    with pytest.raises(ValueError, match=message):
      decoding.generate(model, params, enc, **kw)


def test_padding_is_never_generated_before_eos(setup):
  """A sampled pad_id inside a response vanishes when it is detokenized, so the text no longer
  matches the tokens that were scored: decoding never picks it."""
  model, params, enc = setup
  params = dict(params, lm_head=dict(params["lm_head"]))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, CFG.pad_id].add(5.0)  # pad: the argmax
  for kw in [dict(), dict(temperature=2.0, rng=jax.random.PRNGKey(3))]:
    tokens = np.asarray(decoding.generate(model, params, enc, max_length=8, **kw))
    before_eos = np.cumsum(tokens == CFG.eos_id, axis=1) - (tokens == CFG.eos_id) == 0
    assert not np.any((tokens == CFG.pad_id) & before_eos), (kw, tokens)
    _check_eos_padding(tokens)
