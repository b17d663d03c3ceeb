"""`python -m dro_jax.demo [--output=reports/demo] [--rounds=N] [--reduced] [--seed=S]`

The end-to-end feedback loop on the embedded environment (dro_jax/demo/env.py), no download:
SFT a tiny T5 reference on imperfect demonstrations, sample a thumbs-up/down log from it
(labelled by the hidden rater), score reference log-probs, train DRO-V, KTO and filtered SFT
on that log with the same budget, and evaluate each by sampling on held-out prompts.
Writes results.json, results.md and PNG plots to --output and prints the table.
Exit status: 0 done, 1 a training run failed or was stopped (SIGTERM or a first Ctrl-C: the trainer saves and returns;
the demo then writes no report), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys


def _parse_args(argv):
    from dro_jax.demo.pipeline import METHODS

    p = argparse.ArgumentParser(prog="python -m dro_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="reports/demo", help="report folder (run directories go in OUTPUT/runs)")
    p.add_argument("--rounds", type=int, default=1, help="iterated DRO-V: rounds of fresh logs (>= 1)")
    p.add_argument("--reduced", action="store_true", help="small, fast variant (the test suite's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.add_argument("--sft_steps", type=int, default=None)
    p.add_argument("--eval_every", type=int, default=None)
    p.add_argument("--n_log", type=int, default=None, help="feedback-log size")
    p.add_argument("--n_eval", type=int, default=None, help="held-out prompts")
    p.add_argument("--label_noise", type=float, default=None)
    p.add_argument("--follow_prob", type=float, default=None, help="how often the SFT demonstrator is right")
    p.add_argument("--tau", type=float, default=None)
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


def _check_output(output: str) -> None:
    """OUTPUT and OUTPUT/runs are folders, or can be made as ones."""
    existing = os.path.join(os.path.abspath(output), "runs")
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output={output}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output={output}: cannot write in {existing}")


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
        if not (math.isfinite(cfg.tau) and cfg.tau > 0):
            raise ValueError(f"--tau must be a finite number > 0, got {cfg.tau}")
        if cfg.n_log < cfg.batch_size:
            raise ValueError(f"--n_log must be at least the batch size {cfg.batch_size}, got {cfg.n_log}")
        # derived seeds reach seed * 1000 + 100 + rounds: numpy wants them >= 0, JAX within int64
        max_seed = (2 ** 63 - 1 - 100 - cfg.rounds) // 1000
        if not 0 <= cfg.seed <= max_seed:
            raise ValueError(f"--seed must be in [0, {max_seed}], got {cfg.seed}")
        _check_prompt_counts(cfg, pipeline, given=overrides)
        _check_output(args.output)
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
    out = os.path.abspath(args.output)
    print(f"[demo] writing to {out} ({'reduced' if args.reduced else 'full'} demo, seed {args.seed}, "
          f"{args.rounds} round(s))", flush=True)
    demo = pipeline.Demo(cfg, os.path.join(out, "runs"))
    try:
        results = demo.run()
    except pipeline.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = report.write(results, out)
    print()
    print(report.markdown_table(results))
    print()
    print(f"[demo] done in {results['wall_time_s']:.0f}s; report: {files['table']}, {files['results']}"
          + "".join(f", {os.path.join(out, p)}" for p in results.get("plots", [])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
