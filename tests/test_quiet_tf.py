"""TensorFlow's C++ start-up lines are filtered from stderr; everything else written there stays."""
import os
import subprocess
import sys

from dro_jax import _quiet_tf


def test_filtered_stderr_drops_only_the_known_start_up_lines(capfd):
    with _quiet_tf.filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1.2 7 port.cc:153] oneDNN custom operations are on. You may see ...\n"
                    b"a real error line\n"
                    b"I0000 00:00:1.3 7 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
    assert capfd.readouterr().err == "a real error line\n"


def test_importing_tensorflow_after_dro_jax_prints_nothing():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # as the CLIs set it; the import's lines ignore it
    code = "import dro_jax, tensorflow as tf, sys; print(tf.constant(2).numpy() * 3); print('err', file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6"]
    assert proc.stderr == "err\n", proc.stderr  # no oneDNN / absl / cuda lines; later output untouched
