"""TensorFlow's C++ start-up lines are filtered from stderr; everything else written there stays."""
import os
import re
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


RUNTIME_NOISE = (
    b"E0000 00:00:1795844317.437247   23409 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)\n"
    b"I0000 00:00:1795844341.241936   23784 tf_record_dataset_op.cc:390] TFRecordDataset `buffer_size` is "
    b"unspecified, default to 262144\n"
    b"W0000 00:00:1795844344.652781   23788 local_rendezvous.cc:412] Local rendezvous is aborting with status: "
    b"DATA_LOSS: corrupted record at 154\n")
REAL_ERRORS = (b"E0000 00:00:1.5 7 some_kernel.cc:9] a real failure\n"
               b"W0000 00:00:1.6 7 local_rendezvous.cc:412] Local rendezvous is aborting with status: "
               b"INVALID_ARGUMENT: a real one\n")


def test_filtered_stderr_drops_the_known_lines_of_later_tf_ops(capfd):
    with _quiet_tf.filtered_stderr():
        os.write(2, RUNTIME_NOISE + REAL_ERRORS + b"/x.tfrecord:3: record: corrupt TFRecord (corrupted record at 154)\n")
    assert capfd.readouterr().err == (REAL_ERRORS.decode()
                                      + "/x.tfrecord:3: record: corrupt TFRecord (corrupted record at 154)\n")


def test_a_partial_line_such_as_a_progress_bar_passes_at_once():
    # The filter must not hold a progress bar's "\r" update until a newline comes; the read below
    # blocks until it arrives (the limit only keeps a regression from hanging the suite).
    code = ("import os, select\nfrom dro_jax import _quiet_tf\nr, w = os.pipe()\nos.dup2(w, 2)\n"
            "with _quiet_tf.filtered_stderr():\n"
            "    os.write(2, b'\\rscore:  50%|#####     | 1/2')\n"
            "    ready = select.select([r], [], [], 120)[0]\n"
            "    print(repr(os.read(r, 100) if ready else None))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(b"\rscore:  50%|#####     | 1/2")


def _tfrecords(tmp_path):
    import tensorflow as tf

    b = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode()]))
    i = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    good = tmp_path / "good.tfrecord"
    with tf.io.TFRecordWriter(str(good)) as w:
        for k in range(3):
            w.write(tf.train.Example(features=tf.train.Features(feature=dict(
                prompt=b(f"p{k}"), response=b("r"), label=i(k % 2)))).SerializeToString())
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(good.read_bytes()[:-5] + b"xxxxx")
    return good, bad


def test_commands_print_none_of_tensorflows_known_lines(tmp_path):
    """validate and data.bench set no TF_CPP_MIN_LOG_LEVEL: TensorFlow's later lines are filtered there too."""
    good, bad = _tfrecords(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True,
                                       timeout=300)
    proc = run("dro_jax.data.validate", str(good))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = run("dro_jax.data.validate", str(bad))
    # the reader's own line says what TensorFlow's DATA_LOSS line said
    assert proc.returncode == 1 and proc.stderr == f"{bad}:3: record: corrupt TFRecord (corrupted record at 154)\n", \
        proc.stderr
    proc = run("dro_jax.data.bench", "--num_records=40", "--inputs_length=32", "--targets_length=32",
               "--batch_size=8")
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"^[IWEF]\d{4} ", proc.stderr, re.M), proc.stderr
    assert "packing:" in proc.stdout
