"""TensorFlow's C++ start-up lines are filtered from stderr; everything else written there stays."""
import os
import subprocess
import sys

from dro_jax import _quiet_tf

NOISE_LINES = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
               b"I0000 00:00:1.2 7 port.cc:153] oneDNN custom operations are on. You may see ...\n"
               b"I0000 00:00:1.3 7 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")


def _python(code, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # as the CLIs set it; the import's lines ignore it
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def test_filtered_stderr_drops_only_the_known_start_up_lines(capfd):
    with _quiet_tf.filtered_stderr():
        first, rest = NOISE_LINES.split(b"\n", 1)
        os.write(2, first + b"\na real error line\n" + rest)
    assert capfd.readouterr().err == "a real error line\n"


def test_lines_before_an_abort_are_not_lost():
    # TensorFlow aborts at import on an unsupported CPU, after saying why.
    proc = _python("import os\nfrom dro_jax import _quiet_tf\nwith _quiet_tf.filtered_stderr():\n"
                   f"    os.write(2, {NOISE_LINES!r} + b'the reason\\n')\n    os.abort()")
    assert proc.returncode != 0
    assert proc.stderr == "the reason\n", proc.stderr


def test_importing_tensorflow_after_dro_jax_prints_nothing():
    # An availability check first (transformers does one) must not disarm the filter.
    code = ("import dro_jax, importlib.util, sys; assert importlib.util.find_spec('tensorflow'); "
            "import tensorflow as tf; print(tf.constant(2).numpy() * 3); print('err', file=sys.stderr)")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6"]
    assert proc.stderr == "err\n", proc.stderr  # no oneDNN / absl / cuda lines; later output untouched
    # Without a stderr there is nothing to filter, and the import still works.
    proc = _python("import os; os.close(2); import dro_jax, tensorflow; print('ok')")
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"]
