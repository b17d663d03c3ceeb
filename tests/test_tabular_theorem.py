"""The tabular theorem (DESIGN section 1) on a random contextual bandit.

Minimising the DRO losses in exact expectation under an off-policy behaviour
policy mu recovers pi* = pi_ref exp(r/tau) / Z and V* = tau log E_ref exp(r/tau),
whatever mu is; with the value pinned at 0 the policy is biased away from pi*.
The losses are those of dro_jax.losses, applied to the flattened
(context, action) table with weights mu(y|x).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp, softmax

from dro_jax import losses

N_CTX, N_ACT = 4, 6
STEPS = 20_000
TAUS = (0.1, 1.0, 5.0)


def _bandit(seed=0, mu_kind="random"):
    """Random bandit: (ref log-probs, rewards, behaviour policy mu), [C, A] each."""
    rng = np.random.default_rng(seed)
    ref_logp = np.log(softmax(rng.normal(size=(N_CTX, N_ACT)), axis=1))
    rewards = rng.normal(size=(N_CTX, N_ACT))
    if mu_kind == "random":
        mu = softmax(1.5 * rng.normal(size=(N_CTX, N_ACT)), axis=1)
    else:  # "skewed": 90% of the mass on the action pi_ref likes least
        mu = np.full((N_CTX, N_ACT), 0.1 / (N_ACT - 1))
        mu[np.arange(N_CTX), np.argmin(ref_logp, axis=1)] = 0.9
    assert np.abs(mu - np.exp(ref_logp)).max() > 0.1  # off-policy
    assert mu.min() > 0  # full support
    return ref_logp, rewards, mu


def _optimum(ref_logp, rewards, tau):
    """Closed form (numpy): pi* [C, A] and V* [C]."""
    logits = ref_logp + rewards / tau
    log_z = logsumexp(logits, axis=1)
    return np.exp(logits - log_z[:, None]), tau * log_z


def _policy_logp(theta):
    """Softmax policy; the last logit of each context is pinned at 0 (gauge)."""
    full = jnp.concatenate([theta, jnp.zeros((N_CTX, 1), theta.dtype)], axis=1)
    return jax.nn.log_softmax(full, axis=1).reshape(-1)


def _make_field(ref_logp, rewards, mu, tau, mode):
    """Gradient field over (theta [C, A-1], values [C]) for one mode.

    "dro_v": policy-loss gradient for theta and value-loss gradient for V (the
    DRO-V updates); "joint": the gradient of dro_loss; "value_zero": the
    policy-loss gradient with V pinned at 0 (the V-gradient is then 0).
    """
    ctx = jnp.repeat(jnp.arange(N_CTX), N_ACT)
    ref, r, w = (jnp.asarray(a).reshape(-1) for a in (ref_logp, rewards, mu))

    def policy(theta, v):
        return losses.dro_policy_loss(_policy_logp(theta), ref, v[ctx], r, tau,
                                      weights=w)

    def value(v, theta):
        return losses.dro_value_loss(v[ctx], _policy_logp(theta), ref, r, tau,
                                     weights=w)

    def joint(theta, v):
        return losses.dro_loss(_policy_logp(theta), ref, v[ctx], r, tau,
                               weights=w)

    def field(params):
        theta, v = params
        if mode == "dro_v":
            return jax.grad(policy)(theta, v), jax.grad(value)(v, theta)
        if mode == "joint":
            return jax.grad(joint, argnums=(0, 1))(theta, v)
        if mode == "value_zero":
            return jax.grad(policy)(theta, jnp.zeros_like(v)), jnp.zeros_like(v)
        raise ValueError(mode)

    return field


def _solve(field):
    """Adam (cosine-decayed) on the field, in one jitted loop; float64."""
    opt = optax.adam(optax.cosine_decay_schedule(0.1, STEPS, alpha=1e-3))

    @jax.jit
    def run(params):
        def body(_, carry):
            p, state = carry
            updates, state = opt.update(field(p), state, p)
            return optax.apply_updates(p, updates), state
        return jax.lax.fori_loop(0, STEPS, body, (params, opt.init(params)))[0]

    params = run((jnp.zeros((N_CTX, N_ACT - 1)), jnp.zeros(N_CTX)))
    grad_norm = max(float(jnp.abs(g).max()) for g in field(params))
    pi = np.exp(np.asarray(_policy_logp(params[0]))).reshape(N_CTX, N_ACT)
    return pi, np.asarray(params[1]), grad_norm


@pytest.mark.parametrize("mode, mu_kind",
                         [("dro_v", "random"), ("dro_v", "skewed"),
                          ("joint", "random")])
@pytest.mark.parametrize("tau", TAUS)
def test_dro_recovers_optimum_off_policy(tau, mode, mu_kind):
    with jax.enable_x64(True):
        ref_logp, rewards, mu = _bandit(mu_kind=mu_kind)
        pi_star, v_star = _optimum(ref_logp, rewards, tau)
        pi, v, grad_norm = _solve(_make_field(ref_logp, rewards, mu, tau, mode))
    assert grad_norm < 1e-8  # at a stationary point
    np.testing.assert_allclose(pi, pi_star, atol=1e-3, rtol=0)
    np.testing.assert_allclose(v, v_star, atol=1e-3, rtol=0)
    # Stronger: the log-probs too, so tiny probabilities are also right.
    np.testing.assert_allclose(np.log(pi), np.log(pi_star), atol=1e-3, rtol=0)


@pytest.mark.parametrize("tau", TAUS)
def test_value_pinned_at_zero_is_biased(tau):
    with jax.enable_x64(True):
        ref_logp, rewards, mu = _bandit()
        pi_star, _ = _optimum(ref_logp, rewards, tau)
        pi, _, grad_norm = _solve(
            _make_field(ref_logp, rewards, mu, tau, "value_zero"))
    assert grad_norm < 1e-8  # converged, so the gap is bias, not optimisation
    assert np.abs(pi - pi_star).max() > 1e-2
