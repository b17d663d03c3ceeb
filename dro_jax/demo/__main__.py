"""`python -m dro_jax.demo [--output=reports/demo] [--rounds=N] [--reduced] [--seed=S]`

The end-to-end feedback loop on the embedded environment (dro_jax/demo/env.py), no download:
SFT a tiny T5 reference on imperfect demonstrations, sample a thumbs-up/down log from it
(labelled by the hidden rater), score reference log-probs, train DRO-V, KTO and filtered SFT
on that log with the same budget, and evaluate each by sampling on held-out prompts.
Writes results.json, results.md and PNG plots to --output and prints the table. An --output
that a previous demo wrote is replaced (its report and runs/ first); one holding anything else is
refused. Exit status: 0 done, 1 a training run failed or was stopped by a first Ctrl-C (the
trainer saves and returns; the demo then writes no report), 2 bad arguments, 130 Ctrl-C outside a
training run or in its last step, 143 SIGTERM (during a training run's steps, after that run
has saved its step; one line, no report).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys

# Written first into --output: a later demo may replace what is there, and nothing else.
MARKER = ".dro_jax_demo"
REPORT_FILES = ("results.json", "results.md", "thumbs_up_over_steps.png", "thumbs_up_vs_kl.png")


def _parse_args(argv):
    from dro_jax.demo.pipeline import METHODS

    from dro_jax.demo.pipeline import DemoConfig

    full, reduced = DemoConfig(), DemoConfig.reduced()
    default = lambda name: f"default {getattr(full, name)}, {getattr(reduced, name)} with --reduced"
    p = argparse.ArgumentParser(prog="python -m dro_jax.demo", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--output", default="reports/demo",
                   help="report folder (run directories go in OUTPUT/runs); a previous demo's is replaced")
    p.add_argument("--rounds", type=int, default=1, help="iterated DRO-V: rounds of fresh logs (>= 1)")
    p.add_argument("--reduced", action="store_true", help="small, fast variant (the test suite's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts, the labels, training and sampling")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per method ({default('steps')})")
    p.add_argument("--sft_steps", type=int, default=None, help=f"SFT steps of the reference ({default('sft_steps')})")
    p.add_argument("--eval_every", type=int, default=None,
                   help=f"steps between held-out evaluations, for the curves ({default('eval_every')})")
    p.add_argument("--n_log", type=int, default=None, help=f"feedback-log size ({default('n_log')})")
    p.add_argument("--n_eval", type=int, default=None, help=f"held-out prompts ({default('n_eval')})")
    p.add_argument("--label_noise", type=float, default=None,
                   help=f"share of the log's thumbs the user flips ({default('label_noise')})")
    p.add_argument("--follow_prob", type=float, default=None,
                   help=f"how often the SFT demonstrator is right ({default('follow_prob')})")
    p.add_argument("--tau", type=float, default=None, help=f"DRO-V's KL strength ({default('tau')})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    return p.parse_args(argv)


def _compilation_cache() -> None:
    """Reuses XLA compilations across demo runs (most of a tiny run's CPU time is compiling).

    DRO_JAX_COMPILATION_CACHE=DIR picks the folder; an empty value turns it off.
    """
    path = os.environ.get("DRO_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "dro_jax", "jax_compilation_cache"))
    if not path:
        return
    try:
        import jax

        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception as e:  # an optional speed-up only
        print(f"[demo] no compilation cache ({e})", file=sys.stderr)


def _check_prompt_counts(cfg, pipeline, given) -> None:
    """--n_log / --n_eval within what the environment can draw (held-out prompts differ from the rest)."""
    env = cfg.environment()
    limit = env.max_draw()
    if cfg.n_sft + cfg.n_log + cfg.n_eval <= limit:  # fits whatever the overlap
        return
    max_log, max_eval = pipeline.prompt_limits(cfg)
    if cfg.n_log <= max_log:
        return
    why = (f"(held-out prompts differ from the {cfg.n_sft} SFT and the log prompts; one draw may use at most "
           f"{limit} of the environment's {env.capacity()})")
    # Name the flag the user set; with both set, the held-out count unless no log size would do.
    if "n_eval" in given and ("n_log" not in given or max_eval >= 1) or max_log < cfg.batch_size:
        raise ValueError(f"--n_eval must be at most {max_eval} with --n_log={cfg.n_log} {why}, got {cfg.n_eval}")
    raise ValueError(f"--n_log must be at most {max_log} with --n_eval={cfg.n_eval} {why}, got {cfg.n_log}")


def _check_output(output: str) -> bool:
    """OUTPUT and OUTPUT/runs are folders, or can be made as ones; an existing OUTPUT is empty or
    a demo's. True when it holds a previous demo's output (replaced at start)."""
    out = os.path.abspath(output)
    existing = os.path.join(out, "runs")
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output={output}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output={output}: cannot write in {existing}")
    if not os.path.isdir(out) or not os.listdir(out):
        return False
    if _is_demo_output(out):
        return True
    raise ValueError(f"--output={output}: {out} holds files that are not a demo's (such as "
                     f"{sorted(os.listdir(out))[0]}), which the demo would not replace; give a new or empty folder, "
                     "or remove it")


def _is_demo_output(out: str) -> bool:
    if os.path.isfile(os.path.join(out, MARKER)):
        return True
    from dro_jax.demo.pipeline import METHODS

    # A demo from before the marker, stopped before its report: runs/ alone, with the held-out
    # prompts it writes before any training, and run folders of the demo's names.
    runs = os.path.join(out, "runs")
    known = {"data", "reference", "reference_model", *METHODS}
    if os.listdir(out) == ["runs"] and os.path.isfile(os.path.join(runs, "data", "eval_prompts.jsonl")) and all(
            name in known or name.startswith("dro_v_round") for name in os.listdir(runs)):
        return True
    try:  # a report from before the marker
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        return isinstance(results, dict) and {"methods", "config", "wall_time_s"} <= set(results)
    except (OSError, ValueError):
        return False


def _replace_output(out: str, previous: bool) -> None:
    """A demo's output: the marker, and nothing of a previous demo's report or runs."""
    os.makedirs(out, exist_ok=True)
    if previous:
        shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)
        for name in REPORT_FILES:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by python -m dro_jax.demo; a later demo replaces this folder's report and runs/\n")


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from dro_jax.demo import pipeline, report

    overrides = {k: getattr(args, k) for k in ("steps", "sft_steps", "eval_every", "n_log", "n_eval",
                                               "label_noise", "follow_prob", "tau") if getattr(args, k) is not None}
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        bad = [m for m in methods if m not in pipeline.METHODS]
        if bad or not methods:
            raise ValueError(f"--methods: unknown {bad or 'empty'}; choose from {','.join(pipeline.METHODS)}")
        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        if args.rounds > 1 and "dro_v" not in methods:
            raise ValueError(f"--rounds={args.rounds}: later rounds retrain DRO-V on a fresh log; add dro_v to --methods")
        cfg = (pipeline.DemoConfig.reduced if args.reduced else pipeline.DemoConfig)(
            seed=args.seed, rounds=args.rounds, methods=methods, **overrides)
        try:
            cfg.environment()  # validates follow_prob / label_noise
        except ValueError as e:
            raise ValueError(f"--{e}") from None  # its messages start with the field's name
        for flag in ("steps", "sft_steps", "eval_every", "n_eval"):
            if getattr(cfg, flag) < 1:
                raise ValueError(f"--{flag} must be positive, got {getattr(cfg, flag)}")
        if cfg.eval_every > cfg.steps:
            if "eval_every" in overrides:
                raise ValueError(f"--eval_every must be at most --steps ({cfg.steps}) for a curve, got {cfg.eval_every}")
            cfg.eval_every = cfg.steps  # a --steps below the default period: one point at the end
        if not (math.isfinite(cfg.tau) and cfg.tau > 0):
            raise ValueError(f"--tau must be a finite number > 0, got {cfg.tau}")
        if cfg.n_log < cfg.batch_size:
            raise ValueError(f"--n_log must be at least the batch size {cfg.batch_size}, got {cfg.n_log}")
        # derived seeds reach seed * 1000 + 100 + rounds: numpy wants them >= 0, JAX within int64
        max_seed = (2 ** 63 - 1 - 100 - cfg.rounds) // 1000
        if not 0 <= cfg.seed <= max_seed:
            raise ValueError(f"--seed must be in [0, {max_seed}], got {cfg.seed}")
        _check_prompt_counts(cfg, pipeline, given=overrides)
        previous = _check_output(args.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Process-wide settings only once the flags are good (main may run inside another program).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "seqio", "dro_jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    _compilation_cache()
    from dro_jax import io_utils

    out = os.path.abspath(args.output)
    print(f"[demo] writing to {out} ({'reduced' if args.reduced else 'full'} demo, seed {args.seed}, "
          f"{args.rounds} round(s)){'; replacing the previous demo there' if previous else ''}", flush=True)
    _replace_output(out, previous)
    demo = pipeline.Demo(cfg, os.path.join(out, "runs"))
    try:
        with io_utils.sigterm_interrupts():
            results = demo.run()
    except pipeline.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C outside a run's steps, or SIGTERM (after a run's save)
        sigterm = str(e) == "SIGTERM"
        print(f"error: stopped by {'SIGTERM' if sigterm else 'Ctrl-C'} ({demo.say.last or 'starting'}); "
              "nothing is reported", file=sys.stderr)
        return 143 if sigterm else 130
    files = report.write(results, out)
    print()
    print(report.markdown_table(results))
    print()
    print(f"[demo] done in {results['wall_time_s']:.0f}s; report: {files['table']}, {files['results']}"
          + "".join(f", {os.path.join(out, p)}" for p in results.get("plots", [])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
