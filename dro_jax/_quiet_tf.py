"""TensorFlow's C++ start-up lines, filtered out of stderr.

Importing TensorFlow (seqio does) writes "All log messages before absl::InitializeLog() ...",
oneDNN and "Could not find cuda drivers" lines straight to file descriptor 2, whatever
TF_CPP_MIN_LOG_LEVEL says (tensorflow/tensorflow#100442), so every tool that reads logs
printed them before its own output. While TensorFlow's import runs, descriptor 2 is a pipe
into a small filter process that passes every other line on as it comes: real errors show,
in order, even when the import aborts the process. `install()` hooks the process's first
import of TensorFlow, wherever it happens; without a usable stderr nothing is filtered.
"""
from __future__ import annotations

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
         r"|To enable the following instructions: .* in other operations, rebuild TensorFlow")

# The filter is a separate process, not a thread: TensorFlow writes while this process holds
# the GIL (loading its libraries), and an abort must not lose the lines before it.
_FILTER = """import re, sys
noise = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if not noise.search(line.decode(errors="replace")):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def filtered_stderr():
    """Descriptor 2 goes through the NOISE filter for the block."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # stderr closed: nothing to filter
        yield
        return
    try:
        if not sys.executable:  # an embedded interpreter: no Python to run the filter with
            raise OSError("no sys.executable")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, NOISE],
                                stdin=subprocess.PIPE, stdout=saved, stderr=saved)
    except OSError:
        os.close(saved)
        yield
        return
    os.dup2(proc.stdin.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        proc.stdin.close()  # end of input: the filter flushes and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


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
        with filtered_stderr():
            self._loader.exec_module(module)

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
