"""TensorFlow's C++ start-up lines, filtered out of stderr.

Importing TensorFlow (seqio does) writes "All log messages before absl::InitializeLog() ...",
oneDNN and "Could not find cuda drivers" lines straight to file descriptor 2, whatever
TF_CPP_MIN_LOG_LEVEL says (tensorflow/tensorflow#100442), so every tool that reads logs
printed them before its own output. While TensorFlow's import runs, descriptor 2 goes to a
temporary file; afterwards every other line is written back, so real errors still show.
`install()` hooks the first `import tensorflow` of the process, wherever it happens.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow")


@contextlib.contextmanager
def filtered_stderr():
    """Descriptor 2 into a temporary file for the block; then its lines, less NOISE, back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not NOISE.search(line)]
            if kept:
                os.write(2, "".join(kept).encode())


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader's exec_module under filtered_stderr; delegates everything else."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self._loader  # leave no trace of the hook
        with filtered_stderr():
            self._loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TensorflowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import per process
        spec = importlib.util.find_spec(name)  # the other finders, as if we were not here
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    if "tensorflow" not in sys.modules and not any(
            isinstance(f, _TensorflowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorflowFinder())
