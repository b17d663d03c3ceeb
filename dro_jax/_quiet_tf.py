"""TensorFlow's C++ start-up lines, filtered out of stderr.

Importing TensorFlow (seqio does) writes "All log messages before absl::InitializeLog() ...",
oneDNN and "Could not find cuda drivers" lines straight to file descriptor 2, whatever
TF_CPP_MIN_LOG_LEVEL says (tensorflow/tensorflow#100442), so every tool that reads logs
printed them before its own output. While TensorFlow's import runs, descriptor 2 is a pipe
into a small filter process that passes every other line on as it comes: real errors show,
in order, even when the import aborts the process. `install()` hooks the process's first
import of TensorFlow, wherever it happens; without a usable stderr nothing is filtered.

TensorFlow's first op and its datasets write more known-harmless lines later (a failed cuInit
where TensorFlow finds no usable GPU, TFRecordDataset's default buffer size, the DATA_LOSS
status of a corrupt TFRecord that the reader reports itself), unless TF_CPP_MIN_LOG_LEVEL
hides them. So in a dro_jax command-line process (`python -m dro_jax...`) the filter stays
for the rest of the process, and is drained at exit; a library import (pytest, a notebook)
filters the import only. A partial line that cannot be one of TensorFlow's (a progress bar's
`\r` update) is passed on at once.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.util
import os
import re
import subprocess
import sys

NOISE = (r"All log messages before absl::InitializeLog\(\) is called"
         r"|port\.cc:\d+\] oneDNN custom operations are on"
         r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
         r"|Unable to register cu(DNN|FFT|BLAS) factory"
         r"|computation placer already registered"
         r"|This TensorFlow binary is optimized to use available CPU instructions"
         r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
         # after the import: TensorFlow's own GPU attempt (dro_jax runs only data ops in it),
         r"|cuda_platform\.cc:\d+\] failed call to cuInit: "
         r"|tf_record_dataset_op\.cc:\d+\] TFRecordDataset `buffer_size` is unspecified"
         # and the status of an op that failed, which TensorFlow also raises in Python (where the
         # readers turn a corrupt TFRecord into one line naming the file and record)
         r"|local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: (DATA_LOSS|OUT_OF_RANGE): ")

# The filter is a separate process, not a thread: TensorFlow writes while this process holds
# the GIL (loading its libraries), and an abort must not lose the lines before it. It reads what
# is there, passes complete lines that are not noise, and a partial line at once unless it may be
# the start of one of TensorFlow's (`I0000 ...`, `WARNING: All log ...`), which it holds for the rest.
_FILTER = r"""import os, re, signal, sys
# Ctrl-C or a SIGTERM sent to the whole process group (a scheduler's preemption) is for the
# tool: the filter keeps passing its last lines on, and ends when its input does.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise = re.compile(sys.argv[1])
NOTE = b"WARNING: All log messages"

def maybe_tf(part):  # may be the start of a TensorFlow line: I0000 12:34:56.7 ..., or NOTE
    return (re.fullmatch(rb"[IWEF](\d{0,4}|\d{4} .*)", part, re.S) is not None
            or NOTE.startswith(part) or part.startswith(NOTE))

def passed(line):
    return b"" if noise.search(line.decode(errors="replace")) else line

tail = b""
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    *lines, tail = (tail + chunk).split(b"\n")
    keep = b"".join(passed(l + b"\n") for l in lines)
    if tail and (not chunk or not maybe_tf(tail)):  # a progress bar's "\r" update, or the end
        keep, tail = keep + passed(tail), b""
    if keep:
        try:
            sys.stdout.buffer.write(keep)
            sys.stdout.buffer.flush()
        except OSError:  # stderr gone: keep reading, so that the writers never block
            pass
    if not chunk:
        break
"""


def _start_filter():
    """Descriptor 2 into a new filter process: (process, saved descriptor 2), or None."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # stderr closed: nothing to filter
        return None
    try:
        if not sys.executable:  # an embedded interpreter: no Python to run the filter with
            raise OSError("no sys.executable")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, NOISE],
                                stdin=subprocess.PIPE, stdout=saved, stderr=saved)
    except OSError:
        os.close(saved)
        return None
    os.dup2(proc.stdin.fileno(), 2)
    return proc, saved


def _stop_filter(state, timeout: float = 30) -> None:
    """Descriptor 2 back as it was; waits for the filter to pass on what it has."""
    if state is None:
        return
    proc, saved = state
    with contextlib.suppress(OSError, ValueError):
        if sys.stderr is not None:
            sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    proc.stdin.close()  # end of input (once no other process holds the pipe): the filter exits
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


@contextlib.contextmanager
def filtered_stderr():
    """Descriptor 2 goes through the NOISE filter for the block."""
    state = _start_filter()
    try:
        yield
    finally:
        _stop_filter(state)


def _in_a_dro_jax_command() -> bool:
    """Whether this process runs one of dro_jax's command-line modules (`python -m dro_jax...`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return name == "dro_jax" or name.startswith("dro_jax.")


class _QuietLoader(importlib.abc.Loader):
    """The real loader, with exec_module under filtered_stderr; the hook ends with it."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)
        module.__spec__.loader = module.__loader__ = self._loader  # leave no trace of the hook
        if not _in_a_dro_jax_command():
            with filtered_stderr():
                self._loader.exec_module(module)
            return
        state = _start_filter()  # for the rest of the process: TensorFlow writes noise later too
        try:
            self._loader.exec_module(module)
        except BaseException:
            _stop_filter(state)
            raise
        if state is not None:
            # At exit: stderr back, and the filter's last lines out before the process ends (the
            # wait is short, since a child process may still hold the pipe, and the filter with it).
            atexit.register(_stop_filter, state, 5)

    def __getattr__(self, name):
        if name in ("_loader", "_finder"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._loader, name)


class _TensorflowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # find the real spec as if we were not here
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


def install() -> None:
    if "tensorflow" not in sys.modules and not any(
            isinstance(f, _TensorflowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorflowFinder())
