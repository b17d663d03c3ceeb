"""t5x-style gin command lines: --gin_file=F (repeatable) and --gin.BINDING=VALUE."""
from __future__ import annotations

import os
import sys
from typing import Sequence

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Returns (gin files, gin bindings, other args) from a command line."""
    files, bindings, rest = [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file":
            files.append(next(it, ""))
        elif arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append(f"{name} = {value}")
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return files, bindings, rest


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files and bindings; `tasks.*` and `gin_configs/...` resolve from the
    working directory or, failing that, the repo this package was installed from."""
    for root in (os.getcwd(), REPO_ROOT):
        if root not in sys.path and os.path.isdir(os.path.join(root, "tasks")):
            sys.path.append(root)
        gin.add_config_file_search_path(root)
    for f in files:
        if not os.path.isfile(f) and not any(os.path.isfile(os.path.join(r, f)) for r in (os.getcwd(), REPO_ROOT)):
            raise FileNotFoundError(f"--gin_file={f}: no such file")
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)


def error_line(e: BaseException, with_location: bool = False) -> str:
    """One line for the user: gin appends multi-line context to error messages."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if with_location:
        where = [l for l in lines[1:] if l.startswith("In file")]
        if where:
            first += f" ({where[0][len('In '):]})"
    return first
