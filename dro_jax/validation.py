"""Evaluation on a held-out split during training (t5x's train-eval): the model's own loss and
metrics on every example of the split, with no update, every `EvalConfig.period` steps."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Mapping

import jax
import numpy as np

from dro_jax import checks, sharding, train_state


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    period: int | None = None  # EVAL_PERIOD: evaluate every this many steps (and at the end); None: never
    split: str = "validation"

    def __post_init__(self):
        if self.period is not None:
            checks.integer("EVAL_PERIOD (trainer.EvalConfig.period; None: no evaluation)", self.period, at_least=1)
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"trainer.EvalConfig.split must be a split name, got {self.split!r}")


def _pad_rows(batch: dict, rows: int) -> dict:
    """`batch` padded with all-zero rows to `rows`; unpacked rows get a `weights` feature that is 0
    on the padding, so it counts for nothing (packed padding rows have segment weight 0)."""
    n = len(next(iter(batch.values())))
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    if "encoder_segment_ids" not in batch:
        real = np.concatenate([np.ones(n, np.float32), np.zeros(rows - n, np.float32)])
        out["weights"] = real * out["weights"] if "weights" in out else real
    return out


class Evaluator:
    """Builds the split's batches anew at each call and averages the model's metrics over them,
    weighted as the loss is (examples, or tokens for SFT); the std metrics are the split's."""

    def __init__(self, *, model, task_name: str, feature_lengths: Mapping[str, int], batch_size: int,
                 converter, reference: str, mesh, state_sharding, config: EvalConfig):
        import seqio

        from dro_jax.data import tasks as data_tasks

        self.mesh, self.reference, self.period = mesh, reference, config.period
        self.rows = batch_size // jax.process_count()
        provider = seqio.get_mixture_or_task(task_name)
        # Each task of a mixture in full: a mixture's own sampler would stop at its first exhausted task.
        members = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [task_name]

        def dataset():
            """Built again for every evaluation: a resumed run restores its reward statistics after
            this evaluator is made, and a dataset holds the rewards it was built with."""
            parts = [seqio.get_dataset(
                name, task_feature_lengths=dict(feature_lengths), dataset_split=config.split, shuffle=False,
                num_epochs=1, feature_converter=converter, use_cached=False,
                shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()))
                for name in members]
            for part in parts[1:]:
                parts[0] = parts[0].concatenate(part)
            return parts[0].batch(self.rows)

        self._dataset = dataset
        data_tasks.check_mixable(task_name, config.split)
        try:
            probe = dataset()
        except (KeyError, ValueError) as e:
            raise ValueError(f"EVAL_PERIOD is set, but task {task_name} has no usable '{config.split}' split "
                             f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); "
                             "give its log as feedback_log_task.paths={'train': ..., "
                             f"'{config.split}': ...}} or leave EVAL_PERIOD unset") from None
        local = sum(len(b["encoder_input_tokens"]) for b in probe.as_numpy_iterator())
        counts = [local]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = list(np.asarray(multihost_utils.process_allgather(np.array(local))).reshape(-1))
        self.examples = int(sum(counts))
        if not self.examples:
            raise ValueError(f"EVAL_PERIOD is set, but the '{config.split}' split of task {task_name} is empty")
        self.batches = int(-(-max(counts) // self.rows))  # every host runs as many (padded) batches
        spec = probe.element_spec
        self._empty = {k: np.zeros((self.rows,) + tuple(s.shape[1:]), s.dtype.as_numpy_dtype) for k, s in spec.items()}
        needs_log_scores = reference == "precomputed" and "ref_logprobs" in model.reference_keys
        if needs_log_scores and "ref_logprobs" not in spec:
            raise ValueError(f"the run reads the log's ref_logprob, but the '{config.split}' split of task "
                             f"{task_name} has none; score it too (python -m dro_jax.score)")
        if needs_log_scores:
            data_tasks.check_ref_logprob_lengths(task_name, config.split, feature_lengths)
        for task in data_tasks.feedback_tasks(task_name):
            trunc = task.truncation_stats(config.split)
            if trunc is not None:
                print(f"[data] {task.name}/{config.split}: {trunc.examples} examples, {trunc.truncated} truncated "
                      f"to {trunc.sequence_length} (inputs {trunc.inputs_truncated}, targets {trunc.targets_truncated}; "
                      f"evaluated every EVAL_PERIOD={config.period} steps)", flush=True)

        def eval_step(state, batch):
            batch = train_state.with_reference_features(model, state.ref_params, batch)
            loss, metrics = model.loss_fn(state.params, batch, None)
            return train_state._stds_to_second_moments({"loss/total": loss, **metrics})  # pylint: disable=protected-access

        self._step = jax.jit(eval_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                             out_shardings=sharding.replicated(mesh))

    def _host_batches(self):
        it = self._dataset().as_numpy_iterator()
        for _ in range(self.batches):
            batch = next(it, None)
            if batch is None:  # this host's share ran out first: a batch of padding only
                batch = {k: v[:0] for k, v in self._empty.items()}
            if self.reference == "frozen":
                batch.pop("ref_logprobs", None)
            yield _pad_rows(batch, self.rows)

    def __call__(self, state) -> dict[str, float]:
        """The split's metrics under `state` (averaged as the loss averages its batch)."""
        totals: dict[str, float] = {}
        for host_batch in self._host_batches():
            metrics = jax.device_get(self._step(state, sharding.host_batch_to_global(host_batch, self.mesh)))
            n = float(metrics[train_state.LOSS_NORMALIZER])
            for k, v in metrics.items():
                v = float(v)
                totals[k] = totals.get(k, 0.0) + (v if train_state._is_count(k) else v * n)  # pylint: disable=protected-access
        n = totals[train_state.LOSS_NORMALIZER]
        out = {k: v if train_state._is_count(k) else (v / n if n > 0 else 0.0)  # pylint: disable=protected-access
               for k, v in totals.items()}
        out = {k: float(v) for k, v in train_state._second_moments_to_stds(out).items()}  # pylint: disable=protected-access
        out.pop(train_state.LOSS_NORMALIZER, None)
        return out


def log_line(step: int, train_steps: int, metrics: dict[str, float], seconds: float) -> str:
    # the DRO loss itself (what `evaluate --log` reports), not the policy surrogate plus value loss
    keys = [k for k in ("loss/dro", "loss/policy", "loss/value", "loss/kto", "loss/sft", "logratio/mean", "value/mean")
            if k in metrics]
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    return f"[eval] step {step}/{train_steps} {shown} ({int(metrics.get('examples', 0))} examples, {seconds:.1f}s)"


def run(evaluator: Evaluator, state, writer, step: int, train_steps: int) -> dict[str, float]:
    """Evaluates, writes `eval/*` scalars and prints one line; returns the metrics."""
    t0 = time.time()
    metrics = evaluator(state)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    print(log_line(step, train_steps, metrics, time.time() - t0), flush=True, file=sys.stdout)
    return metrics
