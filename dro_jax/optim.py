"""Optimisers and learning-rate schedules, one per network."""
from __future__ import annotations

import dataclasses

import optax

from dro_jax import checks


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One network's optimiser (paper default: Adafactor, decay rate 0.8, lr 1e-4, 150 warm-up steps).

    schedule: 'constant', 'linear_decay' (towards 0: the last step's rate is one step's worth above it)
    or 'cosine', after linear warm-up (the first update's rate is 0 when there is one).
    weight_decay: decoupled, as AdamW's, for every optimiser: each step moves each parameter p by
    -learning_rate(step) * weight_decay * p (so it follows the warm-up), on every parameter.
    update_clipping: Adafactor's clipping of each parameter's update to this RMS before the
    learning rate (t5x's and optax's `clipping_threshold`, 1.0); None turns it off.
    """

    name: str = "adafactor"
    learning_rate: float = 1e-4
    warmup_steps: int = 150
    schedule: str = "constant"
    decay_rate: float = 0.8  # Adafactor's second-moment decay exponent
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    update_clipping: float | None = 1.0

    def __post_init__(self):
        if self.name not in ("adafactor", "adamw", "sgd"):
            raise ValueError(f"OptimizerConfig.name: expected adafactor|adamw|sgd, got {self.name!r}")
        if self.schedule not in ("constant", "linear_decay", "cosine"):
            raise ValueError(f"OptimizerConfig.schedule: expected constant|linear_decay|cosine, got {self.schedule!r}")
        checks.number("OptimizerConfig.learning_rate", self.learning_rate, above=0)
        checks.integer("OptimizerConfig.warmup_steps (WARMUP_STEPS)", self.warmup_steps, at_least=0)
        checks.number("OptimizerConfig.decay_rate", self.decay_rate, above=0)
        for name in ("b1", "b2"):
            checks.number(f"OptimizerConfig.{name}", getattr(self, name), at_least=0, below=1)
        checks.number("OptimizerConfig.weight_decay", self.weight_decay, at_least=0)
        if self.clip_norm is not None:  # None turns clipping off; 0 or less would flip the update
            checks.number("OptimizerConfig.clip_norm (None: no clipping)", self.clip_norm, above=0)
        if self.update_clipping is not None:
            checks.number("OptimizerConfig.update_clipping (None: no clipping)", self.update_clipping, above=0)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    # Not cut to total_steps: a run shorter than its warm-up never reaches the peak rate, and
    # resuming it with more steps continues the same ramp.
    warmup = config.warmup_steps
    rest = max(1, total_steps - warmup)
    if config.schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    elif config.schedule == "linear_decay":
        after = optax.linear_schedule(config.learning_rate, 0.0, rest)
    else:
        after = optax.cosine_decay_schedule(config.learning_rate, rest)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), after], [warmup])


def update_count(opt_state, default=None):
    """The optimiser's own update count (the step its schedule is at): the last `.count` in its
    state; non-finite steps, which the train step does not apply, do not advance it."""
    import jax

    counts = [x for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if jax.tree_util.keystr(p).endswith(".count")]
    return counts[-1] if counts else default


def decoupled_weight_decay(inner: optax.GradientTransformation, rate: float,
                           schedule: optax.Schedule) -> optax.GradientTransformation:
    """`inner`, then -schedule(step) * rate * p added to each update (AdamW's decay). Stateless:
    the step is inner's own update count, so the optimiser state keeps inner's tree (a run
    started before this wrapper existed still restores)."""
    import jax

    def update(updates, state, params):
        step_rate = schedule(update_count(state)) * rate
        updates, state = inner.update(updates, state, params)
        return jax.tree_util.tree_map(lambda u, p: u - step_rate * p, updates, params), state

    return optax.GradientTransformation(inner.init, update)


def _adafactor(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.adafactor(learning_rate=schedule, decay_rate, multiply_by_parameter_scale=False,
    clipping_threshold=update_clipping), built with the update clipping inside the learning-rate
    stage: its state tree is the one runs started without update clipping saved, so they resume.
    multiply_by_parameter_scale=False: the learning rate is absolute, as in the paper. (optax's
    weight_decay_rate would decay by the rate itself, ignoring the learning rate and its warm-up;
    a 0.0 rate keeps the state tree of runs started with optax's decay.)"""
    rate = optax.scale_by_learning_rate(schedule, flip_sign=False)
    if config.update_clipping is not None:
        clip, unclipped = optax.clip_by_block_rms(config.update_clipping), rate  # the clip is stateless

        def clip_then_rate(updates, state, params=None):
            return unclipped.update(clip.update(updates, clip.init(params), params)[0], state, params)

        rate = optax.GradientTransformation(unclipped.init, clip_then_rate)
    parts = [optax.scale_by_factored_rms(decay_rate=config.decay_rate), rate]
    if config.weight_decay:  # a no-op (our decay is decoupled_weight_decay): older runs' state tree
        parts.append(optax.add_decayed_weights(0.0))
    return optax.chain(*parts, optax.scale(-1.0))


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(config, total_steps)
    if config.name == "adafactor":
        opt = _adafactor(config, schedule)
    elif config.name == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    else:  # plain SGD: updates proportional to gradients (used where tests compare runs)
        opt = optax.sgd(schedule)
    if config.weight_decay and config.name != "adamw":
        opt = decoupled_weight_decay(opt, config.weight_decay, schedule)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm is not None else []
    return optax.chain(*parts, opt), schedule
