"""Small file helpers shared by the command-line tools."""
from __future__ import annotations

import os


def check_writable_file(path: str, flag: str) -> None:
    """Fails early (before minutes of scoring or sampling) when `path` cannot be written.

    Creates the parent directory; raises ValueError with one line naming the flag.
    """
    path = os.path.abspath(path)
    probe = f"{path}.write_test_{os.getpid()}"
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot write ({e.strerror or e})") from None
