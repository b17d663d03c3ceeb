"""The training loop: data, sharded state, checkpoints, metrics, preemption."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dro_jax import checks, checkpoints, io_utils, models, optim, sharding, train_state, validation
from dro_jax.validation import EvalConfig  # gin: trainer.EvalConfig

log = logging.getLogger("dro_jax")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


class ConfigError(ValueError):
    """A configuration or input that cannot work; the message is one line for the user."""


def _check_task_name(task_name: str) -> None:
    """A task or mixture seqio knows (its own error names neither the macro nor what is there)."""
    import difflib

    import seqio

    names = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    if task_name not in names:
        close = difflib.get_close_matches(task_name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            "; a gin file registers tasks by importing the module that adds them, e.g. `import my_tasks`")
        raise ConfigError(f"MIXTURE_OR_TASK_NAME={task_name!r}: no seqio task or mixture of that name is "
                          f"registered{hint}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every_steps: int = 1000
    keep: int | None = 3  # the newest checkpoints kept; None keeps all
    async_save: bool = True

    def __post_init__(self):
        if self.keep is not None:
            checks.integer("CheckpointConfig.keep (None keeps all)", self.keep, at_least=1)
        checks.boolean("CheckpointConfig.async_save", self.async_save)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How batches are drawn from the seqio task."""

    split: str = "train"
    shuffle: bool = True
    seed: int = 0
    pack: bool = False
    max_segments: int = 8  # packed rows hold at most this many examples
    carry_weights: bool = False  # feed per-record `weight`s to the loss (absent ones weigh 1)

    def __post_init__(self):
        for name in ("shuffle", "pack", "carry_weights"):
            checks.boolean(f"DataConfig.{name}", getattr(self, name))
        checks.integer("DataConfig.seed (SEED)", self.seed)
        checks.integer("DataConfig.max_segments", self.max_segments, at_least=1)


def _feature_converter(data: DataConfig):
    from dro_jax.data import converters

    kw = dict(carry_weights=data.carry_weights)
    if data.pack:
        return converters.PackedDROFeatureConverter(max_segments=data.max_segments, **kw)
    return converters.DROFeatureConverter(pack=False, **kw)


def make_dataset(task_name: str, feature_lengths: Mapping[str, int], global_batch_size: int,
                 data: DataConfig, *, skip_batches: int = 0):
    """Infinite iterator of this host's numpy batches, positioned after `skip_batches` batches."""
    import seqio

    from dro_jax.data import tasks as data_tasks

    n_hosts = jax.process_count()
    if global_batch_size % n_hosts:
        raise ConfigError(f"BATCH_SIZE={global_batch_size} is not divisible by {n_hosts} processes")
    data_tasks.check_mixable(task_name, data.split)
    for task in data_tasks.feedback_tasks(task_name):  # each host draws from its own share
        n = task.source.load(data.split).num_examples
        if n < n_hosts:
            raise ConfigError(f"task {task.name}: its '{data.split}' log has {n} records, fewer than the "
                              f"{n_hosts} processes that each read a share of it")
    ds = seqio.get_dataset(
        task_name, task_feature_lengths=dict(feature_lengths), dataset_split=data.split,
        shuffle=data.shuffle, num_epochs=None, feature_converter=_feature_converter(data),
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=n_hosts),
        seed=data.seed, use_cached=False)
    ds = ds.batch(global_batch_size // n_hosts, drop_remainder=True)
    batches = ds.prefetch(2).as_numpy_iterator()
    if skip_batches:  # exact resume: same order as an uninterrupted run
        _skip_batches(batches, skip_batches)
    return batches


SKIP_PROGRESS_EVERY_S = 10.0


def _skip_batches(batches, n: int) -> None:
    """Reads and drops the first `n` batches (resuming late in a long run reads the log up to
    there again: minutes), with progress and an ETA when it takes a while."""
    t0 = last = time.time()
    for i in range(1, n + 1):
        next(batches)
        now = time.time()
        if now - last >= SKIP_PROGRESS_EVERY_S and i < n:
            last = now
            print(f"[data] resuming: read {i}/{n} batches to reach the checkpoint's position "
                  f"({100.0 * i / n:.0f}%), ETA {_format_eta((n - i) * (now - t0) / i)}", flush=True)
    if time.time() - t0 >= SKIP_PROGRESS_EVERY_S:
        print(f"[data] resuming: read {n} batches in {_format_eta(time.time() - t0)}", flush=True)


def task_vocabulary(task_name: str) -> str | None:
    """'byte' or the spiece.model path of a seqio task's target vocabulary (for checkpoints)."""
    import seqio

    vocab = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    if isinstance(vocab, seqio.ByteVocabulary):
        return checkpoints.BYTE_VOCABULARY
    return getattr(vocab, "sentencepiece_model_file", None)


def _check_task_vocabulary(task_name: str, model_vocab_size: int) -> None:
    import seqio

    from dro_jax.data import tasks as data_tasks

    features = seqio.get_mixture_or_task(task_name).output_features
    for name in ("inputs", "targets"):
        if name in features:
            data_tasks.check_vocabulary_fits(features[name].vocabulary, model_vocab_size,
                                             f"task {task_name} ({name})")


def _training_rewards(task_name: str, split: str, first_batch: np.ndarray,
                      carry_weights: bool = False) -> tuple[np.ndarray, str]:
    """The final (mapped, standardised) rewards of the whole training log when the task reads
    feedback logs (with carried weights, of its records of weight > 0: the others train nothing),
    else those of the first batch; and what they are, for messages."""
    from dro_jax.data import tasks as data_tasks

    members = data_tasks.feedback_tasks(task_name)
    if not members:
        return np.asarray(first_batch).reshape(-1), "of the first batch"
    parts = []
    for task in members:
        data = task.source.load(split)
        keep = data.weights > 0 if carry_weights else slice(None)
        parts.append(np.asarray(data.rewards)[keep])
    what = "of the training log's records of weight > 0" if carry_weights else "of the training log"
    return np.concatenate(parts), what


def _check_weights(task_name: str, data: DataConfig) -> None:
    """Per-record weights reach the loss only with carry_weights=True: says when a log's are
    ignored, and refuses to carry weights that no log gives (a forgotten field or another log)."""
    from dro_jax.data import tasks as data_tasks

    members = data_tasks.feedback_tasks(task_name)
    weighted = [t.name for t in members if t.source.load(data.split).has_weights]
    if data.carry_weights and members and not weighted:
        files = [t.source.split_paths[data.split] for t in members]
        raise ConfigError(f"trainer.DataConfig.carry_weights=True, but no record of the '{data.split}' log of "
                          f"{task_name} ({', '.join(map(str, files))}) has a `weight`")
    if weighted and not data.carry_weights:
        log.warning("the log of task %s gives per-record weights, but they are ignored: every example weighs 1 "
                    "(set trainer.DataConfig.carry_weights=True to use them)", weighted[0])


def _check_one_sided(model, rewards: np.ndarray, what: str) -> None:
    """KTO's 'sign' rule and filtered SFT's threshold assume rewards on both sides of it (thumbs,
    or standardised scores): raw 1-10 scores make every example desirable, and an all-thumbs-up
    log standardises to all 0, below it. Filtered SFT with nothing above it cannot train."""
    from dro_jax import models

    if isinstance(model, models.KTOModel) and model.desirable == "sign":
        threshold, name = 0.0, "KTOModel's threshold 0"
        fixes = {"above": "set models.KTOModel.desirable='batch_mean' (the DRO paper's rule) or standardise raw scores",
                 "at or below": "set models.KTOModel.desirable='batch_mean'; a log of only thumbs up standardises "
                                "to all 0, so do not standardise it"}
    elif isinstance(model, models.FilteredSFTModel):
        threshold, name = model.min_reward, f"MIN_REWARD={model.min_reward:g}"
        fixes = {"above": "raise MIN_REWARD (models.FilteredSFTModel.min_reward) or standardise raw scores",
                 "at or below": "lower MIN_REWARD (models.FilteredSFTModel.min_reward); a log of only thumbs up "
                                "standardises to all 0, so do not standardise it"}
    else:
        return
    if rewards.size and isinstance(model, models.FilteredSFTModel) and not np.any(rewards > threshold) \
            and what.startswith("of the training log"):  # a first batch alone may be unlucky
        raise ConfigError(f"filtered SFT has nothing to train on: no reward {what} ({rewards.size}, from "
                          f"{rewards.min():.3g} to {rewards.max():.3g}) is above {name}; {fixes['at or below']}")
    if rewards.size > 1 and (np.all(rewards > threshold) or np.all(rewards <= threshold)):
        side = "above" if rewards[0] > threshold else "at or below"
        log.warning("every reward %s (%d, from %.3g to %.3g) is %s %s; %s",
                    what, rewards.size, rewards.min(), rewards.max(), side, name, fixes[side])


def _check_reward_scale(model, rewards: np.ndarray, what: str) -> None:
    """DRO-V takes rewards as they are, but tau weighs the KL against their scale and the value
    network starts at 0: raw scores (1-10) are far from the paper's standardised rewards."""
    if not isinstance(model, models.DROModel) or rewards.size < 2:
        return
    mean, std = float(np.mean(rewards)), float(np.std(rewards))
    if abs(mean) > 3 or std > 3:
        log.warning("the rewards %s have mean %.3g and std %.3g; the paper standardises them to mean 0 and "
                    "variance 1 (feedback.feedback_log_task(standardize=True)), and TAU=%g is relative to their "
                    "scale", what, mean, std, model.tau)


def _reference_description(reference: str, frozen_copy: bool) -> str:
    if reference == "frozen":
        return "a frozen copy of the initial policy, scored in every step"
    if frozen_copy:  # KTO: the log's scores, and a frozen copy for the mismatched (KL) pairs
        return "the log's precomputed ref_logprob, and a frozen copy of the initial policy for the KL pairs"
    return "the log's precomputed ref_logprob (no reference forward pass)"


def _check_warmup(model, optimizers: dict, train_steps: int) -> None:
    """A warm-up as long as the run never reaches the peak rate (nor decays): say so at the start."""
    short = [(k, cfg) for k, cfg in optimizers.items()
             if cfg.warmup_steps >= train_steps and (k == "policy" or model.value_kind != "none")]
    for k, cfg in short:
        log.warning("WARMUP_STEPS=%d is not shorter than TRAIN_STEPS=%d: the %s learning rate reaches only %.0f%% "
                    "of its peak (%g), at the last step%s", cfg.warmup_steps, train_steps, k,
                    100.0 * (train_steps - 1) / cfg.warmup_steps, cfg.learning_rate,
                    "" if cfg.schedule == "constant" else f", and its {cfg.schedule} never starts")


def _check_initial_vocabulary(path: str, theirs: str | None, ours: str | None) -> None:
    """The checkpoint must read the task's token ids (same size is not enough: byte ids and a
    SentencePiece model's differ). Unknown on either side (None): nothing to compare."""
    if theirs is None or ours is None:
        return
    byte = checkpoints.BYTE_VOCABULARY
    if theirs == byte and ours == byte:
        return
    if byte not in (theirs, ours):
        import filecmp

        if filecmp.cmp(theirs, ours, shallow=False):
            return
    name = lambda v: "the byte vocabulary" if v == byte else f"SentencePiece model {v}"
    raise ConfigError(f"INITIAL_CHECKPOINT_PATH={path} was trained with {name(theirs)}, but the task reads "
                      f"{name(ours)}; set the task's vocabulary (e.g. feedback.feedback_log_task.vocabulary) "
                      "to the checkpoint's")


def _load_initial(path: str, model, params: dict, task_vocabulary_path: str | None = None) -> dict:
    """Replaces initial params by a checkpoint's (dro_jax or HF), checking every shape."""
    from dro_jax import network

    ckpt = checkpoints.load_model_checkpoint(path)
    _check_initial_vocabulary(path, ckpt.vocabulary_path, task_vocabulary_path)
    # free to differ (a scanned or unrolled checkpoint is converted to the model's layout)
    runtime_fields = network.T5Config.RUNTIME_FIELDS
    ours, theirs = model.config.to_dict(), ckpt.config.to_dict()
    for field in sorted(set(ours) - runtime_fields):
        if ours[field] != theirs.get(field):
            raise ConfigError(f"INITIAL_CHECKPOINT_PATH={path}: network.T5Config.{field} is {ours[field]!r} "
                                f"but the checkpoint has {theirs.get(field)!r}; include the matching model gin file")

    def check(name, ours, theirs):
        ok_struct = jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
        if not ok_struct:
            raise ConfigError(f"INITIAL_CHECKPOINT_PATH={path}: {name} parameter tree does not match the "
                                "configured model (different architecture?)")
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
            if tuple(a.shape) != tuple(np.shape(b)):
                raise ConfigError(f"INITIAL_CHECKPOINT_PATH={path}: {name} parameter "
                                    f"{jax.tree_util.keystr(p)} has shape {np.shape(b)}, model expects {a.shape}")
            b = np.asarray(b)
            bad = b.size - np.count_nonzero(np.isfinite(b)) if jnp.issubdtype(b.dtype, jnp.inexact) else 0
            if bad:  # else every step would be skipped as non-finite
                raise ConfigError(f"INITIAL_CHECKPOINT_PATH={path}: {name} parameter {jax.tree_util.keystr(p)} "
                                  f"holds {bad} non-finite values (NaN or inf)")
        return jax.tree_util.tree_map(lambda b: np.asarray(b, np.float32), theirs)  # on the host until sharded

    out = dict(params)
    out["policy"] = check("policy", params["policy"],
                          network.match_layer_layout(ckpt.params, params["policy"]))
    theirs_value = ckpt.value_params if ckpt.value_params is not None else {}
    ours_kind = getattr(model, "value_kind", "none")
    if jax.tree_util.tree_leaves(theirs_value) and jax.tree_util.tree_leaves(params["value"]):
        theirs_kind = models.value_kind_of(theirs_value)
        if theirs_kind in (None, ours_kind):  # the same kind must fit, shape for shape
            out["value"] = check("value", params["value"],
                                 network.match_layer_layout(theirs_value, params["value"]))
            return out
        # e.g. a 'separate' DRO-V run continued as value_kind='shared': the policy still fits
        log.warning("INITIAL_CHECKPOINT_PATH=%s: its value network is value_kind=%r, this model's is %r; "
                    "the value network starts fresh%s", path, theirs_kind, ours_kind,
                    " from the policy" if ours_kind == "separate" else "")
    if ours_kind == "separate":
        out["value"] = network.init_value_from_policy(params["value"], out["policy"])
    return out


REWARD_STATS_FILE = "reward_stats.json"


def _reward_stats_files(model_dir: str, task_name: str) -> list:
    """(feedback-log task, the file its reward statistics are stored in) for the run's task, or
    for each feedback-log task of a mixture (one file each: each task standardises its own log)."""
    import seqio

    from dro_jax.data import tasks

    mixture = isinstance(seqio.get_mixture_or_task(task_name), seqio.Mixture)
    return [(t, os.path.join(model_dir, f"reward_stats.{t.name}.json" if mixture else REWARD_STATS_FILE))
            for t in tasks.feedback_tasks(task_name)]


def _restore_reward_stats(model_dir: str, task_name: str) -> None:
    """On resume, standardise rewards with the statistics the run started with (only then: a
    fresh start computes its own, whatever an earlier attempt in MODEL_DIR left there)."""
    from dro_jax.data import rewards

    meta_path = os.path.join(model_dir, checkpoints.MODEL_JSON)
    older = os.path.isfile(meta_path) and "objective" not in checkpoints.read_model_json(model_dir)  # before 2026-11-28
    for task, path in _reward_stats_files(model_dir, task_name):
        standardises = bool(task.source.reward_mapping.standardize)
        if older and standardises and not os.path.isfile(path) and os.path.basename(path) != REWARD_STATS_FILE:
            # Such runs stored no statistics for a mixture's tasks: they came from each log as it was.
            log.warning("%s is missing (this run is older than per-task statistics): standardising task %s "
                        "with its log's statistics as they are now, and storing them", path, task.name)
            continue
        if standardises != os.path.isfile(path):
            # A fresh start writes the file exactly when it standardises; a switch would change the
            # rewards, and so the objective, in the middle of the run.
            raise ConfigError(f"MODEL_DIR={model_dir} was started {'without' if standardises else 'with'} reward "
                              f"standardisation ({path} {'is missing' if standardises else 'exists'}), but task "
                              f"{task.name} {'standardises' if standardises else 'does not'}; resume with the "
                              "run's own reward mapping or start a new MODEL_DIR")
        if standardises:
            task.source.set_reward_stats(rewards.RewardStats.load(path))


def _objective_metadata(model, task_name: str) -> dict:
    """What `evaluate` needs to compute the run's own objective on a held-out log: tau, the
    log-prob normalisation and the thumbs-to-reward mapping (None when the tasks' mappings differ)."""
    from dro_jax.data import tasks

    objective = {"logprob_normalization": model.logprob_normalization}
    if isinstance(model, models.DROModel):
        objective.update(tau=model.tau, value_kind=model.value_kind)
    if isinstance(model, models.KTOModel):
        objective.update(beta=model.beta, desirable=model.desirable)
    if isinstance(model, models.FilteredSFTModel):
        objective["min_reward"] = model.min_reward
    mappings = {tuple(sorted(dataclasses.asdict(t.source.reward_mapping).items()))
                for t in tasks.feedback_tasks(task_name)}
    return {"objective": objective, "reward_mapping": dict(mappings.pop()) if len(mappings) == 1 else None}


def _report_data(model_dir: str, task_name: str, split: str, *, fresh: bool) -> None:
    """Stores reward statistics with the run (a fresh start replaces any left by an earlier
    attempt) and reports truncation (never silent), for each feedback-log task."""
    for task, path in _reward_stats_files(model_dir, task_name):
        stats = task.source.reward_stats
        if stats is not None and task.source.reward_mapping.standardize and (fresh or not os.path.isfile(path)) \
                and jax.process_index() == 0:
            stats.save(path)
        trunc = task.truncation_stats(split)
        if trunc is not None:
            print(f"[data] {task.name}/{split}: {trunc.examples} examples, {trunc.truncated} truncated to "
                  f"{trunc.sequence_length} (inputs {trunc.inputs_truncated}, targets {trunc.targets_truncated})",
                  flush=True)


class _Preemption:
    """Turns SIGTERM (preemption) and a first Ctrl-C into a flag the loop checks between steps: the
    run saves and exits. A second Ctrl-C stops at once, losing the steps since the last save.
    (`train` hands a SIGTERM on to a handler of the caller's own once the save is written.)"""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # a background job of a script ignores the terminal's Ctrl-C on purpose
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("[train] Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again stops now, "
                  "losing the steps since the last save)", file=sys.stderr, flush=True)
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# One jitted program. Run eagerly, each leaf's reduction over a sharded array is its own
# program with an all-reduce; on CPU meshes those independent collectives can deadlock
# (XLA's "Termination timeout ... all reduce" abort, seen in CI with 2 fake devices).
_state_is_finite = jax.jit(lambda params, opt_state: train_state.tree_is_finite((params, opt_state)))


@contextlib.contextmanager
def _model_dir_lock(model_dir: str):
    """Process 0 locks MODEL_DIR for the run; if it is in use, every host stops (together,
    before any collective)."""
    with contextlib.ExitStack() as stack:
        in_use = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(io_utils.exclusive_dir_lock(model_dir, "MODEL_DIR"))
            except io_utils.DirectoryInUse as e:
                in_use = str(e)
            except OSError as e:  # e.g. a full disk while writing the holder's note
                in_use = f"MODEL_DIR={model_dir}: cannot take the lock ({e.strerror or e})"
        if _all_hosts_agree(in_use is not None):
            raise ConfigError(in_use or f"MODEL_DIR={model_dir}: process 0 could not lock it (see its error)")
        yield


def _all_hosts_agree(flag: bool) -> bool:
    """True on every host when any host saw the flag (SIGTERM arrives at different times;
    hosts must take the same path around collectives)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class _LaggedAgreement:
    """`_all_hosts_agree` for the step loop without a host-device sync in every step: each poll
    starts a max over all devices of this step's flags and returns the previous poll's result,
    which is ready once the step before the one in flight has run (so a signal takes one step
    longer to act on). Every host reads the same result, so all take the same path."""

    def __init__(self, mesh, multi_host: bool | None = None):
        self.multi_host = jax.process_count() > 1 if multi_host is None else multi_host
        self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
        self._local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self._size = mesh.size
        self._max = jax.jit(lambda x: x.max(), out_shardings=sharding.replicated(mesh))
        self._pending = None

    def poll(self, flag: bool) -> bool:
        if not self.multi_host:
            return flag
        previous = self._pending
        local = np.full((self._local,), int(flag), np.int32)
        self._pending = self._max(jax.make_array_from_process_local_data(self._sharding, local, (self._size,)))
        return previous is not None and bool(previous)


def _write_operative_config(model_dir: str) -> None:
    """Records the gin config that produced this run (complete once the first step ran)."""
    import gin

    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())


def _data_order(feature_lengths: Mapping[str, int], data: DataConfig, task_name: str | None = None) -> dict:
    """What decides which examples batch N holds (resume skips N batches)."""
    from dro_jax.data import tasks as data_tasks

    order = {"split": data.split, "shuffle": data.shuffle, "seed": data.seed, "pack": data.pack,
             "feature_lengths": dict(feature_lengths),
             "processes": jax.process_count()}  # each host reads its own shard of the data
    if data.pack:
        order["max_segments"] = data.max_segments
    if task_name is not None:  # a log appended to (or cut) since the start shuffles differently
        order["records"] = {t.name: int(t.source.load(data.split).num_examples)
                            for t in data_tasks.feedback_tasks(task_name)}
    return order


def _check_resumable(model_dir: str, model, task_name: str, batch_size: int, data_order: dict) -> None:
    """A MODEL_DIR resumes only under the model class, network, task, batch size and data order
    it was started with (the data position is counted in batches of that task)."""
    from dro_jax import network

    if not os.path.isfile(os.path.join(model_dir, checkpoints.MODEL_JSON)):
        return
    meta = checkpoints.read_model_json(model_dir)
    if meta.get("model") not in (None, type(model).__name__):
        raise ConfigError(f"MODEL_DIR={model_dir} holds a {meta['model']} run, but this configuration trains a "
                          f"{type(model).__name__}; use a new MODEL_DIR")
    for key, macro, ours in (("task", "MIXTURE_OR_TASK_NAME", task_name), ("batch_size", "BATCH_SIZE", batch_size)):
        if meta.get(key) not in (None, ours):
            raise ConfigError(f"MODEL_DIR={model_dir} was started with {macro}={meta[key]!r}, this configuration "
                              f"has {ours!r}; resume with the run's own, or start a new MODEL_DIR (e.g. with "
                              "INITIAL_CHECKPOINT_PATH set to this run)")
    started = meta.get("data_order") or {}
    for key in sorted(started):  # a run that recorded none (older) is not checked
        if started[key] != data_order.get(key):
            if key == "records":
                was = (f"a '{data_order.get('split')}' log of {started[key]!r} records (by task), which now "
                       f"has {data_order.get(key)!r} (records added or removed, or other files matched by its "
                       "paths)")
            else:
                setting = ("TASK_FEATURE_LENGTHS" if key == "feature_lengths" else
                           "SEED (trainer.DataConfig.seed)" if key == "seed" else
                           "the number of processes" if key == "processes" else f"trainer.DataConfig.{key}")
                was = f"{setting}={started[key]!r}, this configuration has {data_order.get(key)!r}"
            own = {"records": "the log as it was",
                   "processes": f"{started[key]!r} processes (each reads its own shard of the log; the devices and "
                                "mesh may differ)"}.get(key, "the run's own config (MODEL_DIR/config.gin)")
            raise ConfigError(f"MODEL_DIR={model_dir} was started with {was}, so the resumed run would not continue "
                              f"the run's data order; resume with {own} or start a new MODEL_DIR (e.g. with "
                              "INITIAL_CHECKPOINT_PATH set to this run: its weights, without the optimizer state "
                              "and step)")
    if "objective" in meta:
        _check_same_objective(model_dir, meta, _objective_metadata(model, task_name))
    ours, theirs = model.config.to_dict(), meta.get("network", {})
    # Free to change on resume; scan_layers is not (it changes the checkpoint's layout).
    free = network.T5Config.RUNTIME_FIELDS - {"scan_layers"}
    for field in sorted(set(ours) - free):
        if field in theirs and ours[field] != theirs[field]:
            raise ConfigError(f"MODEL_DIR={model_dir} was started with network.T5Config.{field}={theirs[field]!r}, "
                              f"this configuration has {ours[field]!r}; resume with the run's own config "
                              "(MODEL_DIR/config.gin) or use a new MODEL_DIR")


# The gin name of each recorded objective setting, for the resume check's message.
_OBJECTIVE_SETTINGS = {"tau": "TAU (models.DROModel.tau)", "value_kind": "models.DROModel.value_kind",
                       "logprob_normalization": "logprob_normalization", "beta": "models.KTOModel.beta",
                       "desirable": "models.KTOModel.desirable", "min_reward": "MIN_REWARD"}


def _check_same_objective(model_dir: str, meta: dict, now: dict) -> None:
    """A resumed run keeps the objective it started with: another tau, value network or reward
    mapping would train the rest of the run on something else, and `evaluate` reads the record."""
    started, ours = meta.get("objective") or {}, now["objective"]
    changed = [(_OBJECTIVE_SETTINGS.get(k, k), started[k], ours.get(k)) for k in sorted(started)
               if started[k] != ours.get(k) and not (k == "value_kind" and k not in ours)]
    mapping = meta.get("reward_mapping")
    if "objective" in meta and mapping is not None and now["reward_mapping"] is not None:
        changed += [(f"the task's reward_mapping.{k}", mapping[k], now["reward_mapping"].get(k))
                    for k in sorted(mapping) if mapping[k] != now["reward_mapping"].get(k)
                    and k != "standardize"]  # _restore_reward_stats says what that switch changes
    if changed:
        setting, theirs, mine = changed[0]
        raise ConfigError(f"MODEL_DIR={model_dir} was started with {setting}={theirs!r}, this configuration has "
                          f"{mine!r}; resume with the run's own config (MODEL_DIR/config.gin) or start a new "
                          "MODEL_DIR (e.g. with INITIAL_CHECKPOINT_PATH set to this run)")


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _check_feature_lengths(lengths) -> None:
    """A zero length would drop every prompt or response, silently."""
    if not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}:
        raise ConfigError("TASK_FEATURE_LENGTHS must be {'inputs': N, 'targets': M}, got "
                          f"{dict(lengths) if isinstance(lengths, Mapping) else lengths!r}")
    for key, value in lengths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"TASK_FEATURE_LENGTHS['{key}'] must be a positive integer, got {value!r}")


def train(*, model_dir: str, model, task_name: str, task_feature_lengths: Mapping[str, int],
          batch_size: int, train_steps: int,
          policy_optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
          value_optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
          mesh_config: sharding.MeshConfig = sharding.MeshConfig(),
          checkpoint_config: CheckpointConfig = CheckpointConfig(),
          data: DataConfig = DataConfig(),
          eval_config: EvalConfig = EvalConfig(),
          initial_checkpoint_path: str | None = None,
          reference: str = "auto", microbatches: int = 1, seed: int = 0, log_every: int = 10,
          max_nonfinite_steps: int = 10, dropout: bool = True) -> dict[str, float]:
    """Trains `model` (DROModel, KTOModel or FilteredSFTModel) on a seqio task.

    reference: 'precomputed' uses the task's `ref_logprobs` feature; 'frozen' keeps the
    initial policy as frozen reference params and scores it in every step; 'auto'
    picks 'precomputed' when the task has the feature. Resumes from the latest
    checkpoint in model_dir. Returns the last logged metrics.
    """
    from clu import metric_writers

    for name, value, kind in (("policy_optimizer", policy_optimizer, optim.OptimizerConfig),
                              ("value_optimizer", value_optimizer, optim.OptimizerConfig),
                              ("mesh_config", mesh_config, sharding.MeshConfig),
                              ("checkpoint_config", checkpoint_config, CheckpointConfig),
                              ("data", data, DataConfig), ("eval_config", eval_config, EvalConfig)):
        if not isinstance(value, kind):  # gin passes any value on
            raise ConfigError(f"trainer.train.{name} must be a {kind.__name__} "
                              f"(@{kind.__module__.split('.')[-1]}.{kind.__name__}()), got {value!r}")
    if not isinstance(model, models.BaseModel):
        raise ConfigError(f"trainer.train.model must be a model (@models.DROModel(), @models.KTOModel() or "
                          f"@models.FilteredSFTModel()), got {model!r}")
    for macro, value in (("MODEL_DIR", model_dir), ("MIXTURE_OR_TASK_NAME", task_name)):
        if value is None or value == "" or type(value) is object:  # gin.REQUIRED is a bare object()
            raise ConfigError(f"{macro} is not set; pass --gin.{macro}=\"'...'\"")
        if not isinstance(value, str):
            raise ConfigError(f"{macro} must be a string, got {value!r}; pass --gin.{macro}=\"'...'\"")
    if initial_checkpoint_path is not None and not isinstance(initial_checkpoint_path, str):
        raise ConfigError(f"INITIAL_CHECKPOINT_PATH must be a path string or None, got {initial_checkpoint_path!r}")
    for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                        ("LOG_EVERY_STEPS (trainer.train.log_every)", log_every),
                        ("SAVE_EVERY_STEPS (CheckpointConfig.save_every_steps)", checkpoint_config.save_every_steps),
                        ("trainer.train.max_nonfinite_steps", max_nonfinite_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    _check_feature_lengths(task_feature_lengths)
    _check_task_name(task_name)
    checks.integer("SEED (trainer.train.seed)", seed)
    checks.boolean("trainer.train.dropout", dropout)
    if data.carry_weights and isinstance(model, models.FilteredSFTModel):
        log.warning("filtered SFT ignores per-record weights (trainer.DataConfig.carry_weights=True) but "
                    "for 0: it trains on the thumbs-up records of weight > 0, each with weight 1")
    if data.pack and not getattr(model, "supports_packing", True):
        raise ConfigError(f"{type(model).__name__} cannot train on packed rows "
                          "(trainer.DataConfig.pack=True); its loss pairs whole examples")
    if isinstance(model, models.KTOModel) and batch_size < 2:
        raise ConfigError(f"BATCH_SIZE={batch_size}: KTO needs at least 2 examples a batch (its KL reference point "
                          "pairs each prompt with another example's response)")
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    if (initial_checkpoint_path and checkpoints.latest_step_dir(model_dir) is None  # a resume never reads it
            and not os.path.exists(os.path.expanduser(initial_checkpoint_path))):
        raise ConfigError(f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path}: no such file or directory")
    io_utils.check_writable_dir(model_dir, "MODEL_DIR")
    io_utils.check_writable_dir(os.path.join(model_dir, "checkpoints"), "MODEL_DIR")  # may be a mount
    mesh = sharding.create_mesh(mesh_config)
    if mesh.size < jax.device_count():
        log.warning("the mesh (MESH_DATA=%d x MESH_MODEL=%d) uses %d of the %d devices; the others stay idle",
                    mesh.shape[sharding.DATA_AXIS], mesh.shape[sharding.MODEL_AXIS], mesh.size, jax.device_count())
    rules = sharding.logical_axis_rules(mesh_config)
    data_devices = mesh.shape[sharding.DATA_AXIS]
    if batch_size % data_devices:
        raise ConfigError(f"BATCH_SIZE={batch_size} is not divisible by the {data_devices} "
                          "data-parallel devices of the mesh")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ConfigError(f"trainer.train.microbatches must be a positive integer, got {microbatches!r}")
    if microbatches > 1 and not getattr(model, "supports_microbatches", True):
        raise ConfigError(f"{type(model).__name__} cannot accumulate microbatches (trainer.train.microbatches="
                          f"{microbatches}): its KL reference point and mismatched pairs are computed over the "
                          "whole batch; use microbatches=1 with a smaller BATCH_SIZE")
    if batch_size % (microbatches * data_devices):
        # each device's rows split evenly into the microbatches, so accumulation stays local
        raise ConfigError(f"BATCH_SIZE={batch_size} does not split into microbatches={microbatches} on "
                          f"{data_devices} data-parallel devices; use a multiple of {microbatches * data_devices}")
    if jax.process_count() > 1 and mesh.shape[sharding.MODEL_AXIS] > jax.local_device_count():
        # hosts are fed by process index, so each must own whole rows of the mesh
        raise ConfigError(f"MESH_MODEL={mesh.shape[sharding.MODEL_AXIS]} spans hosts "
                            f"({jax.local_device_count()} devices per host); use at most that many")
    ckpt_dir = os.path.join(model_dir, "checkpoints")

    # Build the input pipeline first: a bad log fails here, before anything is written.
    ds_probe = make_dataset(task_name, task_feature_lengths, batch_size, data)
    first = next(ds_probe)
    input_shapes = {k: (batch_size,) + v.shape[1:] for k, v in first.items()}
    del ds_probe
    _check_task_vocabulary(task_name, model.config.vocab_size)
    _check_weights(task_name, data)
    training_rewards = _training_rewards(task_name, data.split, first["rewards"], data.carry_weights)
    _check_one_sided(model, *training_rewards)
    _check_reward_scale(model, *training_rewards)
    has_ref_feature = "ref_logprobs" in first
    if reference == "auto":
        reference = "precomputed" if has_ref_feature else "frozen"
    if reference not in ("precomputed", "frozen"):
        raise ConfigError(f"reference: expected auto|precomputed|frozen, got {reference!r}")
    if reference == "precomputed" and getattr(model, "logprob_normalization", "sum") != "sum":
        raise ConfigError("the log's ref_logprob is a summed log-prob (dro_jax.score) but the model uses "
                            "logprob_normalization='mean'; use reference='frozen' or the sum")
    if reference == "precomputed" and not has_ref_feature:
        raise ConfigError(f"reference='precomputed' but the log of task {task_name} has no ref_logprob; "
                            "run `python -m dro_jax.score` on it first")
    if reference == "frozen" and has_ref_feature:
        input_shapes.pop("ref_logprobs")
    if reference == "precomputed" and "ref_logprobs" in model.reference_keys:
        from dro_jax.data import tasks as data_tasks

        data_tasks.check_ref_logprob_lengths(task_name, data.split, task_feature_lengths)

    txs, schedules = {}, {}
    for k, cfg in (("policy", policy_optimizer), ("value", value_optimizer)):
        txs[k], schedules[k] = optim.make_optimizer(cfg, train_steps)
    _check_warmup(model, {"policy": policy_optimizer, "value": value_optimizer}, train_steps)
    use_frozen_ref = reference == "frozen"  # else only what the log lacks (KTO's mismatched pairs)

    needs_ref = any(k not in first or use_frozen_ref for k in model.reference_keys)
    if model.reference_keys:  # which reference this run uses, since 'auto' decides it
        print(f"[train] reference: {_reference_description(reference, needs_ref)}", flush=True)
    _, abstract_state, state_sh = train_state.abstract_state_and_shardings(
        model, txs, input_shapes, mesh, rules, seed=seed, with_ref=needs_ref)
    evaluator = None
    if eval_config.period is not None:  # before anything is written: a missing split is a config error
        from dro_jax.data.logs import BadRecordError

        try:
            evaluator = validation.Evaluator(
                model=model, task_name=task_name, feature_lengths=task_feature_lengths,
                batch_size=batch_size // microbatches,  # the step's own microbatch: no more memory
                converter=_feature_converter(data), reference=reference, mesh=mesh,
                state_sharding=state_sh, config=eval_config)
        except BadRecordError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    with sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        def fresh_state():
            override = None
            if initial_checkpoint_path:
                print(f"[train] loading the initial parameters from INITIAL_CHECKPOINT_PATH={initial_checkpoint_path}",
                      flush=True)
                override = lambda p: _load_initial(initial_checkpoint_path, model, p,
                                                   task_vocabulary(task_name))
            return train_state.create_state(model, txs, input_shapes, mesh, rules, seed=seed,
                                            with_ref=needs_ref, params_override=override)[0]

        resuming = checkpoints.latest_step_dir(model_dir) is not None
        # fresh state first: a bad INITIAL_CHECKPOINT_PATH fails before anything is written
        state = None if resuming else fresh_state()
        with _model_dir_lock(model_dir), _QuietFailedWrites(_WRITE_FAILURE + _READ_FAILURE, stay_after_error=True):  # from here on the run writes into MODEL_DIR
            if not resuming and checkpoints.latest_step_dir(model_dir) is not None:
                resuming, state = True, None  # a run that just released the lock saved a step
            manager = ocp.CheckpointManager(
                ckpt_dir,
                options=ocp.CheckpointManagerOptions(
                    save_interval_steps=checkpoint_config.save_every_steps, max_to_keep=checkpoint_config.keep,
                    enable_async_checkpointing=checkpoint_config.async_save, create=True),
                item_names=("state",))
            signals = {}  # what stopped the loop, agreed by every host
            try:
                last = _resume_and_train(
                    model_dir=model_dir, model=model, manager=manager, resuming=resuming, state=state,
                    fresh_state=fresh_state, abstract_state=abstract_state, state_sh=state_sh, mesh=mesh, txs=txs,
                    schedules=schedules, task_name=task_name, task_feature_lengths=task_feature_lengths,
                    batch_size=batch_size, train_steps=train_steps, data=data, reference=reference, seed=seed,
                    microbatches=microbatches, dropout=dropout, log_every=log_every,
                    checkpoint_config=checkpoint_config, max_nonfinite_steps=max_nonfinite_steps,
                    evaluator=evaluator, signals=signals)
            finally:
                # Also on errors: let an async save finish (no half-written step folder) and stop
                # orbax's threads before the interpreter exits.
                _finish_saves(manager)
    final = checkpoints.latest_step_dir(model_dir)
    if last and final is not None and os.path.basename(final) == str(train_steps):  # not a preempted run
        print(f"[train] done: step {train_steps}, checkpoint {final} (written)", flush=True)
    caller = signal.getsignal(signal.SIGTERM)
    if signals.get("sigterm") and callable(caller):
        # A SIGTERM handler of the caller's own (the demo's): the run has saved, and the caller
        # must stop too, even when the signal came during the last step. Every host calls its own.
        caller(signal.SIGTERM, None)
    return last


def _resume_and_train(*, model_dir, model, manager, resuming, state, fresh_state, abstract_state, state_sh,
                      mesh, txs, schedules, task_name, task_feature_lengths, batch_size, train_steps, data,
                      reference, seed, microbatches, dropout, log_every, checkpoint_config, signals,
                      max_nonfinite_steps, evaluator=None) -> dict[str, float]:
    """Restores the latest checkpoint (or starts fresh), then runs the step loop."""
    start_step = manager.latest_step() if resuming else None
    if start_step is not None:
        _check_resumable(model_dir, model, task_name, batch_size, _data_order(task_feature_lengths, data, task_name))
        _restore_reward_stats(model_dir, task_name)
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
        try:
            state = manager.restore(start_step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # orbax raises many kinds, with pages of context
            # The network and model class were checked above; what is left is damage, or a setting
            # the run metadata does not record (optimizer, reference mode). Say both.
            where = os.path.join(manager.directory, str(start_step))
            # tensorstore ends its message with a pointer to details it cannot print ("<bound method ...")
            reason = str(e).strip().splitlines()[0].split("See full TensorStore details")[0].rstrip(" .")[:200]
            raise ConfigError(f"{where}: cannot restore ({reason}); if its files "
                              "are damaged, move that folder away to resume from the step before it; otherwise "
                              "resume with the run's own config (MODEL_DIR/config.gin) or use a new MODEL_DIR"
                              ) from None
        log.info("resumed from step %d in %s", start_step, manager.directory)
    else:
        start_step = 0
        if state is None:  # step folders orbax does not recognise as finished
            state = fresh_state()

    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if start_step > train_steps:
        raise ConfigError(f"{ckpt_dir} is already at step {start_step}, beyond TRAIN_STEPS={train_steps}")
    if start_step == train_steps:  # before anything is written: a finished run stays as it is
        print(f"[train] {model_dir} is already at step {start_step} = TRAIN_STEPS; nothing to do", flush=True)
        return {}

    _report_data(model_dir, task_name, data.split, fresh=start_step == 0)
    if jax.process_index() == 0:
        checkpoints.write_run_metadata(
            model_dir, config=model.config, vocabulary_path=task_vocabulary(task_name),
            extra={"task": task_name, "feature_lengths": dict(task_feature_lengths),
                   "model": type(model).__name__, "batch_size": batch_size,
                   "data_order": _data_order(task_feature_lengths, data, task_name), **_objective_metadata(model, task_name)})

    step_fn = train_state.make_train_step(model, txs, schedules, seed=seed, microbatches=microbatches,
                                          dropout=dropout)
    jitted = train_state.jit_train_step(step_fn, state_sh, mesh)
    batches = make_dataset(task_name, task_feature_lengths, batch_size, data, skip_batches=start_step)
    return _train_loop(model_dir=model_dir, manager=manager, state=state, jitted=jitted, batches=batches,
                       mesh=mesh, reference=reference, batch_size=batch_size, train_steps=train_steps,
                       start_step=start_step, task_name=task_name, model=model, log_every=log_every,
                       checkpoint_config=checkpoint_config, max_nonfinite_steps=max_nonfinite_steps,
                       evaluator=evaluator, signals=signals)


def _train_loop(*, model_dir, manager, state, jitted, batches, mesh, reference, batch_size, train_steps,
                start_step, task_name, model, log_every, checkpoint_config, max_nonfinite_steps, signals,
                evaluator=None):
    """The step loop of `train`, from `start_step` on; returns the last logged metrics.
    Sets `signals["sigterm"]`: whether any host got a SIGTERM (every host gets the same answer)."""
    from clu import metric_writers

    writer = metric_writers.create_default_writer(model_dir, just_logging=jax.process_index() > 0,
                                                  asynchronous=False)
    if start_step == 0:
        writer.write_hparams({"batch_size": batch_size, "train_steps": train_steps, "task": task_name,
                              "model": type(model).__name__, "reference": reference})
    last: dict[str, float] = {}
    t_start = time.time()
    # The rate window starts once the first step (which compiles) has run, so the ETA leaves
    # compile time out; a log line of that step alone gives no rate ("compiling").
    window = {"t": t_start, "steps": 0, "skip": 0, "compiling": True}
    pending = []
    step = start_step
    saved_steps = set(manager.all_steps())

    def save(step_to_save: int, force: bool = False):
        if step_to_save in saved_steps:  # e.g. SIGTERM right after a periodic save
            return
        if not bool(jax.device_get(_state_is_finite(state.params, state.opt_state))):
            raise TrainingError(f"step {step_to_save}: state is not finite; refusing to save a checkpoint")
        with _saving(manager.directory, f"step {step_to_save}"):
            if manager.save(step_to_save, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force):
                saved_steps.add(step_to_save)

    try:
        agreement = _LaggedAgreement(mesh)
        with _Preemption() as preempt:
            while step < train_steps:
                if agreement.poll(preempt.requested):
                    log.warning("%s: saving step %d and exiting", preempt.signal_name or "a signal on another process",
                                step)
                    if pending:  # the steps since the last log line would otherwise never be logged
                        last = _log_window(writer, pending, window, step, train_steps, t_start, state)
                    save(step, force=True)
                    signals["sigterm"] = _all_hosts_agree(preempt.signal_name == "SIGTERM")  # all hosts are here
                    return last
                host_batch = next(batches)
                if reference == "frozen":
                    host_batch.pop("ref_logprobs", None)
                batch = sharding.host_batch_to_global(host_batch, mesh)
                if step == start_step:  # minutes for large models: say what the silence is
                    print(f"[train] compiling the train step (step {step + 1} waits for it)", flush=True)
                state, metrics = jitted(state, batch)
                step += 1
                pending.append(metrics)
                window["steps"] += 1
                if step == start_step + 1:
                    _write_operative_config(model_dir)
                    if start_step == 0 and reference == "precomputed":
                        _check_scored_by_this_policy(metrics)
                    if step % log_every and step != train_steps:
                        jax.block_until_ready(metrics)
                        window.update(t=time.time(), steps=0, skip=1, compiling=False)
                if step % log_every == 0 or step == train_steps:
                    last = _log_window(writer, pending, window, step, train_steps, t_start, state)
                    pending = []
                    window.update(t=time.time(), steps=0, skip=0, compiling=False)
                    nonfinite_in_a_row = int(jax.device_get(state.nonfinite_in_a_row))
                    if nonfinite_in_a_row >= max_nonfinite_steps:
                        raise TrainingError(
                            f"{nonfinite_in_a_row} steps in a row had a non-finite loss, gradient or reward "
                            f"(last at step {step}); stopping. Check the rewards in the log and the learning rates.")
                if evaluator is not None and (step % evaluator.period == 0 or step == train_steps):
                    jax.block_until_ready(state)  # the steps still queued are the window's, not eval's
                    t_eval = time.time()
                    last.update({f"eval/{k}": v for k, v in
                                 validation.run(evaluator, state, writer, step, train_steps).items()})
                    window["t"] += time.time() - t_eval  # the window's rate leaves the evaluation out
                if step == train_steps:  # before the final save, which would mark the run finished
                    _report_skipped_steps(state, step - start_step)
                if step % checkpoint_config.save_every_steps == 0 or step == train_steps:
                    jax.block_until_ready(state)  # the steps still queued are the window's, not the save's
                    t_save = time.time()
                    save(step, force=step == train_steps)
                    window["t"] += time.time() - t_save  # and the save's (its blocking part)
        # A signal during the last step: the run is complete, but a caller (the demo) must still stop,
        # and every host must exit alike (the lagged poll may not have carried it to the others).
        signals["sigterm"] = _all_hosts_agree(preempt.signal_name == "SIGTERM")
        if _all_hosts_agree(preempt.signal_name == "SIGINT"):
            raise KeyboardInterrupt
        return last
    except ValueError as e:
        from dro_jax.data.logs import BadRecordError

        if not isinstance(e, (ConfigError, BadRecordError)):
            # Input and configuration were checked before the first step: this is a bug, and the
            # CLI must show its traceback rather than report it as bad input (exit 2).
            e.internal_error = True
        raise
    finally:
        writer.flush()
        writer.close()


# How tensorstore (under orbax) reports a failed write: a ValueError naming the OS error.
_WRITE_FAILURE = ("Error writing", "Failed writing", "Failed to write", "os_error_code")


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, (ValueError, RuntimeError))
                                      and any(m in str(e) for m in _WRITE_FAILURE))


# How tensorstore reports a checkpoint it cannot read (a damaged or cut file).
_READ_FAILURE = ("Encountered error while reading", "Error reading", "OUT_OF_RANGE")


def _closed_loop(e: BaseException | None) -> bool:
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


class _QuietFailedWrites(logging.Filter):
    """orbax's background threads report a failed checkpoint write (or read) themselves, in pages
    of tracebacks (absl and asyncio records, and tensorstore's late callbacks into orbax's closed
    event loop), before the error reaches the loop, which reports it in one line."""

    def __init__(self, markers=_WRITE_FAILURE, *, stay_after_error: bool = False):
        super().__init__()
        self.markers = markers
        # orbax's threads may call back after the error has reached us; the process is on its
        # way out then, and the filter (of these reports only) stays for the rest of it
        self.stay_after_error = stay_after_error

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(m in text for m in self.markers)

    def _ours(self, e: BaseException | None) -> bool:
        return _closed_loop(e) or any(m in str(e) for m in self.markers)

    def _unraisable(self, unraisable) -> None:
        if not self._ours(unraisable.exc_value):
            self._hook(unraisable)

    def _excepthook(self, kind, value, tb) -> None:  # a callback's error printed from C (PyErr_Print)
        if not self._ours(value):
            self._excepthook_before(kind, value, tb)

    def __enter__(self):
        self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self._excepthook_before, sys.excepthook = sys.excepthook, self._excepthook
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        if exc[1] is not None and self.stay_after_error and (self._ours(exc[1]) or _is_write_failure(exc[1])):
            return  # orbax's failure: its threads may still report it
        sys.unraisablehook = self._hook
        sys.excepthook = self._excepthook_before
        for name in ("absl", "asyncio"):
            logging.getLogger(name).removeFilter(self)


@contextlib.contextmanager
def _saving(directory, what: str):
    """A failed checkpoint write (disk full, quota, a read-only mount) stops training with one
    line; an async save's failure surfaces at the next save or at the end. Other errors pass."""
    try:
        yield
    except Exception as e:
        if not _is_write_failure(e):
            raise
        msg = _first_line(e)
        raise TrainingError(f"{directory}: a checkpoint write failed, seen when saving {what} ({msg[:300]}); "
                            "earlier checkpoints are kept: make room and rerun to resume from the last one") from None


def _finish_saves(manager) -> None:
    """Waits for an async save and closes the manager. A save failure is the run's error only
    when nothing else is on its way out (it must not hide that error, or a Ctrl-C)."""
    in_flight = sys.exc_info()[1] is not None
    try:
        with _saving(manager.directory, "the last checkpoint"):
            manager.wait_until_finished()
    except Exception as e:
        if not in_flight:
            raise
        log.error("also: %s", _first_line(e))
    finally:
        manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _report_skipped_steps(state, steps_run: int) -> None:
    """A short run can end before `max_nonfinite_steps` stops it: say what was skipped, and fail
    when no step of this invocation updated the parameters."""
    in_a_row = int(jax.device_get(state.nonfinite_in_a_row))
    total = int(jax.device_get(state.nonfinite_total))
    if steps_run and in_a_row >= steps_run:
        raise TrainingError(f"all {steps_run} steps of this run had a non-finite loss, gradient or reward, so "
                            "nothing was learned and the last step is not saved; "
                            "check the rewards in the log and the learning rates")
    if total:
        log.warning("%d step(s) of the run were skipped as non-finite (nonfinite_steps_total in TensorBoard)",
                    total)


# |mean log pi(y|x) - ref_logprob| at the first step above which the log was not scored by the
# initial policy: the same checkpoint scored in another dtype is off by about 1e-2.
SCORED_BY_ANOTHER_POLICY_NATS = 1.0


def _check_scored_by_this_policy(metrics) -> None:
    """The log's ref_logprob should be the initial policy's log-probs; nothing records which
    checkpoint scored it, so a log scored by another (or a run from random weights) would train
    against a reference that is not the starting point, without a word."""
    logratio = metrics.get("logratio/mean")
    if logratio is None:
        return
    logratio = float(jax.device_get(logratio))
    if abs(logratio) > SCORED_BY_ANOTHER_POLICY_NATS:
        log.warning("the log's ref_logprob differs from the initial policy's log-probs by %.3g nats a response on "
                    "average at the first step (about 0 when the log was scored with INITIAL_CHECKPOINT_PATH); "
                    "was it scored by another checkpoint, or is INITIAL_CHECKPOINT_PATH unset? The KL term then "
                    "pulls towards that other policy", logratio)


def _log_window(writer, pending, window, step, train_steps, t_start, state) -> dict[str, float]:
    """Writes the mean metrics of the steps since the last log line and prints progress."""
    host = [jax.device_get(m) for m in pending]
    # A skipped (non-finite) step's loss is inf or NaN: averaging it in would hide the window's
    # finite steps. skipped_nonfinite itself is the fraction of the window that was skipped.
    kept = [h for h in host if not h["skipped_nonfinite"]] or host
    avg = {k: float(np.mean([h[k] for h in (host if k == "skipped_nonfinite" else kept)])) for k in host[0]}
    avg.pop("tokens", None)
    avg.pop("sequences", None)
    for k in avg:  # the rate in use at the logged step, not the window's mean of a schedule
        if k.startswith("learning_rate/"):
            avg[k] = float(host[-1][k])
    dt = max(time.time() - window["t"], 1e-9)
    if window.get("compiling"):  # only the step that compiled: its time says nothing of the rate
        rate = "compiling the step took " + _format_eta(dt)
    elif not window["steps"]:  # a preemption right after the compile step: no timed step yet
        rate = f"elapsed {_format_eta(time.time() - t_start)}"
    else:
        avg["perf/steps_per_sec"] = window["steps"] / dt
        avg["perf/examples_per_sec"] = sum(float(h["sequences"]) for h in host[window["skip"]:]) / dt
        avg["perf/tokens_per_sec"] = sum(float(h["tokens"]) for h in host[window["skip"]:]) / dt
        eta = (train_steps - step) / max(avg["perf/steps_per_sec"], 1e-9)
        rate = f"{avg['perf/steps_per_sec']:.2f} steps/s elapsed {_format_eta(time.time() - t_start)} ETA {_format_eta(eta)}"
    avg["nonfinite_steps_total"] = float(jax.device_get(state.nonfinite_total))
    writer.write_scalars(step, avg)
    main_loss = next((k for k in ("loss/policy", "loss/kto", "loss/sft") if k in avg), "loss/total")
    extra = "".join(f" {k}={avg[k]:.4g}" for k in ("loss/value", "value/mean", "logratio/mean") if k in avg)
    skipped = sum(bool(h["skipped_nonfinite"]) for h in host)
    if skipped:  # not only in TensorBoard: a user watching the console sees it as it happens
        extra += f" skipped {skipped} non-finite step{'s' if skipped > 1 else ''}"
    print(f"[train] step {step}/{train_steps} ({100.0 * step / train_steps:.0f}%) "
          f"{main_loss}={avg[main_loss]:.4g}{extra} {rate}", flush=True)
    return avg
