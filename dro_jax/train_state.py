"""Train state, the pure train step, and the shardings of both."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dro_jax import optim, sharding

PyTree = Any
NETWORKS = ("policy", "value")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree  # {'policy': ..., 'value': ...}
    opt_state: PyTree  # {'policy': ..., 'value': ...}
    ref_params: PyTree  # frozen reference policy, or {} when log-probs are precomputed
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


def init_state(params: PyTree, txs: dict[str, optax.GradientTransformation], ref_params: PyTree) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state={k: txs[k].init(params[k]) for k in NETWORKS},
        ref_params=ref_params,
        nonfinite_in_a_row=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def reference_params(policy_params: PyTree, config) -> PyTree:
    """The frozen reference's copy of the policy params, matmul weights stored in the compute dtype.

    The network casts every kernel (and an untied embedding) to the compute dtype before
    use, so the reference's log-probs are bit-identical, and in bfloat16 the copy takes half
    the memory. Norm scales, the position-bias table and a tied embedding (scaled in float32
    before the cast) stay float32.
    """
    dtype = config.compute_dtype
    cast = {"kernel"} | (set() if config.tie_word_embeddings else {"embedding"})

    def copy(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else None
        return x.astype(dtype) if name in cast else jnp.copy(x)
    return jax.tree_util.tree_map_with_path(copy, policy_params)


def tree_is_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


LOSS_NORMALIZER = "loss_normalizer"  # loss_fn metric: the denominator of its batch mean


def _is_count(key: str) -> bool:
    """Metrics that are counts: summed over microbatches, not averaged."""
    return key in ("examples", LOSS_NORMALIZER) or "num_" in key


# A "NAME/std" metric (with its "NAME/mean") is accumulated over microbatches as the weighted
# second moment, so the step reports the std of the whole batch, not a mean of per-part stds.
def _std_keys(metrics: dict) -> list[str]:
    return [k for k in metrics if k.endswith("/std") and k[:-len("std")] + "mean" in metrics]


def _stds_to_second_moments(metrics: dict) -> dict:
    out = dict(metrics)
    for k in _std_keys(metrics):
        out[k] = jnp.square(metrics[k]) + jnp.square(metrics[k[:-len("std")] + "mean"])
    return out


def _second_moments_to_stds(metrics: dict) -> dict:
    out = dict(metrics)
    for k in _std_keys(metrics):
        mean = metrics[k[:-len("std")] + "mean"]
        out[k] = jnp.sqrt(jnp.maximum(metrics[k] - jnp.square(mean), 0.0))
    return out


def _split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...

    Strided, not contiguous: each device holds a contiguous block of the data-sharded
    batch, so every microbatch keeps rows on every device and nothing moves between them.
    """
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={n}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def _zero_relpos_updates(updates):
    """Zero updates for the relative-position bias tables (T5Config.freeze_relative_attention_bias)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, u: jnp.zeros_like(u) if "relpos_bias" in _keypath(path) else u, updates)


def with_reference_features(model, ref_params, batch: dict) -> dict:
    """`batch` with the reference features it lacks, scored with the frozen reference params."""
    missing = [k for k in model.reference_keys if k not in batch]
    if not missing:
        return batch
    feats = model.reference_features(ref_params, batch)
    return {**batch, **{k: feats[k] for k in missing}}


def make_train_step(model, txs: dict[str, optax.GradientTransformation],
                    schedules: dict[str, optax.Schedule], *, seed: int = 0, microbatches: int = 1,
                    dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the pure `train_step(state, batch) -> (state, metrics)`.

    A step whose loss, gradients or rewards are not finite leaves parameters and
    optimiser state untouched and is counted instead.
    """

    frozen_bias = bool(getattr(model.config, "freeze_relative_attention_bias", False))

    def loss_and_grads(params, ref_params, batch, rng):
        batch = with_reference_features(model, ref_params, batch)
        grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(params, batch, rng if dropout else None)
        return loss, metrics, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if microbatches == 1:
            loss, metrics, grads = loss_and_grads(state.params, state.ref_params, batch, rng)
        else:
            micro = _split_microbatches(batch, microbatches)

            # Each microbatch's mean is weighted by its own denominator (examples, or tokens
            # for SFT), so the result equals the full-batch mean even when they differ.
            def body(carry, xs):
                i, mb = xs
                l, m, g = loss_and_grads(state.params, state.ref_params, mb, jax.random.fold_in(rng, i))
                m = _stds_to_second_moments(m)
                n = m[LOSS_NORMALIZER]
                scaled = (l * n, {k: v if _is_count(k) else v * n for k, v in m.items()},
                          jax.tree_util.tree_map(lambda x: x * n, g))
                return jax.tree_util.tree_map(jnp.add, carry, scaled), None

            zero = jax.tree_util.tree_map(
                jnp.zeros_like, jax.eval_shape(loss_and_grads, state.params, state.ref_params,
                                               jax.tree_util.tree_map(lambda x: x[0], micro), rng))
            (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(microbatches), micro))
            total = metrics[LOSS_NORMALIZER]
            div = lambda x: jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)
            loss, grads = div(loss), jax.tree_util.tree_map(div, grads)
            metrics = _second_moments_to_stds({k: v if _is_count(k) else div(v) for k, v in metrics.items()})

        finite = jnp.isfinite(loss) & tree_is_finite(grads) & jnp.all(jnp.isfinite(batch["rewards"]))
        new_params, new_opt = {}, {}
        for k in NETWORKS:
            updates, opt = txs[k].update(grads[k], state.opt_state[k], state.params[k])
            if frozen_bias:  # zero gradients, but weight decay would still move them
                updates = _zero_relpos_updates(updates)
            new_params[k] = optax.apply_updates(state.params[k], updates)
            new_opt[k] = opt
        finite = finite & tree_is_finite((new_params, new_opt))  # e.g. an optimiser overflow
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = dict(metrics)
        metrics.pop(LOSS_NORMALIZER, None)
        metrics["loss/total"] = loss
        metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
        for k in NETWORKS:
            if not jax.tree_util.tree_leaves(grads[k]):
                continue  # no such network (KTO and SFT train no value network)
            metrics[f"grad_norm/{k}"] = optax.global_norm(grads[k])
            # the rate the optimiser used: its own count skips non-finite steps
            metrics[f"learning_rate/{k}"] = schedules[k](optim.update_count(state.opt_state[k], state.step))
        metrics["tokens"] = ((batch["encoder_input_tokens"] > 0).sum()
                             + (batch["decoder_loss_weights"] > 0).sum()).astype(jnp.float32)
        # for perf/examples_per_sec: a packed row holds several examples (segments 1..k)
        metrics["sequences"] = (batch["decoder_segment_ids"].max(axis=1).sum() if "decoder_segment_ids" in batch
                                else batch["encoder_input_tokens"].shape[0]) * jnp.float32(1)
        return new_state, metrics

    return train_step


# ---- shardings ----------------------------------------------------------------------

def _keypath(path) -> tuple:
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(getattr(p, attr))
                break
    return tuple(out)


def _removed_axis(param_shape: tuple, leaf_shape: tuple, name) -> int | None:
    """The axis of `param_shape` that a factored statistic of `leaf_shape` reduced, or None.
    Adafactor (optax) factors the two largest axes: v_row drops the largest, v_col the second;
    the name decides when both give the same shape (a square kernel)."""
    if len(param_shape) < 2 or len(leaf_shape) != len(param_shape) - 1:
        return None
    second, largest = (int(i) for i in np.argsort(param_shape)[-2:])  # as optax orders them
    preferred = {"v_row": largest, "v_col": second}.get(name)
    candidates = [i for i in range(len(param_shape)) if param_shape[:i] + param_shape[i + 1:] == leaf_shape]
    if preferred in candidates:
        return preferred
    return candidates[0] if candidates else None


def optimizer_state_specs(abstract_opt_state: PyTree, param_shapes: PyTree, param_specs: PyTree) -> PyTree:
    """Mesh PartitionSpecs for an optimiser state, derived from its parameters'.

    Each state leaf is matched to the parameter whose key path it ends with. Leaves
    of the parameter's shape take its spec; Adafactor's factored row/column
    statistics take the spec with the reduced axis removed; others are replicated.
    """
    shapes = {_keypath(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(param_shapes)}
    specs = {_keypath(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, P))}

    def spec_for(path, leaf):
        kp = _keypath(path)
        for start in range(len(kp)):
            suffix = kp[start:]
            if suffix in shapes:
                pshape, pspec = shapes[suffix], tuple(specs[suffix]) + (None,) * (len(shapes[suffix]) - len(specs[suffix]))
                if leaf.shape == pshape:
                    return P(*pspec)
                removed = _removed_axis(pshape, tuple(leaf.shape), kp[start - 1] if start else None)
                if removed is not None:
                    return P(*(pspec[:removed] + pspec[removed + 1:]))
                return P()
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, abstract_opt_state)


def state_shardings(abstract_state: TrainState, boxed_params: PyTree, mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf of the train state, from the logical axis rules."""
    sharding.check_divisible(boxed_params, mesh, rules)
    param_specs = sharding.mesh_partition_specs(boxed_params, rules)
    to_sharding = lambda spec: NamedSharding(mesh, spec)
    is_spec = lambda x: isinstance(x, P)
    params_sh = jax.tree_util.tree_map(to_sharding, param_specs, is_leaf=is_spec)
    opt_specs = {k: optimizer_state_specs(abstract_state.opt_state[k], abstract_state.params[k], param_specs[k])
                 for k in NETWORKS}
    opt_sh = jax.tree_util.tree_map(to_sharding, opt_specs, is_leaf=is_spec)
    ref_sh = params_sh["policy"] if jax.tree_util.tree_leaves(abstract_state.ref_params) else {}
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh, ref_params=ref_sh,
                      nonfinite_in_a_row=rep, nonfinite_total=rep)


def jit_train_step(train_step, state_sharding: TrainState, mesh: Mesh):
    return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def abstract_state_and_shardings(model, txs, input_shapes, mesh: Mesh, rules, *, seed: int = 0,
                                 with_ref: bool = False):
    """(abstract boxed params, abstract TrainState, TrainState of NamedShardings), nothing materialised."""
    init_boxed = lambda rng: model.get_initial_variables(rng, input_shapes)["params"]
    with sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(seed))
    # Plain unwrapping: nn.meta.unbox under a mesh adds sharding constraints, which abstract
    # values outside jit cannot take.
    params = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                    boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    abstract = jax.eval_shape(
        lambda p: init_state(p, txs, reference_params(p["policy"], model.config) if with_ref else {}), params)
    return boxed, abstract, state_shardings(abstract, boxed, mesh, rules)


def _put_sharded(x, target: NamedSharding):
    if isinstance(x, np.ndarray):
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])
    return jax.device_put(x, target)


def create_state(model, txs, input_shapes, mesh: Mesh, rules, *, seed: int = 0, with_ref: bool = False,
                 params_override: Callable[[PyTree], PyTree] | None = None) -> tuple[TrainState, TrainState]:
    """Initialises a TrainState directly into its shardings. Returns (state, shardings).

    params_override: maps the freshly initialised params to the ones to use (e.g. a checkpoint's).
    """
    _, _, state_sh = abstract_state_and_shardings(model, txs, input_shapes, mesh, rules, seed=seed,
                                                  with_ref=with_ref)
    with sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda r: nn.meta.unbox(model.get_initial_variables(r, input_shapes)["params"]))(
            jax.random.PRNGKey(seed))
        if params_override is not None:
            # A checkpoint's arrays come as host arrays: each device takes only its own shard
            # (a T5-XXL would not fit whole on one device), and no host compares its copy with
            # the others' (device_put would, leaf by leaf, on a multi-host mesh).
            params = jax.tree_util.tree_map(_put_sharded, params_override(params), state_sh.params)
        make = lambda p: init_state(p, txs, reference_params(p["policy"], model.config) if with_ref else {})
        state = jax.jit(make, out_shardings=state_sh)(params)
    return state, state_sh
