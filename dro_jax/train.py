"""`python -m dro_jax.train --gin_file=gin_configs/runs/dro_tiny.gin --gin.MODEL_DIR="'DIR'"`

  --gin_file=F         a gin file (repeatable; later files override earlier ones)
  --gin.NAME=VALUE     one binding, e.g. --gin.TRAIN_STEPS=100 or --gin.MODEL_DIR="'runs/x'"
                       (a string needs inner quotes); a macro that no gin file uses is refused
  --gin_bindings='X = V'  the same in gin syntax (repeatable)

Gin configures `dro_jax.trainer.train` (see gin_configs/runs/*.gin and README: Gin macros).
The operative config is written to MODEL_DIR/config.gin; the same command resumes from
the latest checkpoint. Exit status: 0 done (or preempted and saved), 1 training failed,
2 bad input or configuration, 130 stopped by a second Ctrl-C (143: SIGTERM, only when `main` is
called under a Python SIGTERM handler of the caller's, after the save).
"""
from __future__ import annotations

import logging
import os
import re
import sys


def _setup_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Root at WARNING: gin logs every file it opens at INFO; the progress lines are ours.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dro_jax").setLevel(logging.INFO)


def _resume_point() -> str:
    """Where a rerun of the stopped run starts."""
    import gin

    from dro_jax import checkpoints

    try:
        model_dir = os.path.abspath(os.path.expanduser(gin.query_parameter("%MODEL_DIR")))
    except (ValueError, TypeError):  # stopped before MODEL_DIR was set or checked
        return "nothing was saved"
    latest = checkpoints.latest_step_dir(model_dir)
    if latest is None:
        return "no checkpoint was saved, so a rerun starts from the beginning"
    return f"the latest checkpoint, {latest}, is the resume point"


def _distributed_settings(environ) -> dict:
    """jax.distributed.initialize's arguments from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (jax reads only the first itself); none set: the cluster's (TPU, SLURM) own."""
    kwargs = {}
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = environ["JAX_COORDINATOR_ADDRESS"]
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if environ.get(name):
            try:
                kwargs[arg] = int(environ[name])
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r}: expected an integer") from None
    if ("num_processes" in kwargs) != ("process_id" in kwargs):
        raise ValueError("set JAX_NUM_PROCESSES and JAX_PROCESS_ID together (with JAX_COORDINATOR_ADDRESS)")
    if "num_processes" in kwargs and not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
        raise ValueError(f"JAX_PROCESS_ID={kwargs['process_id']} is not in [0, JAX_NUM_PROCESSES="
                         f"{kwargs['num_processes']})")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    _setup_logging()
    import gin
    import jax

    from dro_jax import checkpoints, gin_utils, trainer
    from dro_jax.data.logs import BadRecordError

    files, bindings, rest = gin_utils.split_gin_args(argv)
    if rest:
        hint = (" (a binding is one argument: --gin.NAME=VALUE)" if any(a.startswith("--gin.") for a in rest)
                else "")
        print(f"error: unknown arguments: {' '.join(rest)}{hint}", file=sys.stderr)
        return 2
    if not files:
        print("error: give at least one --gin_file=...", file=sys.stderr)
        return 2
    if os.environ.get("DRO_JAX_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            kwargs = _distributed_settings(os.environ)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        jax.distributed.initialize(**kwargs)
    try:
        gin_utils.parse(files, bindings)
    except Exception as e:  # gin raises many types; the user needs the one line that says where
        print(f"error: gin config: {gin_utils.error_line(e, with_location=True)}", file=sys.stderr)
        return 2
    try:
        gin.get_configurable(trainer.train)()
    except KeyboardInterrupt as e:  # a second Ctrl-C (or one during the last step, after its save)
        sigterm = str(e) == "SIGTERM"  # a caller's SIGTERM handler (io_utils.sigterm_interrupts)
        print(f"[train] stopped by {'SIGTERM' if sigterm else 'Ctrl-C'}; {_resume_point()}", file=sys.stderr)
        return 143 if sigterm else 130
    except (BadRecordError, FileNotFoundError, checkpoints.CheckpointError, trainer.TrainingError, ValueError) as e:
        if getattr(e, "internal_error", False):  # a bug inside training: the traceback, exit 1
            raise
        print(f"error: {gin_utils.error_line(e)}", file=sys.stderr)
        return 2 if not isinstance(e, trainer.TrainingError) else 1
    except OSError as e:  # a file outside the checkpoint save (run metadata, config.gin): disk full, permissions
        if e.filename is None and "[Errno " not in str(e):  # not a file's (gin re-raises it as text): keep its traceback
            raise
        print(f"error: {gin_utils.error_line(e)}", file=sys.stderr)
        return 1
    except TypeError as e:  # gin: a configurable called with missing or wrong bindings
        unset = gin_utils.undefined_macro_error(files, bindings) if "macro()" in str(e) else None
        if unset:
            print(f"error: gin config: {unset}", file=sys.stderr)
            return 2
        if "required keyword-only argument: 'model'" in str(e):
            print("error: gin config: nothing sets the model (trainer.train.model); give a recipe, e.g. "
                  "--gin_file=gin_configs/runs/dro.gin with a size from gin_configs/models/", file=sys.stderr)
            return 2
        # Only a call that gin's bindings cannot make is a config error; a TypeError from inside
        # training is a bug, and its traceback must show (gin tags both "In call to configurable").
        if not re.search(r"unexpected keyword argument|missing \d+ required|positional argument", str(e)):
            raise
        print(f"error: gin config: {gin_utils.error_line(e, with_location=True)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
