"""`python -m dro_jax.evaluate --checkpoint=PATH (--log=FILE | --prompts=FILE --gin_file=G)`

Evaluates a policy checkpoint in one of two ways.

* Against a held-out feedback log (`--log=FILE`, any layout `dro_jax.data.logs` reads):
  the held-out DRO loss 1/2 E[(r - V(x) - tau log(pi/pi_ref))^2], with V from the
  checkpoint's value network when it has one (else the best constant), and the AUC
  with which the implied reward tau*log(pi(y|x)/pi_ref(y|x)) ranks thumbs-up above
  thumbs-down records (a scalar reward counts as up when above 0 after the run's
  standardisation: on raw 1-10 scores every record is up, and the AUC is undefined). Reference log-probs come
  from `--reference=CKPT` when given, else from the log's `ref_logprob` fields. When PATH is
  a training run, its own tau, log-prob normalisation and thumbs-to-reward mapping are used
  (--tau, --thumbs_up and --thumbs_down override them), and rewards are standardised with its
  reward_stats.json when it has one. Record weights weight the DRO loss.
* Against a reward function (`--prompts=FILE` plus a gin file binding
  `evaluate.reward_settings.reward_fn` to a Python callable (prompt, response) -> float,
  e.g. gin_configs/demo/evaluate_reward.gin): samples one response per prompt and
  reports the thumbs-up rate (reward > threshold) with a 95% Wilson interval, the mean
  reward and, with `--reference=CKPT`, KL(pi || pi_ref) estimated as the mean of
  log pi - log pi_ref over the samples (an estimate of KL only at temperature 1).

Prints the metrics as JSON (and writes them to --output). An output may not be an input
file, and an existing one is replaced only with --overwrite.
Exit status: 0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM (nothing is written).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dro_jax.infer import (InputError, Policy, check_sampling_args, count_cut, count_not_round_trip, default_lengths,
                           read_prompts, response_mask, tokenize)


# ---- gin ------------------------------------------------------------------------------
def reward_settings(reward_fn: Optional[Callable[[str, str], float]] = None, thumbs_up_threshold: float = 0.0):
    """Gin-configurable: the reward callable and the reward above which a response counts as thumbs up."""
    return reward_fn, thumbs_up_threshold


def _gin_reward_settings():
    import gin

    from dro_jax import evaluate  # not __main__'s copy: gin registered the package module's function

    return gin.get_configurable(evaluate.reward_settings)()


# ---- metrics ---------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    from dro_jax.demo.env import wilson_interval as w

    return w(successes, n, z)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """P(score of a random positive > score of a random negative), ties count 1/2; None without both."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dro_loss(rewards: np.ndarray, values: np.ndarray, logprobs: np.ndarray, ref_logprobs: np.ndarray,
             tau: float, weights: Optional[np.ndarray] = None) -> float:
    """1/2 (weighted) mean of (r - V - tau (logp - ref))^2 over [N] arrays."""
    r = np.asarray(rewards, np.float64)
    resid = r - np.asarray(values, np.float64) - tau * (np.asarray(logprobs, np.float64) -
                                                         np.asarray(ref_logprobs, np.float64))
    return float(0.5 * np.average(resid ** 2, weights=weights))


def log_metrics(policy: Policy, prompts: Sequence[str], responses: Sequence[str], rewards: np.ndarray,
                positive: np.ndarray, *, ref_logprobs: Optional[np.ndarray] = None,
                reference: Optional[Policy] = None, tau: float = 1.0, inputs_length: int = 512,
                targets_length: int = 256, batch_size: int = 64, progress: bool = False,
                logprob_normalization: str = "sum", weights: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Held-out DRO loss and implied-reward AUC of `policy` on a feedback log (`progress`: bars on stderr).

    `logprob_normalization` is the run's ('mean': per-token log-probs, which summed `ref_logprobs`
    do not fit); `weights` [N] (the log's record weights) weight the DRO loss and its best constant."""
    if logprob_normalization not in ("sum", "mean"):
        raise ValueError(f"logprob_normalization: expected 'sum' or 'mean', got {logprob_normalization!r}")
    if logprob_normalization == "mean" and ref_logprobs is not None:
        raise InputError("the run normalises log-probs per token (logprob_normalization='mean'); the log's summed "
                         "ref_logprob fields do not fit: pass --reference=CKPT")
    weights = np.ones(len(prompts)) if weights is None else np.asarray(weights, np.float64)
    if not weights.sum() > 0:
        raise InputError("every record of the log has weight 0: there is nothing to evaluate")
    enc, t_in = tokenize(policy.vocabulary, prompts, inputs_length)
    tgt, t_out = tokenize(policy.vocabulary, responses, targets_length)
    mask = (tgt > 0).astype(np.int32)
    per_token = (lambda x: x / np.maximum(mask.sum(1), 1)) if logprob_normalization == "mean" else (lambda x: x)
    logp = per_token(policy.logprobs(enc, tgt, batch_size=batch_size, target_mask=mask, progress=progress,
                                     desc="policy log-probs"))
    if ref_logprobs is None:
        if reference is None:
            raise InputError("the log has no ref_logprob fields; pass --reference=CKPT")
        ref_logprobs = per_token(reference.logprobs(enc, tgt, batch_size=batch_size, target_mask=mask,
                                                    progress=progress, desc="reference log-probs"))
    ref_logprobs = np.asarray(ref_logprobs, np.float64)
    logratio = logp - ref_logprobs
    values = policy.values(enc, batch_size=batch_size)
    if values is not None:
        value_source = "value_network"
    else:
        value_source = "best_constant"
        values = np.full(len(logp), float(np.average(rewards - tau * logratio, weights=weights)))
    implied = tau * logratio
    auc_value = auc(implied, positive)
    if t_in or t_out:
        print(f"[evaluate] {t_in} prompts longer than --inputs_length={inputs_length} and {t_out} responses "
              f"longer than --targets_length={targets_length} tokens are truncated", file=sys.stderr)
    return {
        "n": len(prompts),
        "truncated": int(t_in + t_out),
        "inputs_truncated": int(t_in),
        "targets_truncated": int(t_out),
        "tau": tau,
        "logprob_normalization": logprob_normalization,
        "dro_loss": dro_loss(rewards, values, logp, ref_logprobs, tau, weights),
        "dro_loss_weighted": bool(np.any(weights != 1)),
        "value_source": value_source,
        "implied_reward_auc": auc_value,
        **({} if auc_value is not None else {
            "implied_reward_auc_note": "undefined: the log needs both thumbs-up and thumbs-down records (a "
                                       "scalar reward counts as up above 0, after the run's standardisation)"}),
        "implied_reward_mean_up": float(implied[positive].mean()) if positive.any() else None,
        "implied_reward_mean_down": float(implied[~positive].mean()) if (~positive).any() else None,
        "logratio_mean": float(logratio.mean()),
        "value_mean": float(np.mean(values)),
        "n_thumbs_up": int(positive.sum()),
        "n_thumbs_down": int((~positive).sum()),
    }


def reward_metrics(policy: Policy, prompts: Sequence[str], reward_fn: Callable[[str, str], float], *,
                   reference: Optional[Policy] = None, threshold: float = 0.0, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, inputs_length: int = 512, max_length: int = 64,
                   batch_size: int = 64, seed: int = 0, progress: bool = False,
                   samples: Optional[list] = None) -> dict[str, Any]:
    """Samples one response per prompt; thumbs-up rate, mean reward, KL estimate to `reference`.

    `samples`, when a list, receives (prompt, response, reward) triples.
    """
    from dro_jax.infer import detokenize

    enc, gen = policy.sample_tokens(prompts, inputs_length=inputs_length, max_length=max_length,
                                    temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
                                    seed=seed, progress=progress, desc="evaluate")
    responses = detokenize(policy.vocabulary, gen)
    rewards = np.array([_reward(reward_fn, i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))],
                       np.float64)
    up = int((rewards > threshold).sum())
    n = len(prompts)
    lo, hi = wilson_interval(up, n)
    out: dict[str, Any] = {
        "n_eval": n, "thumbs_up_rate": up / n, "thumbs_up_ci95": [lo, hi], "mean_reward": float(rewards.mean()),
        "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "mean_response_tokens": float(response_mask(gen, policy.config.eos_id).sum(1).mean()),
        "prompts_truncated": tokenize(policy.vocabulary, prompts, inputs_length)[1],
        "responses_cut_at_max_length": count_cut(gen, policy.config.eos_id),
        # the reward function sees text; the KL is over tokens: say when the two differ
        "responses_not_their_tokens": count_not_round_trip(policy.vocabulary, gen),
    }
    if out["responses_not_their_tokens"] and progress:
        print(f"[evaluate] {out['responses_not_their_tokens']} of {n} responses are not their sampled tokens as text "
              "(e.g. an incomplete UTF-8 byte sequence); the reward function sees the text", file=sys.stderr)
    for key, what, flag, limit in (("prompts_truncated", "prompts are longer than", "--inputs_length", inputs_length),
                                   ("responses_cut_at_max_length", "responses reached", "--max_length", max_length)):
        if out[key] and progress:
            print(f"[evaluate] {out[key]} of {n} {what} {flag}={limit} tokens and are cut there", file=sys.stderr)
    if reference is not None:
        mask = response_mask(gen, policy.config.eos_id)
        logp = policy.logprobs(enc, gen, batch_size=batch_size, target_mask=mask, progress=progress,
                               desc="policy log-probs")
        ref = reference.logprobs(enc, gen, batch_size=batch_size, target_mask=mask, progress=progress,
                                 desc="reference log-probs")
        diff = logp.astype(np.float64) - ref
        out["kl_to_reference"] = float(diff.mean())
        out["kl_to_reference_stderr"] = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        if temperature != 1 or top_k or top_p < 1:
            out["kl_to_reference_note"] = ("the mean log-ratio of the samples: an estimate of KL(pi || pi_ref) "
                                           "only when sampling at temperature 1 without top-k or top-p")
    if samples is not None:
        samples.extend(zip(prompts, responses, rewards.tolist()))
    return out


def _reward(reward_fn: Callable[[str, str], float], i: int, prompt: str, response: str) -> float:
    """reward_fn(prompt, response) as a finite float; anything else is one line naming the prompt."""
    where = f"reward_fn on prompt {i + 1} ({prompt[:40]!r})"
    try:
        value = reward_fn(prompt, response)
    except Exception as e:  # the user's code: any error, reported on one line
        msg = " ".join(str(e).split())[:200]
        raise InputError(f"{where}: {type(e).__name__}: {msg}") from None
    try:  # numbers, bools, numpy and JAX scalars; a string would be read quietly, so not those
        if isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where} returned {type(value).__name__} {value!r:.40}, not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{where} returned {number}, not a finite number")
    return number


# ---- CLI ---------------------------------------------------------------------------------
def _parse_args(argv):
    from dro_jax import gin_utils

    files, bindings, rest = gin_utils.split_gin_args(argv)
    p = argparse.ArgumentParser(prog="python -m dro_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--log", default=None, help="held-out feedback log to evaluate on")
    p.add_argument("--prompts", default=None, help="prompts (JSONL 'prompt' or text lines) for reward mode")
    p.add_argument("--reference", default=None, help="reference checkpoint (KL; ref log-probs for --log)")
    # One mode's flags default to None, so that a flag given in the other mode is refused even at
    # its default value; _parse_args fills in _MODE_DEFAULTS after noting which were given.
    p.add_argument("--tau", type=float, default=None,
                   help="DRO tau (log mode; default: the run's, else 1.0)")
    p.add_argument("--thumbs_up", type=float, default=None,
                   help="reward of a thumbs up (log mode; default: the run's mapping, else 1.0)")
    p.add_argument("--thumbs_down", type=float, default=None,
                   help="reward of a thumbs down (log mode; default: the run's mapping, else -1.0)")
    p.add_argument("--temperature", type=float, default=None, help="reward mode; default 1.0")
    p.add_argument("--top_k", type=int, default=None, help="reward mode; default 0 (off)")
    p.add_argument("--top_p", type=float, default=None, help="reward mode; default 1.0 (off)")
    p.add_argument("--max_length", type=int, default=None, help="reward mode; default 64")
    p.add_argument("--inputs_length", type=int, default=None, help="default: a training run's, else 512")
    p.add_argument("--targets_length", type=int, default=None, help="log mode; default: a training run's, else 256")
    p.add_argument("--reward_stats", default=None,
                   help="log mode: standardise rewards with this reward_stats JSON (e.g. MODEL_DIR/"
                        "reward_stats.TASK.json of a mixture run); default: the run's reward_stats.json")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=None, help="reward mode; default 0")
    p.add_argument("--output", default=None, help="JSON file for the metrics")
    p.add_argument("--samples_output", default=None, help="JSONL of sampled responses (reward mode)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output/--samples_output")
    p.add_argument("--vocabulary", default=None,
                   help="'byte' or a spiece.model (default: the checkpoint's), for both checkpoints")
    p.epilog = ("Reward mode also takes --gin_file=FILE (repeatable) and --gin.BINDING=VALUE, e.g. "
                "--gin_file=gin_configs/demo/evaluate_reward.gin.")
    args = p.parse_args(rest)
    args.gin_files, args.gin_bindings = files, bindings
    args.given = {name for names in _MODE_ONLY.values() for name in names if getattr(args, name) is not None}
    for name, default in _MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


# Flags that only one mode reads: given in the other, they would be ignored without a word.
_MODE_ONLY = {"log": ("tau", "targets_length", "thumbs_up", "thumbs_down", "reward_stats"),
              "reward": ("temperature", "top_k", "top_p", "max_length", "seed", "samples_output")}
_MODE_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_length": 64, "seed": 0}


def _check_mode_flags(args) -> None:
    mode, other = ("log", "reward") if args.log is not None else ("reward", "log")
    unused = [f"--{name}" for name in _MODE_ONLY[other] if name in args.given]
    if mode == "log" and (args.gin_files or args.gin_bindings):
        unused.append("--gin_file/--gin.*")
    if unused:
        verb, pronoun = ("apply", "them") if len(unused) > 1 else ("applies", "it")
        raise InputError(f"{', '.join(unused)} only {verb} to {other} mode "
                         f"({'--prompts' if other == 'reward' else '--log'}), not to this {mode}-mode run; "
                         f"drop {pronoun}")


def _reward_stats_for(checkpoint: str, given: str | None = None):
    from dro_jax import checkpoints
    from dro_jax.data.rewards import RewardStats

    if given is not None:
        if not os.path.isfile(given):
            raise InputError(f"--reward_stats={given}: no such file")
        return RewardStats.load(given), os.path.abspath(given)
    run_dir = checkpoints.run_dir_of(checkpoint)
    path = os.path.join(run_dir, "reward_stats.json") if run_dir else None
    if path and os.path.isfile(path):
        return RewardStats.load(path), path
    if run_dir and any(n.startswith("reward_stats.") for n in os.listdir(run_dir)):
        print(f"[evaluate] {run_dir} standardised each task of its mixture with its own statistics; "
              "this log's rewards are not standardised (pass --reward_stats=MODEL_DIR/reward_stats.TASK.json "
              "for the task it belongs to)", file=sys.stderr)
    return None, None


def _run_objective(checkpoint: str, args) -> tuple[float, str, str, Any]:
    """(tau, where it came from, log-prob normalisation, reward mapping) for log mode: the run's
    own, as its dro_jax_model.json records them, unless a flag overrides."""
    from dro_jax import checkpoints
    from dro_jax.data.rewards import RewardMapping

    run_dir = checkpoints.run_dir_of(checkpoint)
    meta = checkpoints.read_model_json(run_dir) if run_dir else {}
    objective, mapping = meta.get("objective") or {}, meta.get("reward_mapping") or {}
    recorded = objective.get("tau")
    if args.tau is not None:
        tau, source = args.tau, "--tau"
        if not (math.isfinite(tau) and tau > 0):
            raise InputError(f"--tau must be a finite number > 0, got {tau}")
        if recorded is not None and recorded != tau:
            print(f"[evaluate] --tau={tau} differs from the run's tau {recorded}", file=sys.stderr)
    elif recorded is not None:
        tau, source = float(recorded), "run"
    elif "model" in meta and meta.get("model") != "DROModel" and "objective" in meta:
        tau, source = 1.0, f"default (a {meta['model']} run has no tau)"
    else:
        tau, source = 1.0, "default (the checkpoint records no tau)"
    if run_dir and "reward_mapping" in meta and meta["reward_mapping"] is None \
            and args.thumbs_up is None and args.thumbs_down is None:
        print("[evaluate] the run's tasks map thumbs to rewards differently; using +1/-1 (pass --thumbs_up and "
              "--thumbs_down)", file=sys.stderr)
    up = args.thumbs_up if args.thumbs_up is not None else mapping.get("thumbs_up", 1.0)
    down = args.thumbs_down if args.thumbs_down is not None else mapping.get("thumbs_down", -1.0)
    try:
        reward_mapping = RewardMapping(thumbs_up=up, thumbs_down=down)
    except ValueError as e:
        raise InputError(f"--thumbs_up/--thumbs_down: {e}") from None
    return tau, source, objective.get("logprob_normalization", "sum"), reward_mapping


def _check_ref_lengths(records, vocabulary, inputs_length: int, targets_length: int) -> None:
    """The log's ref_logprobs must have been scored at lengths that cut each record as these do."""
    from dro_jax.data import logs

    if not any(r.ref_lengths for r in records):
        return
    n_tokens = lambda text: len(vocabulary.encode(text)) + 1  # with EOS, as tokenize() cuts
    logs.check_ref_logprob_lengths(records, np.array([n_tokens(r.prompt) for r in records]),
                                   np.array([n_tokens(r.response) for r in records]),
                                   {"inputs": inputs_length, "targets": targets_length})


def check_same_vocabulary(policy_vocab, reference_vocab, reference_path: str) -> None:
    """The reference must read the same token ids as the policy: else its log-probs are of
    other text, and the log-ratios mean nothing."""
    same = (type(policy_vocab) is type(reference_vocab)
            and getattr(policy_vocab, "extra_ids", 0) == getattr(reference_vocab, "extra_ids", 0)
            and getattr(policy_vocab, "sp_model", None) == getattr(reference_vocab, "sp_model", None))
    if not same:
        raise InputError(f"--reference={reference_path} has another vocabulary than --checkpoint "
                         f"({type(reference_vocab).__name__} against {type(policy_vocab).__name__}, or another "
                         "SentencePiece model or extra ids); use a reference that shares the policy's")


def _check_outputs(args) -> None:
    """Before any work: no output may be an input (links included) or the other output, and an
    existing output needs --overwrite; all must be writable. One line naming the flags."""
    from dro_jax import io_utils
    from dro_jax.data import logs

    outputs = [(flag, path) for flag, path in (("--output", args.output), ("--samples_output", args.samples_output))
               if path]
    inputs = [("--prompts", args.prompts)] if args.prompts is not None else []
    if args.log is not None:
        inputs += [("--log", f) for f in logs.expand_paths(args.log)]
    for flag, path in outputs:
        for in_flag, in_path in inputs:
            if io_utils.same_file(path, in_path):
                raise InputError(f"{flag}={path} is the {in_flag} file; write to a new file")
    if len(outputs) == 2 and io_utils.same_file(outputs[0][1], outputs[1][1]):
        raise InputError("--samples_output and --output are the same file; give two names")
    for flag, path in outputs:
        io_utils.check_new_output(path, flag, overwrite=args.overwrite)
        io_utils.check_writable_file(path, flag)


def _run(args) -> dict[str, Any]:
    from dro_jax import gin_utils
    from dro_jax.data import logs

    if (args.log is None) == (args.prompts is None):
        raise InputError("give exactly one of --log=FILE (feedback log) or --prompts=FILE (reward function)")
    _check_outputs(args)
    _check_mode_flags(args)
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    given = {"inputs": args.inputs_length}
    if args.log is not None:  # reward mode samples up to --max_length instead
        given["targets"] = args.targets_length
    lengths = default_lengths(args.checkpoint, given, {"inputs": 512, "targets": 256}, "evaluate")
    args.inputs_length, args.targets_length = lengths["inputs"], lengths.get("targets", 256)
    if min(args.batch_size, args.max_length, args.inputs_length, args.targets_length) < 1:
        raise InputError("--batch_size and the lengths must be positive")
    if args.log is not None:
        tau, tau_source, normalization, mapping = _run_objective(args.checkpoint, args)
        records = logs.load_feedback_log(args.log, reward_mapping=mapping)
        policy = Policy.load(args.checkpoint, args.vocabulary)
        reference = Policy.load(args.reference, args.vocabulary) if args.reference else None
        if reference is not None:
            check_same_vocabulary(policy.vocabulary, reference.vocabulary, args.reference)
        has_ref = reference is None and logs.check_ref_logprobs(records)  # an explicit --reference wins
        if reference is not None and any(r.ref_logprob is not None for r in records):
            print("[evaluate] --reference given: the log's ref_logprob fields are not used", file=sys.stderr)
        if not has_ref and reference is None:
            raise InputError(f"{args.log}: records carry no ref_logprob; pass --reference=CKPT")
        if has_ref:
            _check_ref_lengths(records, policy.vocabulary, args.inputs_length, args.targets_length)
        raw = np.array([r.reward for r in records], np.float64)
        stats, stats_path = _reward_stats_for(args.checkpoint, args.reward_stats)
        rewards = stats.standardize(raw) if stats is not None else raw
        # thumbs by their label; a scalar reward is "up" above 0 as the run sees it (standardised)
        positive = np.array([r.label if r.label is not None else rw > 0 for r, rw in zip(records, rewards)], bool)
        out = log_metrics(policy, [r.prompt for r in records], [r.response for r in records], rewards, positive,
                          ref_logprobs=np.array([r.ref_logprob for r in records]) if has_ref else None,
                          reference=reference, tau=tau, inputs_length=args.inputs_length,
                          targets_length=args.targets_length, batch_size=args.batch_size, progress=True,
                          logprob_normalization=normalization,
                          weights=np.array([1.0 if r.weight is None else r.weight for r in records]))
        out["tau_source"] = tau_source
        out["reward_mapping"] = {"thumbs_up": mapping.thumbs_up, "thumbs_down": mapping.thumbs_down}
        out["reward_standardization"] = stats_path or "none"
        out["reference_source"] = "log ref_logprob" if has_ref else os.path.abspath(args.reference)
        out["mode"] = "log"
        return out
    # reward-function mode
    if not args.gin_files and not args.gin_bindings:
        raise InputError("reward mode needs a gin file binding evaluate.reward_settings.reward_fn "
                         "(e.g. --gin_file=gin_configs/demo/evaluate_reward.gin)")
    try:
        gin_utils.parse(args.gin_files, args.gin_bindings)
        reward_fn, threshold = _gin_reward_settings()
    except FileNotFoundError:
        raise
    except Exception as e:  # gin raises many types
        raise InputError(f"gin config: {gin_utils.error_line(e, with_location=True)}") from None
    if reward_fn is None or not callable(reward_fn):
        raise InputError("gin: evaluate.reward_settings.reward_fn is not bound to a callable")
    prompts = [r["prompt"] for r in read_prompts(args.prompts)]
    policy = Policy.load(args.checkpoint, args.vocabulary)
    reference = Policy.load(args.reference, args.vocabulary) if args.reference else None
    if reference is not None:
        check_same_vocabulary(policy.vocabulary, reference.vocabulary, args.reference)
    samples: list = []
    out = reward_metrics(policy, prompts, reward_fn, reference=reference, threshold=float(threshold),
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         inputs_length=args.inputs_length, max_length=args.max_length,
                         batch_size=args.batch_size, seed=args.seed, progress=True, samples=samples)
    if args.samples_output:
        from dro_jax.demo.env import write_jsonl

        try:  # atomic: nothing half-written is left
            write_jsonl(args.samples_output, ({"prompt": p, "response": r, "reward": w} for p, r, w in samples))
        except OSError as e:
            raise InputError(f"--samples_output={args.samples_output}: cannot write ({e.strerror or e})") from None
    if reference is None:  # say why there is no KL, rather than leave it out without a word
        out["kl_to_reference_note"] = "not computed: pass --reference=CKPT to estimate KL(pi || pi_ref)"
        print("[evaluate] no --reference given, so kl_to_reference is not reported", file=sys.stderr)
    out["mode"] = "reward"
    return out


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from dro_jax.checkpoints import CheckpointError
    from dro_jax.data.logs import BadRecordError

    from dro_jax import io_utils

    t0 = time.time()
    try:
        with io_utils.sigterm_interrupts():
            out = _run(args)
    except (InputError, BadRecordError, CheckpointError, FileNotFoundError, ValueError) as e:
        msg = str(e).strip()
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # an evaluation is short next to training: it keeps nothing
        how = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        print(f"[evaluate] stopped by {how}; nothing was written", file=sys.stderr)
        return 143 if how == "SIGTERM" else 130
    out["checkpoint"] = os.path.abspath(args.checkpoint)
    text = json.dumps(out, indent=2, sort_keys=True)
    if args.output:
        try:
            io_utils.write_text_atomically(args.output, [text + "\n"])
        except OSError as e:
            print(f"error: --output={args.output}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    print(text)
    print(f"[evaluate] done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
