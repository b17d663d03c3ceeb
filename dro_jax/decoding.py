"""Batched, jitted decoding for `network.T5`: greedy and temperature/top-k/top-p sampling.

The default path uses the KV cache (one decoder token per step, encoder K/V projected
once); `use_cache=False` recomputes the whole decoder prefix every step and exists to
check the cache.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax import network


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits [B, V] float32."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def _select(logits, rng, temperature, top_k, top_p):
  """Next token [B] int32 from float32 logits [B, V] (banned ids at -inf).

  Sampling scales `logits - max` (all <= 0, the best exactly 0) by 1/temperature, with the
  reciprocal taken in float64 and capped at float32's largest value: a tiny temperature
  (1e-39, below float32's normal range) then sends every other token to -inf, i.e. near-greedy,
  where logits / temperature would overflow to inf (and inf - inf to NaN) and sample garbage.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  inv = min(1.0 / temperature, float(jnp.finfo(jnp.float32).max))  # finite: 0 * inv stays 0
  logits = filter_logits(logits * jnp.float32(inv), top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _build(config: network.T5Config, max_length: int, temperature: float, top_k: int,
           top_p: float, use_cache: bool, vocab_size: Optional[int]):
  model = network.T5(config)
  # Ids never generated: padding inside a response would not survive detokenizing, and ids
  # past the vocabulary (an embedding padded to 384 rows for 259 byte ids) decode to nothing.
  # numpy, not jnp: built while an outer jit may be tracing, and cached past it.
  banned = np.zeros((config.vocab_size,), bool)
  if config.pad_id != config.eos_id:
    banned[config.pad_id] = True
  if vocab_size is not None:
    banned[vocab_size:] = True

  def run(params, encoder_input_tokens, rng):
    batch = encoder_input_tokens.shape[0]
    variables = {"params": params}
    encoded = model.apply(variables, encoder_input_tokens, method=network.T5.encode)
    if use_cache:
      # Shape-defining call: creates zeroed self-attention caches and projects encoder K/V.
      _, state = model.apply(variables, encoded, encoder_input_tokens,
                             jnp.zeros((batch, max_length), jnp.int32), decode=True,
                             mutable=["cache"], method=network.T5.decode)
      cache = state["cache"]
    else:
      cache = {}

    def step_logits(cache, tokens, last, i):
      if use_cache:
        logits, state = model.apply({"params": params, "cache": cache}, encoded,
                                    encoder_input_tokens, last[:, None], decode=True,
                                    mutable=["cache"], method=network.T5.decode)
        return logits[:, 0], state["cache"]
      # Decoder input = [start, generated...]; causal, so the unfilled tail is irrelevant.
      dec_in = jnp.concatenate(
          [jnp.full((batch, 1), config.decoder_start_id, jnp.int32), tokens[:, :-1]], axis=1)
      logits = model.apply(variables, encoded, encoder_input_tokens, dec_in,
                           method=network.T5.decode)
      return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), cache

    def cond(state):
      i, _, _, _, done, _ = state
      return (i < max_length) & ~jnp.all(done)

    def body(state):
      i, cache, tokens, last, done, rng = state
      rng, sub = jax.random.split(rng)
      logits, cache = step_logits(cache, tokens, last, i)
      logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
      nxt = _select(logits, sub, temperature, top_k, top_p)
      nxt = jnp.where(done, config.pad_id, nxt)          # after EOS: padding
      tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
      done = done | (nxt == config.eos_id)
      return i + 1, cache, tokens, nxt, done, rng

    init = (jnp.int32(0), cache, jnp.full((batch, max_length), config.pad_id, jnp.int32),
            jnp.full((batch,), config.decoder_start_id, jnp.int32),
            jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, init)[2]

  return jax.jit(run)


def generate(model: network.T5, params, encoder_input_tokens: jax.Array, *, max_length: int,
             rng: Optional[jax.Array] = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True,
             vocab_size: Optional[int] = None) -> jax.Array:
  """Decodes up to `max_length` tokens per row.

  Args:
    model: a `network.T5` (only its config is used).
    params: its unboxed 'params' collection (the inner dict, not {'params': ...}).
    encoder_input_tokens: int [B, S], pad_id padded.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
      restricted to the top_k tokens (0 = all) and the top_p nucleus (1.0 = all); any
      temperature > 0, however small, is numerically safe (tiny ones decode near-greedily).
    vocab_size: the vocabulary's size (seqio's `vocab_size`): ids >= it, rows by which the
      embedding is padded past the vocabulary, are never generated (None: every row may be).
  Returns:
    int32 [B, max_length]: generated tokens (no start token); the first EOS is kept and
    everything after it is pad_id; pad_id (when it is not EOS) is never generated before
    the EOS. Works eagerly and under an outer jax.jit.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
  special = max(model.config.eos_id, model.config.pad_id)
  if vocab_size is not None and vocab_size <= special:
    raise ValueError(f"vocab_size must exceed the EOS and padding ids (> {special}), got {vocab_size}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng")
  if rng is None:
    rng = jax.random.PRNGKey(0)
  fn = _build(model.config, int(max_length), float(temperature), int(top_k), float(top_p),
              bool(use_cache), None if vocab_size is None else int(vocab_size))
  return fn(params, jnp.asarray(encoder_input_tokens, jnp.int32), rng)
