"""Model classes: they own the objectives and scoring; the networks live in network.py.

Each class follows t5x's model interface (`loss_fn(params, batch, dropout_rng) ->
(loss, metrics)`, `score_batch`, `predict_batch`, `get_initial_variables`), so the
same logic can be driven by our trainer or by t5x (see t5x_models.py).

`params` is `{'policy': <T5 params>, 'value': <value-network params>}`; the value
entry is empty for methods without a value network. The reference policy enters a
loss only through batch features (`ref_logprobs`, and `kl_ref_logprobs` for KTO):
precomputed by `dro_jax.score`, or filled by the trainer from frozen reference
params via `reference_features`.

Batches are unpacked ([B] per-example features) or packed (segment ids present;
per-example features are [B, K], one slot per segment, with `segment_weights`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dro_jax import checks, losses, network

Batch = Mapping[str, jax.Array]
PyTree = Any

VALUE_KINDS = ("separate", "shared", "scalar", "none")


def is_packed(batch: Batch) -> bool:
    return "decoder_segment_ids" in batch


def _num_segments(batch: Batch) -> int | None:
    return batch["rewards"].shape[-1] if is_packed(batch) else None


def _flat(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (-1,))


def example_weights(batch: Batch) -> jax.Array:
    """[N] weights of the examples in a batch (padding segments get 0)."""
    w = batch["segment_weights"] if is_packed(batch) else jnp.ones(batch["rewards"].shape, jnp.float32)
    if "weights" in batch:  # per-record weights (DataConfig.carry_weights)
        w = w * batch["weights"]
    return _flat(w).astype(jnp.float32)


def _mean_std(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted mean and std of x [N] (0 and 0 when the weights sum to 0; weights below 1 are
    fractions of an example, not a smaller batch)."""
    mean = losses.weighted_mean(x, w)
    return mean, jnp.sqrt(losses.weighted_mean(jnp.square(x - mean), w))


def _encoded_and_decoder_states(module: network.T5, encoder_input_tokens, decoder_input_tokens, *,
                                encoder_segment_ids=None, decoder_segment_ids=None, enable_dropout=False):
    """Encoder output [B, S, D] and final decoder states [B, T, D] of a T5 (a flax method)."""
    encoded = module.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                            enable_dropout=enable_dropout)
    return encoded, module.decode_hidden(encoded, encoder_input_tokens, decoder_input_tokens,
                                         encoder_segment_ids=encoder_segment_ids,
                                         decoder_segment_ids=decoder_segment_ids, enable_dropout=enable_dropout)


def _decoder_states(module: network.T5, encoder_input_tokens, decoder_input_tokens, **kwargs):
    """Final decoder states [B, T, D] of a T5 (applied as a flax method)."""
    return _encoded_and_decoder_states(module, encoder_input_tokens, decoder_input_tokens, **kwargs)[1]


def _paired_decoder_states(module: network.T5, encoder_input_tokens, decoder_input_tokens,
                           other_decoder_input_tokens, *, enable_dropout=False):
    """Decoder states [B, T, D] for two sets of responses to the same prompts (one encoder pass)."""
    encoded = module.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return tuple(module.decode_hidden(encoded, encoder_input_tokens, tokens, enable_dropout=enable_dropout)
                 for tokens in (decoder_input_tokens, other_decoder_input_tokens))


class BaseModel:
    """Shared machinery: policy forward, sequence log-probs, values, decoding."""

    logprob_chunk_size = 128  # decoder time steps per log-prob chunk

    value_kind = "none"
    reference_keys: tuple[str, ...] = ("ref_logprobs",)  # batch features loss_fn reads from the reference

    def __init__(self, config: network.T5Config, *, logprob_normalization: str = "sum"):
        if logprob_normalization not in ("sum", "mean"):
            raise ValueError(f"logprob_normalization: expected 'sum' or 'mean', got {logprob_normalization!r}")
        if not isinstance(config, network.T5Config):
            raise ValueError(f"{type(self).__name__}.config (MODEL_CONFIG) must be a network.T5Config (give a size: "
                             f"--gin_file=gin_configs/models/{{tiny,small,base,large,xl,xxl}}.gin), got {config!r}")
        self.config = config
        self.module = network.T5(config)
        self.logprob_normalization = logprob_normalization

    # ---- networks -------------------------------------------------------------------
    def _apply_policy(self, policy_params, batch: Batch, dropout_rng=None, method=None) -> jax.Array:
        """Runs the T5 on a batch (`method` None gives float32 logits [B, T, V])."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": policy_params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            enable_dropout=dropout_rng is not None,
            rngs=rngs,
            method=method,
        )

    def token_logprobs(self, policy_params, batch: Batch, dropout_rng=None) -> jax.Array:
        """[B, L] float32 log-probs of the target tokens, 0 where the loss weight is 0.

        Computed from the decoder's final states in time chunks, so neither [B, L, V]
        logits nor a float32 log-softmax of that size is ever formed.
        """
        hidden = self._apply_policy(policy_params, batch, dropout_rng, method=_decoder_states)
        return self._token_logprobs_from_states(policy_params, hidden, batch)

    def _token_logprobs_from_states(self, policy_params, hidden: jax.Array, batch: Batch) -> jax.Array:
        embedding = network.output_embedding(self.config, policy_params)
        tok = losses.token_logprobs_from_hidden(hidden, embedding, batch["decoder_target_tokens"],
                                                chunk_size=self.logprob_chunk_size)
        return tok * (batch["decoder_loss_weights"] > 0)

    def sequence_logprobs(self, policy_params, batch: Batch, dropout_rng=None) -> jax.Array:
        """[N] log pi(y|x) per example (N = B unpacked, B*K packed)."""
        return self._reduce_to_sequences(self.token_logprobs(policy_params, batch, dropout_rng), batch)

    def _reduce_to_sequences(self, tok: jax.Array, batch: Batch) -> jax.Array:
        mask = (batch["decoder_loss_weights"] > 0).astype(jnp.float32)
        if is_packed(batch):
            from dro_jax.data.packing import segment_sum

            k = _num_segments(batch)
            total = segment_sum(tok, batch["decoder_segment_ids"], k)
            count = segment_sum(mask, batch["decoder_segment_ids"], k)
        else:
            total, count = tok.sum(-1), mask.sum(-1)
        if self.logprob_normalization == "mean":
            total = total / jnp.maximum(count, 1.0)
        return _flat(total)

    # ---- t5x-style interface --------------------------------------------------------
    def dummy_batch(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, jax.Array]:
        enc = input_shapes["encoder_input_tokens"]
        dec = input_shapes.get("decoder_input_tokens", input_shapes.get("decoder_target_tokens"))
        return {
            "encoder_input_tokens": jnp.ones(enc, jnp.int32),
            "decoder_input_tokens": jnp.ones(dec, jnp.int32),
        }

    def _init_value(self, rng, dummy, policy_vars) -> PyTree:
        return {}

    def get_initial_variables(self, rng, input_shapes, input_types=None) -> dict[str, PyTree]:
        """Boxed initial variables `{'params': {'policy': ..., 'value': ...}}`."""
        del input_types
        dummy = self.dummy_batch(input_shapes)
        policy_rng, value_rng = jax.random.split(rng)
        policy_vars = self.module.init(
            policy_rng, dummy["encoder_input_tokens"], dummy["decoder_input_tokens"], enable_dropout=False
        )["params"]
        return {"params": {"policy": policy_vars, "value": self._init_value(value_rng, dummy, policy_vars)}}

    def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
        """Sequence log-probs [N] under the policy (`params` may be the policy params alone)."""
        policy = params["policy"] if "policy" in params else params
        scores = self.sequence_logprobs(policy, batch)
        if return_intermediates:
            return scores, {"token_logprobs": self.token_logprobs(policy, batch)}
        return scores

    def predict_batch(self, params, batch: Batch, rng=None, *, max_length: int | None = None, **decode_kwargs):
        """Decoded tokens [B, max_length] (greedy unless a temperature > 0 is given)."""
        from dro_jax import decoding

        policy = params["policy"] if "policy" in params else params
        if max_length is None:
            max_length = batch["decoder_target_tokens"].shape[-1]
        return decoding.generate(self.module, policy, batch["encoder_input_tokens"],
                                 max_length=max_length, rng=rng, **decode_kwargs)

    def predict_batch_with_aux(self, params, batch: Batch, rng=None, **kwargs):
        return self.predict_batch(params, batch, rng, **kwargs), {}

    def reference_features(self, ref_params, batch: Batch) -> dict[str, jax.Array]:
        """What the loss needs from the reference policy, computed from frozen params."""
        return {"ref_logprobs": jax.lax.stop_gradient(self.sequence_logprobs(ref_params, batch))}

    def loss_fn(self, params, batch: Batch, dropout_rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError


def value_kind_of(value_params) -> str | None:
    """Which DROModel value_kind wrote these value params (None: not one it knows)."""
    keys = set(value_params)
    if {"encoder", "value_head"} <= keys:
        return "separate"
    return {frozenset({"value_head"}): "shared", frozenset({"value"}): "scalar"}.get(frozenset(keys))


class DROModel(BaseModel):
    """DRO-V: a T5 policy and a value network trained on one squared loss.

    tau: KL regularisation strength. value_kind: 'separate' (own T5 encoder, the
    default and the paper's best), 'shared' (a head on the policy's encoder), or
    'scalar' (one learned value for all prompts).
    """

    def __init__(self, config: network.T5Config, *, tau: float = 1.0, value_kind: str = "separate",
                 logprob_normalization: str = "sum"):
        super().__init__(config, logprob_normalization=logprob_normalization)
        if value_kind not in VALUE_KINDS[:3]:
            raise ValueError(f"value_kind: expected one of {VALUE_KINDS[:3]}, got {value_kind!r}")
        self.tau = checks.number("DROModel.tau (TAU)", tau, above=0)
        self.value_kind = value_kind
        if value_kind == "separate":
            self.value_module = network.ValueNetwork(config)
        elif value_kind == "shared":
            self.value_module = network.SharedEncoderValueHead()
        else:
            self.value_module = network.ScalarValue()

    def _init_value(self, rng, dummy, policy_vars):
        tokens = dummy["encoder_input_tokens"]
        if self.value_kind == "separate":
            value_vars = self.value_module.init(rng, tokens)["params"]
            return network.init_value_from_policy(value_vars, policy_vars)
        if self.value_kind == "shared":
            encoded = jnp.zeros(tokens.shape + (self.config.d_model,), jnp.float32)
            return self.value_module.init(rng, encoded, tokens != self.config.pad_id)["params"]
        return self.value_module.init(rng, tokens)["params"]

    def values(self, params, batch: Batch, dropout_rng=None) -> jax.Array:
        """[N] float32 V(x) per example."""
        tokens = batch["encoder_input_tokens"]
        seg = batch.get("encoder_segment_ids")
        k = _num_segments(batch)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        if self.value_kind == "separate":
            v = self.value_module.apply({"params": params["value"]}, tokens, encoder_segment_ids=seg,
                                        num_segments=k, enable_dropout=dropout_rng is not None, rngs=rngs)
        elif self.value_kind == "shared":
            encoded = self.module.apply({"params": params["policy"]}, tokens, encoder_segment_ids=seg,
                                        enable_dropout=dropout_rng is not None, rngs=rngs,
                                        method=network.T5.encode)
            return self._shared_values(params, encoded, batch)
        else:
            v = self.value_module.apply({"params": params["value"]}, tokens, num_segments=k)
        return _flat(v).astype(jnp.float32)

    def _shared_values(self, params, encoded: jax.Array, batch: Batch) -> jax.Array:
        """[N] float32 values of the 'shared' head on the policy's encoder output [B, S, D]."""
        mask = batch["encoder_input_tokens"] != self.config.pad_id
        v = self.value_module.apply({"params": params["value"]}, encoded, mask,
                                    encoder_segment_ids=batch.get("encoder_segment_ids"),
                                    num_segments=_num_segments(batch))
        return _flat(v).astype(jnp.float32)

    def _logprobs_and_values(self, params, batch: Batch, dropout_rng) -> tuple[jax.Array, jax.Array]:
        """[N] log pi(y|x) and [N] V(x). 'shared' runs the policy's encoder once for both (the
        head sees the encoding the decoder attends to, dropout included)."""
        rng_p = rng_v = None
        if dropout_rng is not None:
            rng_p, rng_v = jax.random.split(dropout_rng)
        if self.value_kind != "shared":
            return self.sequence_logprobs(params["policy"], batch, rng_p), self.values(params, batch, rng_v)
        encoded, hidden = self._apply_policy(params["policy"], batch, rng_p, method=_encoded_and_decoder_states)
        tok = self._token_logprobs_from_states(params["policy"], hidden, batch)
        return self._reduce_to_sequences(tok, batch), self._shared_values(params, encoded, batch)

    def loss_fn(self, params, batch: Batch, dropout_rng):
        """Policy loss + value loss, trained by one backward pass. With a 'separate' or 'scalar' value
        their gradients touch disjoint parameters (stop-gradients inside each); with 'shared' the
        policy's encoder gets both (the value head's loss shapes it too)."""
        logp, values = self._logprobs_and_values(params, batch, dropout_rng)
        ref = _flat(batch["ref_logprobs"])
        rewards = _flat(batch["rewards"]).astype(jnp.float32)
        w = example_weights(batch)
        kw = dict(ref_logprobs=ref, rewards=rewards, tau=self.tau, weights=w)
        policy_loss = losses.dro_policy_loss(logprobs=logp, values=values, **kw)
        value_loss = losses.dro_value_loss(values=values, logprobs=logp, **kw)
        joint = losses.dro_loss(logprobs=logp, values=values, **kw)
        logratio = logp - ref
        metrics = {"loss/policy": policy_loss, "loss/value": value_loss, "loss/dro": joint}
        for name, x in (("value", values), ("logratio", logratio), ("reward", rewards),
                        ("advantage", rewards - values), ("logprob", logp)):
            mean, std = _mean_std(x, w)
            metrics[f"{name}/mean"], metrics[f"{name}/std"] = mean, std
        metrics["examples"] = metrics["loss_normalizer"] = w.sum()
        return policy_loss + value_loss, metrics


class KTOModel(BaseModel):
    """KTO baseline (Ethayarajh et al.; TRL's formula).

    desirable: 'sign' marks reward > 0 as desirable (thumbs up, or standardised
    scores); 'batch_mean' marks reward > batch mean (the DRO paper's rule for scores).
    The KL reference point uses mismatched in-batch pairs: prompt i with response i-1.
    """

    reference_keys = ("ref_logprobs", "kl_ref_logprobs")
    supports_packing = False  # the KL term pairs whole examples across the batch
    # The KL reference point, the mismatched pairs and a batch-mean threshold are batch-level:
    # per microbatch they would be another objective.
    supports_microbatches = False

    def __init__(self, config: network.T5Config, *, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, desirable: str = "sign", logprob_normalization: str = "sum"):
        super().__init__(config, logprob_normalization=logprob_normalization)
        if desirable not in ("sign", "batch_mean"):
            raise ValueError(f"desirable: expected 'sign' or 'batch_mean', got {desirable!r}")
        self.beta, self.desirable = checks.number("KTOModel.beta (BETA)", beta, above=0), desirable
        self.desirable_weight = checks.number("KTOModel.desirable_weight", desirable_weight, at_least=0)
        self.undesirable_weight = checks.number("KTOModel.undesirable_weight", undesirable_weight, at_least=0)
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ValueError("KTOModel: desirable_weight and undesirable_weight are both 0; nothing would be learnt")

    @staticmethod
    def mismatched(batch: Batch) -> dict[str, jax.Array]:
        """Pairs each prompt with the previous example's response (unpacked batches)."""
        if is_packed(batch):
            raise ValueError("KTO needs unpacked batches (its KL term pairs prompts with other responses)")
        if batch["encoder_input_tokens"].shape[0] < 2:  # the one response would be its own mismatch
            raise ValueError("KTO needs at least 2 examples a batch: its KL reference point pairs each prompt "
                             "with another example's response")
        out = dict(batch)
        for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
            out[k] = jnp.roll(batch[k], 1, axis=0)
        return out

    def matched_and_mismatched_logprobs(self, policy_params, batch: Batch, dropout_rng=None):
        """([B], [B]) log-probs of (x_i, y_i) and (x_i, y_{i-1}), encoding the prompts once."""
        other = self.mismatched(batch)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        states, other_states = self.module.apply(
            {"params": policy_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            other["decoder_input_tokens"], enable_dropout=dropout_rng is not None, rngs=rngs,
            method=_paired_decoder_states)
        logp = self._reduce_to_sequences(self._token_logprobs_from_states(policy_params, states, batch), batch)
        kl_logp = self._reduce_to_sequences(
            self._token_logprobs_from_states(policy_params, other_states, other), other)
        return logp, kl_logp

    def reference_features(self, ref_params, batch):
        logp, kl_logp = self.matched_and_mismatched_logprobs(ref_params, batch)
        return {"ref_logprobs": jax.lax.stop_gradient(logp), "kl_ref_logprobs": jax.lax.stop_gradient(kl_logp)}

    def desirable_mask(self, rewards: jax.Array) -> jax.Array:
        if self.desirable == "sign":
            return rewards > 0
        return rewards > rewards.mean()

    def loss_fn(self, params, batch: Batch, dropout_rng):
        logp, kl_logp = self.matched_and_mismatched_logprobs(params["policy"], batch, dropout_rng)
        rewards = batch["rewards"].astype(jnp.float32)
        w = example_weights(batch)
        loss, metrics = losses.kto_loss(
            logprobs=logp, ref_logprobs=batch["ref_logprobs"], kl_logprobs=kl_logp,
            kl_ref_logprobs=batch["kl_ref_logprobs"], desirable=self.desirable_mask(rewards),
            beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            weights=w)
        metrics = {f"kto/{k}": v for k, v in metrics.items()}
        metrics["loss/kto"] = loss
        logratio = logp - batch["ref_logprobs"]
        for name, x in (("logratio", logratio), ("reward", rewards), ("logprob", logp)):
            metrics[f"{name}/mean"], metrics[f"{name}/std"] = _mean_std(x, w)
        metrics["examples"] = metrics["loss_normalizer"] = w.sum()
        return loss, metrics


class FilteredSFTModel(BaseModel):
    """Cross-entropy on the responses whose reward exceeds `min_reward` (thumbs up)."""

    reference_keys = ()

    def __init__(self, config: network.T5Config, *, min_reward: float = 0.0):
        super().__init__(config)
        self.min_reward = checks.number("min_reward (MIN_REWARD)", min_reward)

    def reference_features(self, ref_params, batch):
        return {}

    def loss_fn(self, params, batch: Batch, dropout_rng):
        tok = self.token_logprobs(params["policy"], batch, dropout_rng)
        keep = batch["rewards"] > self.min_reward
        if "weights" in batch:  # weights count as 1, but 0 (and a padding row) leaves a record out
            keep = keep & (batch["weights"] > 0)
        if is_packed(batch):
            keep = keep & (batch["segment_weights"] > 0)
            # slot 0 = padding id 0, slot k+1 = segment k
            per_slot = jnp.concatenate([jnp.zeros_like(keep[:, :1]), keep], axis=1)
            token_keep = jnp.take_along_axis(per_slot, batch["decoder_segment_ids"], axis=1)
            example_mask = None
            weights = batch["decoder_loss_weights"] * token_keep
        else:
            example_mask, weights = keep, batch["decoder_loss_weights"]
        loss, metrics = losses.sft_loss_from_token_logprobs(tok, weights, example_mask=example_mask)
        metrics = {f"sft/{k}": v for k, v in metrics.items()}
        metrics["loss/sft"] = loss
        metrics["examples"] = keep.sum().astype(jnp.float32)
        metrics["loss_normalizer"] = metrics["sft/num_tokens"]
        return loss, metrics
