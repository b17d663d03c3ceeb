"""Small file helpers shared by the command-line tools."""
from __future__ import annotations

import os
import tempfile


def check_writable_file(path: str, flag: str) -> None:
    """Fails early (before minutes of scoring or sampling) when `path` cannot be written.

    Creates nothing (a run stopped by bad input leaves no empty folders): it probes the nearest
    existing parent. Raises ValueError with one line naming the flag.
    """
    path = os.path.abspath(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory")
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NotADirectoryError(20, f"{parent} is a file, not a directory")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".dro_jax_write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot write ({e.strerror or e})") from None


def check_writable_dir(path: str, name: str) -> None:
    """`path` must be (or be creatable as) a directory we can write. Creates nothing, so a run that
    fails later on bad input leaves no trace; raises ValueError with one line naming `name`."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name}={path}: {existing} is a file, not a directory")
    try:
        # a unique name: hosts sharing the file system probe at the same time
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".dro_jax_write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{name}={path}: cannot write in {existing} ({e.strerror or e})") from None
