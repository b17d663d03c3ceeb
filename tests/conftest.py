"""Test-wide setup: 8 fake CPU devices, set once before jax is imported."""
import os
import sys

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    # Tiny programs: LLVM's optimisation costs more than it saves (the suite is about a
    # quarter faster); results stay within every test's tolerance.
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# A suite started in the background of a script inherits Ctrl-C ignored, and so would the runs
# its Ctrl-C tests start (a run keeps an inherited SIG_IGN): behave as a terminal's job does.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gin files import `tasks.*` from the repo root (it is not installed).
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# One persistent XLA compilation cache for the session: the CLI tests start many
# processes that compile the same tiny programs.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    _cache = tempfile.mkdtemp(prefix="dro_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# Slowest files first: with `--dist loadfile`, pytest-xdist hands out files in collection
# order, so a long file collected last would run alone at the end (about 45 s of the wall time).
_SLOW_FILES_FIRST = ("test_train_cli.py", "test_scan_layers.py", "test_demo.py", "test_resume.py",
                     "test_train_step.py", "test_models.py", "test_bench.py", "test_infer_evaluate.py",
                     "test_validation.py", "test_infer_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
