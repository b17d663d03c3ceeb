"""dro_jax.losses against independent numpy computations and hand gradients."""
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, log_softmax

from dro_jax import losses

B = 7


def _batch(seed=0):
    """Random float64 (logp, ref_logp, values, rewards), [B] each."""
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(3.0, 2.0, size=B))
    ref = -np.abs(rng.normal(3.0, 2.0, size=B))
    return logp, ref, rng.normal(size=B), rng.normal(size=B)


def _grads(fn, *args):
    """Gradient of scalar fn wrt each of its positional arguments (float64)."""
    return [np.asarray(g) for g in
            jax.grad(fn, argnums=tuple(range(len(args))))(*args)]


# ---------------------------------------------------------------- DRO


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_dro_losses_values_and_gradients(tau):
    with jax.enable_x64(True):
        logp, ref, v, r = _batch()
        lr = logp - ref
        # policy loss: args (logp, ref, values, rewards)
        pol = lambda *a: losses.dro_policy_loss(*a, tau)
        np.testing.assert_allclose(
            pol(logp, ref, v, r),
            np.mean(-logp * (r - v) + tau / 2 * lr**2), rtol=1e-12)
        g_logp, g_ref, g_v, g_r = _grads(pol, logp, ref, v, r)
        np.testing.assert_allclose(g_logp, (-(r - v) + tau * lr) / B, rtol=1e-12)
        for g in (g_ref, g_v, g_r):
            assert np.all(g == 0)

        # value loss: args (values, logp, ref, rewards)
        val = lambda *a: losses.dro_value_loss(*a, tau)
        resid = r - v - tau * lr
        np.testing.assert_allclose(val(v, logp, ref, r),
                                   0.5 * np.mean(resid**2), rtol=1e-12)
        g_v, g_logp, g_ref, g_r = _grads(val, v, logp, ref, r)
        np.testing.assert_allclose(g_v, -resid / B, rtol=1e-12)
        for g in (g_logp, g_ref, g_r):
            assert np.all(g == 0)

        # joint loss (eq. 4): args (logp, ref, values, rewards)
        joint = lambda *a: losses.dro_loss(*a, tau)
        np.testing.assert_allclose(joint(logp, ref, v, r),
                                   0.5 * np.mean(resid**2), rtol=1e-12)
        j_logp, j_ref, j_v, j_r = _grads(joint, logp, ref, v, r)
        np.testing.assert_allclose(j_logp, -tau * resid / B, rtol=1e-12)
        np.testing.assert_allclose(j_v, -resid / B, rtol=1e-12)
        assert np.all(j_ref == 0) and np.all(j_r == 0)

        # DRO-V = gradient of eq. 4, the policy part rescaled by 1/tau.
        p_logp = _grads(pol, logp, ref, v, r)[0]
        np.testing.assert_allclose(p_logp, j_logp / tau, rtol=1e-12)
        np.testing.assert_allclose(_grads(val, v, logp, ref, r)[0], j_v,
                                   rtol=1e-12)


def test_dro_losses_weighted_mean():
    with jax.enable_x64(True):
        logp, ref, v, r = _batch(1)
        w = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.0, 1.5])
        tau = 0.7
        resid = r - v - tau * (logp - ref)
        want = np.sum(w * 0.5 * resid**2) / w.sum()
        np.testing.assert_allclose(
            losses.dro_loss(logp, ref, v, r, tau, weights=w), want, rtol=1e-12)
        np.testing.assert_allclose(
            losses.dro_value_loss(v, logp, ref, r, tau, weights=w), want,
            rtol=1e-12)
        g = jax.grad(lambda x: losses.dro_policy_loss(x, ref, v, r, tau,
                                                      weights=w))(logp)
        np.testing.assert_allclose(
            g, w * (-(r - v) + tau * (logp - ref)) / w.sum(), rtol=1e-12)
        # Zero-weight rows get no gradient; a NaN there stays out of the loss.
        g = jax.grad(lambda x: losses.dro_loss(x, ref, v, r, tau,
                                               weights=w))(logp)
        assert np.all(np.asarray(g)[w == 0] == 0)
        bad = logp.copy()
        bad[2] = np.nan
        np.testing.assert_allclose(
            losses.dro_loss(bad, ref, v, r, tau, weights=w), want, rtol=1e-12)
        # All weights zero: 0, not NaN.
        assert float(losses.dro_loss(logp, ref, v, r, tau,
                                     weights=np.zeros(B))) == 0.0


# ---------------------------------------------------------------- KTO


def _kto_numpy(logp, ref, kl_logp, kl_ref, desirable, beta, w_d, w_u):
    """KTO as TRL writes it: chosen and rejected losses, concatenated, mean."""
    kl = max(0.0, float(np.mean(kl_logp - kl_ref)))
    d = np.asarray(desirable, bool)
    chosen_lr = logp[d] - ref[d]
    rejected_lr = logp[~d] - ref[~d]
    chosen = 1 - expit(beta * (chosen_lr - kl))
    rejected = 1 - expit(beta * (kl - rejected_lr))
    loss = np.concatenate([w_d * chosen, w_u * rejected]).mean()
    return loss, kl, beta * chosen_lr, beta * rejected_lr


@pytest.mark.parametrize("kl_shift", [+1.5, -1.5])  # mean KL > 0 / < 0
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_kto_matches_published_formula(kl_shift, beta):
    rng = np.random.default_rng(3)
    logp, ref = rng.normal(-20, 3, size=8), rng.normal(-20, 3, size=8)
    kl_ref = rng.normal(-25, 3, size=8)
    kl_logp = kl_ref + kl_shift + 0.1 * rng.normal(size=8)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    w_d, w_u = 1.0, 1.33
    want, kl, r_c, r_r = _kto_numpy(logp, ref, kl_logp, kl_ref, desirable,
                                    beta, w_d, w_u)
    if kl_shift < 0:
        assert kl == 0.0 and np.mean(kl_logp - kl_ref) < 0  # clamp exercised
    loss, m = losses.kto_loss(logp, ref, kl_logp, kl_ref, desirable, beta,
                              w_d, w_u)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], r_c.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], r_r.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], r_c.mean() - r_r.mean(),
                               rtol=1e-5, atol=1e-6)
    assert float(m["num_desirable"]) == 4 and float(m["num_undesirable"]) == 4

    # float mask gives the same
    loss_f, _ = losses.kto_loss(logp, ref, kl_logp, kl_ref,
                                desirable.astype(np.float32), beta, w_d, w_u)
    np.testing.assert_allclose(loss_f, loss, rtol=1e-6)

    # Gradients: none through the KL reference point or ref; the hand-derived
    # one in logp: d/dlr [1 - sig(z)] = -sig(z)(1 - sig(z)) dz/dlr.
    def f(lp, rf, klp, klr):
        return losses.kto_loss(lp, rf, klp, klr, desirable, beta, w_d, w_u)[0]
    with jax.enable_x64(True):  # float64: saturated sigmoids stay exact
        g_lp, g_ref, g_klp, g_klr = jax.grad(f, argnums=(0, 1, 2, 3))(
            logp, ref, kl_logp, kl_ref)
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.asarray(g) == 0)
    lr = logp - ref
    s_c = expit(beta * (lr - kl))
    s_r = expit(beta * (kl - lr))
    want_g = np.where(desirable, -w_d * beta * s_c * (1 - s_c),
                      w_u * beta * s_r * (1 - s_r)) / len(lr)
    np.testing.assert_allclose(g_lp, want_g, rtol=1e-10, atol=1e-15)


def test_kto_fixed_numbers_beta_inside():
    """Hand numbers: beta multiplies (logratio - KL), as in TRL."""
    logp = np.array([-8.0, -12.0])
    ref = np.array([-10.0, -10.0])  # logratios +2, -2
    kl_logp, kl_ref = np.array([-4.0, -6.0]), np.array([-6.0, -6.0])  # KL 1
    sig = lambda z: 1 / (1 + math.exp(-z))
    want = ((1 - sig(0.5 * (2 - 1))) + 1.33 * (1 - sig(0.5 * (1 + 2)))) / 2
    loss, m = losses.kto_loss(logp, ref, kl_logp, kl_ref, np.array([1, 0]),
                              0.5, 1.0, 1.33)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["kl"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], -1.0, rtol=1e-6)


def test_kto_single_class_batch():
    logp, ref = np.array([-3.0, -4.0]), np.array([-3.5, -3.0])
    kl = np.zeros(2)
    for mask in ([1, 1], [0, 0]):
        mask = np.array(mask, bool)
        want = _kto_numpy(logp, ref, kl, kl, mask, 0.3, 1.0, 2.0)[0]
        loss, m = losses.kto_loss(logp, ref, kl, kl, mask, 0.3, 1.0, 2.0)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        assert all(np.isfinite(np.asarray(x)) for x in m.values())


def test_kto_logratio_metric_leaves_weight_zero_rows_out():
    """An evaluation batch padded with weight-0 rows: kto/logratio is the mean over real rows,
    as logratio/mean is."""
    logp, ref = np.array([-3.0, -4.0, -9.0]), np.array([-3.5, -3.0, -1.0])
    _, m = losses.kto_loss(logp, ref, logp, ref, np.array([1, 0, 0], bool), 0.1,
                           weights=np.array([1.0, 1.0, 0.0], np.float32))
    np.testing.assert_allclose(m["logratio"], (0.5 - 1.0) / 2, rtol=1e-6)


# ---------------------------------------------------------------- log-probs


def _naive_token_lp(logits, targets):
    """float64 numpy log-softmax of the (already rounded) logits."""
    lsm = log_softmax(np.asarray(logits, np.float64), axis=-1)
    return np.take_along_axis(lsm, np.asarray(targets)[..., None], -1)[..., 0]


def _lm_batch(b=3, l=10, v=11, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(b, l, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, l))
    weights = (rng.random((b, l)) > 0.3).astype(np.int32)
    return logits, targets, weights


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 10])
def test_sequence_logprob_matches_naive(dtype, chunk_size):
    logits, targets, weights = _lm_batch()
    x = jnp.asarray(logits, dtype)
    want_tok = _naive_token_lp(np.asarray(x.astype(jnp.float32)), targets)
    tok = jax.jit(losses.token_logprobs, static_argnames="chunk_size")(
        x, targets, chunk_size=chunk_size)
    assert tok.shape == targets.shape and tok.dtype == jnp.float32
    np.testing.assert_allclose(tok, want_tok, rtol=1e-5, atol=1e-5)

    seq_fn = jax.jit(losses.sequence_logprob,
                     static_argnames=("chunk_size", "average"))
    seq = seq_fn(x, targets, weights, chunk_size=chunk_size)
    assert seq.shape == (3,) and seq.dtype == jnp.float32
    np.testing.assert_allclose(seq, np.sum(want_tok * (weights > 0), -1),
                               rtol=1e-5, atol=1e-5)
    avg = seq_fn(x, targets, weights, chunk_size=chunk_size, average=True)
    np.testing.assert_allclose(
        avg, np.sum(want_tok * (weights > 0), -1) / (weights > 0).sum(-1),
        rtol=1e-5, atol=1e-5)


def test_sequence_logprob_ignores_masked_positions():
    logits, targets, weights = _lm_batch()
    weights[0] = 0  # an empty row sums (and averages) to 0
    base = losses.sequence_logprob(logits, targets, weights, chunk_size=3)
    # Changing logits and targets at weight-0 positions changes nothing.
    logits2, targets2 = logits.copy(), targets.copy()
    off = weights == 0
    logits2[off] = 1e4 * np.random.default_rng(1).normal(size=logits2[off].shape)
    targets2[off] = 0
    again = losses.sequence_logprob(logits2, targets2, weights, chunk_size=3)
    np.testing.assert_array_equal(base, again)
    assert float(base[0]) == 0.0
    avg = losses.sequence_logprob(logits, targets, weights, average=True)
    assert float(avg[0]) == 0.0


def test_sequence_logprob_gradient_matches_naive():
    logits, targets, weights = _lm_batch(seed=2)
    g_rows = np.random.default_rng(5).normal(size=3).astype(np.float32)

    def naive(x):
        lp = jax.nn.log_softmax(x, axis=-1)
        tok = jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(g_rows * jnp.sum(tok * (weights > 0), -1))

    def chunked(x):
        return jnp.sum(g_rows * losses.sequence_logprob(x, targets, weights,
                                                        chunk_size=3))
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(logits),
                               jax.jit(jax.grad(naive))(logits),
                               rtol=1e-5, atol=1e-6)


def _float32_sizes(jaxpr):
    """Sizes of every float32 value in a jaxpr, nested jaxprs included."""
    sizes = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if getattr(var.aval, "dtype", None) == jnp.float32:
                sizes.append(int(np.prod(var.aval.shape)))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    sizes += _float32_sizes(inner)
    return sizes


def test_chunking_never_builds_full_float32_log_softmax():
    """Forward and backward hold at most one float32 [B, C, V] chunk."""
    b, l, v, c = 2, 12, 9, 3
    logits, targets, weights = _lm_batch(b, l, v)
    x = jnp.asarray(logits, jnp.bfloat16)

    def f(x):
        return jnp.sum(losses.sequence_logprob(x, targets, weights,
                                               chunk_size=c))
    for fn in (f, jax.grad(f)):
        sizes = _float32_sizes(jax.make_jaxpr(fn)(x).jaxpr)
        assert sizes and max(sizes) <= b * c * v, (max(sizes), b * c * v)


# ---------------------------------------------------------------- SFT


def test_sft_loss_matches_numpy_cross_entropy():
    logits, targets, weights = _lm_batch(b=4, seed=4)
    example_mask = np.array([True, False, True, False])
    tok = _naive_token_lp(logits, targets)
    sel = (weights > 0) & example_mask[:, None]
    want = -tok[sel].sum() / sel.sum()

    sft = jax.jit(losses.sft_loss, static_argnames="chunk_size")
    loss, m = sft(logits, targets, weights, example_mask=example_mask,
                  chunk_size=3)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(m["num_tokens"]) == sel.sum()
    assert float(m["num_examples"]) == 2
    loss2, _ = losses.sft_loss_from_token_logprobs(
        losses.token_logprobs(logits, targets), weights, example_mask)
    np.testing.assert_allclose(loss2, want, rtol=1e-5)

    # No mask: every example.
    all_sel = weights > 0
    loss_all, _ = sft(jnp.asarray(logits, jnp.bfloat16), targets, weights)
    want_all = -_naive_token_lp(
        np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
        targets)[all_sel].sum() / all_sel.sum()
    np.testing.assert_allclose(loss_all, want_all, rtol=1e-5)


def test_sft_loss_zero_when_nothing_selected():
    logits, targets, weights = _lm_batch(b=4, seed=4)
    none = np.zeros(4, bool)
    loss, m = losses.sft_loss(logits, targets, weights, example_mask=none)
    assert float(loss) == 0.0 and float(m["num_tokens"]) == 0
    g = jax.jit(jax.grad(lambda x: losses.sft_loss(
        x, targets, weights, example_mask=none)[0]))(logits)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("chunk", [None, 3, 7])
def test_token_logprobs_from_hidden_equals_naive(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(6, 13)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 13, (2, 10)), jnp.int32)

    def naive(h, e):
        logp = jax.nn.log_softmax(h @ e, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

    def chunked(h, e):
        return losses.token_logprobs_from_hidden(h, e, targets, chunk_size=chunk)

    np.testing.assert_allclose(chunked(hidden, emb), naive(hidden, emb), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda h, e: chunked(h, e).sum(), argnums=(0, 1))(hidden, emb)
    g2 = jax.grad(lambda h, e: naive(h, e).sum(), argnums=(0, 1))(hidden, emb)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_token_logprobs_from_hidden_bf16_backward_matmuls_stay_bf16():
    """With bfloat16 hidden states every matmul of the backward takes bfloat16 operands (no
    float32 x bfloat16 pair for XLA to upcast into a float32 GEMM), and the gradients stay
    within bfloat16 rounding of the float32 computation; float16 keeps float32 ones."""
    from dro_jax import flops
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 12, 16)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(16, 40)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, (2, 12)), jnp.int32)
    loss = lambda h, e: losses.token_logprobs_from_hidden(h, e, targets, chunk_size=5).sum()
    grad = jax.grad(loss, argnums=(0, 1))
    dots = flops.find_equations(jax.make_jaxpr(grad)(hidden.astype(jnp.bfloat16), emb),
                                lambda name: name == "dot_general")
    # The chunk loop's body and the 2-step tail, each: forward, its rerun, 2 backward matmuls.
    assert len(dots) == 2 * 4
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    # float16 (which would flush small gradients to zero) keeps float32 backward matmuls.
    dots16 = flops.find_equations(jax.make_jaxpr(grad)(hidden.astype(jnp.float16), emb),
                                  lambda name: name == "dot_general")
    assert sum(all(v.aval.dtype == jnp.float32 for v in e.invars) for e in dots16) == 2 * 2
    g16 = grad(hidden.astype(jnp.bfloat16), emb)
    g32 = grad(hidden, emb)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05)
