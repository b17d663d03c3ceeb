"""Small file helpers shared by the command-line tools."""
from __future__ import annotations

import os
import tempfile


def check_writable_file(path: str, flag: str) -> None:
    """Fails early (before minutes of scoring or sampling) when `path` cannot be written.

    Creates the parent directory; raises ValueError with one line naming the flag.
    """
    path = os.path.abspath(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot write ({e.strerror or e})") from None
