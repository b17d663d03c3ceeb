"""Losses of DRO-V, KTO and filtered SFT as pure array functions.

Nothing here knows about models or configs. Shapes: B = batch (examples),
L = target length, V = vocabulary. Per-example losses are reduced with a batch
mean; where a function takes ``weights`` [B] (default None = plain mean) the
reduction is ``sum(w * loss) / sum(w)``, and 0 when ``sum(w) == 0``.

Precision: log-probs and losses are computed in float32, or in float64 when
the inputs are float64 (tests under ``jax.enable_x64``).

See DESIGN.md section 1 for the mathematics.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Metrics = Dict[str, Array]

# Time steps per chunk in `token_logprobs`: a float32 chunk is B*C*V*4 bytes,
# e.g. 32 * 128 * 32128 * 4 bytes = 0.5 GiB for T5 at batch 32.
DEFAULT_CHUNK_SIZE = 128


# ----------------------------------------------------------------- helpers


def _float(x) -> Array:
    """`x` as an array of at least float32 precision (float64 stays)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, or 0 where den == 0 (no NaN in values or gradients)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def weighted_mean(x: Array, weights: Optional[Array] = None) -> Array:
    """Mean of x [B]; with weights [B]: sum(w*x) / sum(w), 0 if sum(w) == 0.

    Zero-weight rows get a zero gradient, and a NaN value there does not
    reach the result.
    """
    if weights is None:
        return jnp.mean(x)
    w = jnp.asarray(weights).astype(x.dtype)
    return _safe_div(jnp.sum(jnp.where(w != 0, w * x, 0)), jnp.sum(w))


# --------------------------------------------------------------- log-probs


def _chunk_token_logprobs(logits: Array, targets: Array) -> Array:
    """log_softmax(logits)[target]: logits [..., V], targets [...] -> [...]."""
    x = _float(logits)
    lse = jax.nn.logsumexp(x, axis=-1)
    idx = targets[..., None].astype(jnp.int32)
    return jnp.take_along_axis(x, idx, axis=-1)[..., 0] - lse


# Recompute each chunk in the backward pass, so the scan keeps no float32
# [B, C, V] residuals (stacked, they would be the full float32 log-softmax).
_remat_chunk = jax.checkpoint(
    _chunk_token_logprobs, policy=jax.checkpoint_policies.nothing_saveable)


def token_logprobs(logits: Array, targets: Array, *,
                   chunk_size: Optional[int] = None) -> Array:
    """Per-token log-probs of the targets, chunked along the length axis.

    Args:
        logits: [B, L, V], any float dtype (e.g. bfloat16).
        targets: int [B, L].
        chunk_size: time steps per chunk (default DEFAULT_CHUNK_SIZE). Only
            one chunk's float32 [B, C, V] log-softmax exists at a time,
            forward and backward. L need not be a multiple of it.

    Returns:
        [B, L] float32 (float64 for float64 logits): log p(targets[b, t]).
    """
    return _over_time_chunks(_remat_chunk, (logits, targets), chunk_size)


def _over_time_chunks(fn, arrays, chunk_size: Optional[int]) -> Array:
    """Applies fn to chunks of the time axis (axis 1) of every array -> [B, L]."""
    c = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l = arrays[0].shape[:2]
    if l <= c:
        return fn(*arrays)
    n = l // c
    main = n * c
    # [B, n*C, ...] -> [n, B, C, ...]: lax.map scans over the chunks.
    split = lambda x: x[:, :main].reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)
    out = lax.map(lambda a: fn(*a), tuple(split(x) for x in arrays))
    out = out.swapaxes(0, 1).reshape(b, main)
    if main < l:  # the remainder (< C steps) as one more piece
        tail = fn(*(x[:, main:] for x in arrays))
        out = jnp.concatenate([out, tail], axis=1)
    return out


@jax.custom_vjp
def vocab_logits(hidden: Array, embedding: Array) -> Array:
    """hidden [B, C, D] @ embedding [D, V] -> float32 logits [B, C, V].

    The matmul runs in hidden's dtype with float32 accumulation. For bfloat16 so do both
    backward matmuls: autodiff would pair the float32 logit gradient with a bfloat16 operand,
    which XLA upcasts, so on a GPU they ran as float32 (TF32) GEMMs, the slowest matmuls of the
    step (3.7 ms of the T5-large profile). bfloat16 has float32's exponent range, so the
    gradient loses only mantissa; float16 would flush small gradients to zero, so it (and
    float32) keeps the float32 backward.
    """
    return jnp.einsum("bcd,dv->bcv", hidden, embedding.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def _vocab_logits_fwd(hidden, embedding):
    return vocab_logits(hidden, embedding), (hidden, embedding)


def _vocab_logits_bwd(residuals, g):
    hidden, embedding = residuals
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    dt = jnp.bfloat16 if hidden.dtype == jnp.bfloat16 else acc
    # The embedding as the forward used it (rounded to hidden's dtype), then in dt.
    g, h, e = g.astype(dt), hidden.astype(dt), embedding.astype(hidden.dtype).astype(dt)
    d_hidden = jnp.einsum("bcv,dv->bcd", g, e, preferred_element_type=acc)
    d_embedding = jnp.einsum("bcd,bcv->dv", h, g, preferred_element_type=acc)
    return d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype)


vocab_logits.defvjp(_vocab_logits_fwd, _vocab_logits_bwd)


def _hidden_chunk_logprobs(hidden: Array, targets: Array, embedding: Array) -> Array:
    return _chunk_token_logprobs(vocab_logits(hidden, embedding), targets)


_remat_hidden_chunk = jax.checkpoint(
    _hidden_chunk_logprobs, policy=jax.checkpoint_policies.nothing_saveable)


def token_logprobs_from_hidden(hidden: Array, embedding: Array, targets: Array, *,
                               chunk_size: Optional[int] = None) -> Array:
    """Per-token log-probs from final decoder states, never forming [B, L, V] logits.

    Args:
        hidden: [B, L, D] decoder output states (compute dtype).
        embedding: [D, V] output projection (logits = hidden @ embedding).
        targets: int [B, L].
        chunk_size: time steps per chunk; only one chunk's [B, C, V] logits exist
            at a time, forward and backward (recomputed in the backward pass).

    Returns:
        [B, L] float32: log p(targets[b, t]).
    """
    fn = lambda h, t: _remat_hidden_chunk(h, t, embedding)
    return _over_time_chunks(fn, (hidden, targets), chunk_size)


def reduce_token_logprobs(token_logprobs: Array, weights: Array, *,
                          average: bool = False) -> Array:
    """Sums per-token log-probs [B, L] where weights [B, L] > 0 -> [B].

    ``average=True`` divides by the number of counted tokens (the per-token
    option; DESIGN's default is the sum). A row without tokens gives 0.
    """
    mask = jnp.asarray(weights) > 0
    total = jnp.sum(jnp.where(mask, token_logprobs, 0), axis=-1)
    if not average:
        return total
    return _safe_div(total, jnp.sum(mask, axis=-1).astype(total.dtype))


def sequence_logprob(logits: Array, targets: Array, weights: Array, *,
                     chunk_size: Optional[int] = None,
                     average: bool = False) -> Array:
    """log pi(y|x): summed target-token log-probs where weights > 0.

    Args:
        logits: [B, L, V], any float dtype.
        targets: int [B, L].
        weights: [B, L] (int or float); positions with weight <= 0 are
            ignored (only the sign matters, not the value).
        chunk_size: see `token_logprobs`.
        average: the per-token mean instead of the sum (an option only).

    Returns:
        [B] float32 (float64 for float64 logits).
    """
    tlp = token_logprobs(logits, targets, chunk_size=chunk_size)
    return reduce_token_logprobs(tlp, weights, average=average)


# --------------------------------------------------------------------- DRO


def dro_policy_loss(logprobs: Array, ref_logprobs: Array, values: Array,
                    rewards: Array, tau,
                    weights: Optional[Array] = None) -> Array:
    """DRO-V policy loss: mean[-logp * sg(r - V) + tau/2 (logp - ref_logp)^2].

    Its gradient in logp is 1/tau times that of `dro_loss` (same V).
    Gradients flow only into `logprobs`.

    Args:
        logprobs, ref_logprobs, values, rewards: [B].
        tau: KL-regularisation strength (scalar).
        weights: optional [B] example weights.

    Returns:
        scalar.
    """
    logp = _float(logprobs)
    ref = lax.stop_gradient(_float(ref_logprobs))
    adv = lax.stop_gradient(_float(rewards) - _float(values))
    per_example = -logp * adv + 0.5 * tau * jnp.square(logp - ref)
    return weighted_mean(per_example, weights)


def dro_value_loss(values: Array, logprobs: Array, ref_logprobs: Array,
                   rewards: Array, tau,
                   weights: Optional[Array] = None) -> Array:
    """DRO-V value loss: 1/2 mean[(r - V - tau * sg(logp - ref_logp))^2].

    Gradients flow only into `values`. Shapes as in `dro_policy_loss`;
    returns a scalar.
    """
    logratio = lax.stop_gradient(_float(logprobs) - _float(ref_logprobs))
    resid = lax.stop_gradient(_float(rewards)) - _float(values) - tau * logratio
    return weighted_mean(0.5 * jnp.square(resid), weights)


def dro_loss(logprobs: Array, ref_logprobs: Array, values: Array,
             rewards: Array, tau, weights: Optional[Array] = None) -> Array:
    """Joint DRO loss (paper eq. 4): 1/2 mean[(r - V - tau (logp - ref))^2].

    Gradients flow into `logprobs` and `values` (not rewards or ref).
    Shapes as in `dro_policy_loss`; returns a scalar.
    """
    logratio = _float(logprobs) - lax.stop_gradient(_float(ref_logprobs))
    resid = lax.stop_gradient(_float(rewards)) - _float(values) - tau * logratio
    return weighted_mean(0.5 * jnp.square(resid), weights)


# --------------------------------------------------------------------- KTO


def kto_loss(logprobs: Array, ref_logprobs: Array, kl_logprobs: Array,
             kl_ref_logprobs: Array, desirable: Array, beta,
             desirable_weight=1.0, undesirable_weight=1.0, *,
             weights: Optional[Array] = None) -> Tuple[Array, Metrics]:
    """KTO loss as in the KTO paper and TRL's KTOTrainer.

    With logratio = logp - ref_logp and the reference point
    KL = max(0, mean(kl_logprobs - kl_ref_logprobs)) (no gradient):
      desirable:   desirable_weight   * (1 - sigmoid(beta * (logratio - KL)))
      undesirable: undesirable_weight * (1 - sigmoid(beta * (KL - logratio)))
    and the loss is their mean over all B examples (TRL: the mean of the
    concatenated weighted chosen and rejected losses). Note beta multiplies
    KL as well, as in TRL.

    Args:
        logprobs, ref_logprobs: [B] log pi(y|x), log pi_ref(y|x).
        kl_logprobs, kl_ref_logprobs: [B'] the same on mismatched (x, y').
        desirable: [B] bool or 0/1 float.
        beta: scalar.
        desirable_weight, undesirable_weight: lambda_D, lambda_U.
        weights: optional [B] example weights of the loss mean (not the KL).

    Returns:
        (loss scalar, metrics), metrics without gradient:
          kl: the clamped reference point;
          rewards/chosen, rewards/rejected: mean beta * logratio over the
            desirable / undesirable examples of weight > 0 (0 when there are none);
          rewards/margins: rewards/chosen - rewards/rejected;
          logratio: mean logratio (weighted by `weights`);
          num_desirable, num_undesirable: counts of examples of weight > 0.
    """
    logratio = _float(logprobs) - lax.stop_gradient(_float(ref_logprobs))
    kl_mean = jnp.mean(_float(kl_logprobs) - _float(kl_ref_logprobs))
    kl = lax.stop_gradient(jnp.maximum(kl_mean, 0.0))
    d = jnp.asarray(desirable).astype(bool)
    chosen = desirable_weight * (1 - jax.nn.sigmoid(beta * (logratio - kl)))
    rejected = undesirable_weight * (
        1 - jax.nn.sigmoid(beta * (kl - logratio)))
    loss = weighted_mean(jnp.where(d, chosen, rejected), weights)

    rewards = lax.stop_gradient(beta * logratio)
    present = jnp.ones_like(d) if weights is None else jnp.asarray(weights) > 0  # counts leave weight-0 rows out
    n_d = jnp.sum(d & present).astype(rewards.dtype)
    n_u = jnp.sum(~d & present).astype(rewards.dtype)
    r_chosen = _safe_div(jnp.sum(jnp.where(d & present, rewards, 0)), n_d)
    r_rejected = _safe_div(jnp.sum(jnp.where(~d & present, rewards, 0)), n_u)
    metrics = {
        "kl": kl,
        "rewards/chosen": r_chosen,
        "rewards/rejected": r_rejected,
        "rewards/margins": r_chosen - r_rejected,
        "logratio": lax.stop_gradient(weighted_mean(logratio, weights)),  # padding rows (weight 0) left out
        "num_desirable": n_d,
        "num_undesirable": n_u,
    }
    return loss, metrics


# ------------------------------------------------------------ filtered SFT


def sft_loss_from_token_logprobs(token_logprobs: Array, weights: Array,
                                 example_mask: Optional[Array] = None
                                 ) -> Tuple[Array, Metrics]:
    """Token-level cross-entropy over the target tokens of selected examples.

    Args:
        token_logprobs: [B, L] per-token log-probs (see `token_logprobs`).
        weights: [B, L]; tokens with weight <= 0 are ignored.
        example_mask: optional [B] bool or 0/1; only these examples count
            (filtered SFT on thumbs-up responses). None = all examples.

    Returns:
        (loss, metrics): loss = -sum(log p) / number of counted tokens, 0 (not
        NaN, zero gradient) when nothing is selected; metrics: num_tokens,
        num_examples (selected examples with at least one token).
    """
    tlp = token_logprobs  # the argument shadows the function of that name
    mask = jnp.asarray(weights) > 0
    if example_mask is not None:
        mask = mask & (jnp.asarray(example_mask) > 0)[:, None]
    n_tok = jnp.sum(mask).astype(tlp.dtype)
    nll = -jnp.sum(jnp.where(mask, tlp, 0))
    metrics = {
        "num_tokens": n_tok,
        "num_examples": jnp.sum(jnp.any(mask, axis=-1)).astype(tlp.dtype),
    }
    return _safe_div(nll, n_tok), metrics


def sft_loss(logits: Array, targets: Array, weights: Array, *,
             example_mask: Optional[Array] = None,
             chunk_size: Optional[int] = None) -> Tuple[Array, Metrics]:
    """Filtered-SFT cross-entropy from logits [B, L, V], targets [B, L].

    `sft_loss_from_token_logprobs` on the chunked `token_logprobs`;
    returns (loss scalar, metrics).
    """
    tlp = token_logprobs(logits, targets, chunk_size=chunk_size)
    return sft_loss_from_token_logprobs(tlp, weights, example_mask)
