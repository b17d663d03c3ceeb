"""DROModel / KTOModel / FilteredSFTModel: loss plumbing, scoring and an overfit run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from dro_jax import losses, models, network
from tiny import random_batch, tiny_config


def _init(model, batch, seed=0):
    shapes = {k: v.shape for k, v in batch.items()}
    return nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(seed), shapes)["params"])


def test_score_batch_matches_naive_log_softmax():
    model = models.DROModel(tiny_config())
    batch = random_batch()
    params = _init(model, batch)
    scores = model.score_batch(params, batch)
    logits = model.module.apply({"params": params["policy"]}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    tok = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    expected = (tok * batch["decoder_loss_weights"]).sum(-1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_value_network_starts_from_policy_encoder():
    model = models.DROModel(tiny_config())
    params = _init(model, random_batch())
    for name in ("token_embedder", "encoder"):
        for a, b in zip(jax.tree_util.tree_leaves(params["policy"][name]),
                        jax.tree_util.tree_leaves(params["value"][name])):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("weighted", [False, True])
def test_dro_loss_fn_matches_loss_functions(weighted):
    model = models.DROModel(tiny_config(), tau=0.5)
    batch = random_batch(reward_kind="scalar")
    params = _init(model, batch)
    batch["ref_logprobs"] = np.asarray(model.score_batch(params, batch)) - 0.3
    w = None
    if weighted:  # per-record weights reach both the policy and the value loss
        w = batch["weights"] = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0, 0.0, 1.0], np.float32)
    loss, metrics = model.loss_fn(params, batch, None)
    logp = model.score_batch(params, batch)
    v = model.values(params, batch)
    kw = dict(ref_logprobs=batch["ref_logprobs"], rewards=batch["rewards"], tau=0.5, weights=w)
    expected = losses.dro_policy_loss(logprobs=logp, values=v, **kw) + losses.dro_value_loss(
        values=v, logprobs=logp, **kw)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["logratio/mean"], 0.3, rtol=1e-4)
    if weighted:  # and they change the loss
        unweighted = {k: x for k, x in batch.items() if k != "weights"}
        assert abs(float(model.loss_fn(params, unweighted, None)[0]) - float(loss)) > 1e-3


def test_shared_value_head_loss_and_gradients_match_two_separate_passes():
    """value_kind='shared' encodes once for the decoder and the head: the loss and every
    gradient equal those of log-probs and values computed apart (the encoder gets both).
    Packed rows, so the head's segment pooling is covered too."""
    model = models.DROModel(tiny_config(), tau=0.7, value_kind="shared")
    batch = random_batch(seed=3, batch=4, reward_kind="scalar")
    params = _init(model, batch)
    # two examples a row, 2 segments each
    for key in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
        batch[key] = np.asarray(batch[key]).reshape(2, -1)
    for key, n in (("encoder_segment_ids", batch["encoder_input_tokens"].shape[1] // 2),
                   ("decoder_segment_ids", batch["decoder_input_tokens"].shape[1] // 2)):
        batch[key] = np.tile(np.repeat(np.array([1, 2], np.int32), n), (2, 1))
    batch["rewards"] = np.asarray(batch["rewards"]).reshape(2, 2)
    batch["segment_weights"] = np.ones((2, 2), np.float32)
    batch["ref_logprobs"] = (np.asarray(model.score_batch(params, batch)) - 0.2).reshape(2, 2)

    def two_passes(p):
        logp, v = model.score_batch(p, batch), model.values(p, batch)
        kw = dict(ref_logprobs=np.reshape(batch["ref_logprobs"], -1), rewards=np.reshape(batch["rewards"], -1),
                  tau=0.7)
        return losses.dro_policy_loss(logprobs=logp, values=v, **kw) + losses.dro_value_loss(
            values=v, logprobs=logp, **kw)

    loss, grads = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))(params)
    want, want_grads = jax.jit(jax.value_and_grad(two_passes))(params)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(grads["value"]["value_head"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_metric_means_and_stds_are_weighted_ones_at_any_weight_scale(scale):
    """Weights summing below 1 are fractions of examples: the metrics used to divide by 1 instead."""
    model = models.DROModel(tiny_config(), tau=0.5)
    batch = random_batch(reward_kind="scalar")
    params = _init(model, batch)
    w = scale * np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0, 0.0, 1.0], np.float32) / 8.5
    batch["weights"] = w
    batch["ref_logprobs"] = np.asarray(model.score_batch(params, batch)) - 0.3
    _, metrics = model.loss_fn(params, batch, None)
    r = np.asarray(batch["rewards"], np.float64)
    mean = (w * r).sum() / w.sum()
    np.testing.assert_allclose(metrics["reward/mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward/std"], np.sqrt((w * (r - mean) ** 2).sum() / w.sum()), rtol=1e-5)


def test_kto_refuses_a_batch_of_one():
    """Its mismatched pair would be the example itself: the KL point its own log-ratio (TRL refuses too)."""
    model = models.KTOModel(tiny_config())
    batch = {k: v[:1] for k, v in random_batch().items()}
    params = _init(model, batch)
    with pytest.raises(ValueError, match="KTO needs at least 2 examples a batch"):
        model.loss_fn(params, dict(batch, **model.reference_features(params["policy"], random_batch())), None)


def _naive_sequence_logprobs(config, params, enc, dec_in, targets):
    """Summed log-probs straight from the network's logits (no model-class code)."""
    logits = network.T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    tok = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    return (tok * (np.asarray(targets) > 0)).sum(-1)


@pytest.mark.parametrize("desirable", ["sign", "batch_mean"])
def test_kto_model_loss_equals_trl_formula_on_real_logprobs(desirable):
    """KTOModel's wiring (mismatched pairs for the KL point, desirable mask, weights of the two
    sides) against TRL's formula on log-probs computed directly from the network."""
    from scipy.special import expit

    config = tiny_config()
    model = models.KTOModel(config, beta=0.7, desirable_weight=1.0, undesirable_weight=1.5,
                            desirable=desirable)
    batch = random_batch(seed=13, reward_kind="scalar")
    batch["rewards"] = np.array([2.0, -1.0, 0.3, -0.2, 1.5, -3.0, 0.9, 0.1], np.float32)
    params = _init(model, batch, seed=1)
    ref_params = _init(model, batch, seed=2)["policy"]
    enc, dec_in, tgt = batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"]
    prev = (np.arange(len(enc)) - 1) % len(enc)  # TRL's KL pairs: prompt i with completion i-1
    seq = lambda p, d, t: _naive_sequence_logprobs(config, p, enc, d, t)
    logp, ref = seq(params["policy"], dec_in, tgt), seq(ref_params, dec_in, tgt)
    kl_logp, kl_ref = seq(params["policy"], dec_in[prev], tgt[prev]), seq(ref_params, dec_in[prev], tgt[prev])
    kl_ref -= np.mean(kl_ref - kl_logp) + 0.5  # a reference point of 0.5 nats, above the clamp
    r = batch["rewards"]
    good = r > 0 if desirable == "sign" else r > r.mean()
    kl = max(0.0, float(np.mean(kl_logp - kl_ref)))
    chosen = 1 - expit(0.7 * ((logp - ref)[good] - kl))
    rejected = 1 - expit(0.7 * (kl - (logp - ref)[~good]))
    want = np.concatenate([1.0 * chosen, 1.5 * rejected]).mean()

    batch["ref_logprobs"], batch["kl_ref_logprobs"] = ref.astype(np.float32), kl_ref.astype(np.float32)
    loss, metrics = model.loss_fn(params, batch, None)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["kto/kl"]), kl, rtol=1e-4, atol=1e-5)
    assert kl == pytest.approx(0.5)
    assert float(metrics["kto/num_desirable"]) == good.sum()


@pytest.mark.parametrize("value_kind", ["separate", "shared", "scalar"])
def test_dro_v_overfits_one_batch(value_kind):
    """On one fixed batch, training both networks drives the joint DRO loss down."""
    model = models.DROModel(tiny_config(), tau=1.0, value_kind=value_kind)
    batch = random_batch(seed=3, reward_kind="scalar")
    params = _init(model, batch)
    batch["ref_logprobs"] = np.asarray(model.score_batch(params, batch))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics["loss/dro"]

    first = None
    for _ in range(150):
        params, opt, joint = step(params, opt)
        first = joint if first is None else first
    # one shared scalar value fits per-example rewards only through the policy: slower
    factor = 0.35 if value_kind == "scalar" else 0.1
    assert float(joint) < factor * float(first), (float(first), float(joint))


def test_kto_and_sft_losses_run_and_decrease():
    batch = random_batch(seed=5)
    for model in (models.KTOModel(tiny_config(), beta=0.5), models.FilteredSFTModel(tiny_config())):
        params = _init(model, batch)
        b = dict(batch)
        b.update(model.reference_features(params["policy"], b))
        tx = optax.adam(3e-3)
        opt = tx.init(params)

        @jax.jit
        def step(params, opt):
            (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, b, None)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        losses_seen = [float(step(params, opt)[2])]
        for _ in range(60):
            params, opt, loss = step(params, opt)
        losses_seen.append(float(loss))
        assert np.isfinite(losses_seen).all()
        assert losses_seen[-1] < losses_seen[0], (type(model).__name__, losses_seen)


def test_sft_ignores_thumbs_down_examples():
    model = models.FilteredSFTModel(tiny_config())
    batch = random_batch(seed=7)
    params = _init(model, batch)
    loss, _ = model.loss_fn(params, batch, None)
    keep = batch["rewards"] > 0
    tok = model.token_logprobs(params["policy"], batch)
    w = batch["decoder_loss_weights"] * keep[:, None]
    np.testing.assert_allclose(loss, -(tok * w).sum() / w.sum(), rtol=1e-5)


def test_packed_batch_gives_same_logprobs_and_values_as_unpacked():
    """Two examples packed into one row score like the same two examples unpacked."""
    model = models.DROModel(tiny_config())
    batch = random_batch(seed=11, batch=4)
    params = _init(model, batch)
    unpacked_lp = np.asarray(model.score_batch(params, batch))
    unpacked_v = np.asarray(model.values(params, batch))

    def pack(pair):
        row = {k: [] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                               "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids")}
        for seg, i in enumerate(pair, start=1):
            n_in = int((batch["encoder_input_tokens"][i] > 0).sum())
            n_t = int((batch["decoder_target_tokens"][i] > 0).sum())
            row["encoder_input_tokens"] += list(batch["encoder_input_tokens"][i, :n_in])
            row["encoder_segment_ids"] += [seg] * n_in
            row["decoder_target_tokens"] += list(batch["decoder_target_tokens"][i, :n_t])
            row["decoder_input_tokens"] += list(batch["decoder_input_tokens"][i, :n_t])
            row["decoder_loss_weights"] += [1] * n_t
            row["decoder_segment_ids"] += [seg] * n_t
        out = {}
        for k, v in row.items():
            length = 24 if k.startswith("encoder") else 20
            out[k] = np.array(v + [0] * (length - len(v)), np.int32)
        return out

    rows = [pack((0, 1)), pack((2, 3))]
    packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    packed["rewards"] = batch["rewards"].reshape(2, 2)
    packed["segment_weights"] = np.ones((2, 2), np.float32)
    np.testing.assert_allclose(model.score_batch(params, packed), unpacked_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.values(params, packed), unpacked_v, rtol=1e-4, atol=1e-5)
    # and the same losses, with reference log-probs carried per segment
    batch["ref_logprobs"] = (unpacked_lp - 0.5).astype(np.float32)
    packed["ref_logprobs"] = batch["ref_logprobs"].reshape(2, 2)
    loss_u, m_u = model.loss_fn(params, batch, None)
    loss_p, m_p = model.loss_fn(params, packed, None)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-4)
    for key in ("loss/policy", "loss/value", "loss/dro", "logratio/mean"):
        np.testing.assert_allclose(m_p[key], m_u[key], rtol=1e-4, atol=1e-5, err_msg=key)
