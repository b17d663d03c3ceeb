"""t5x-style gin command lines: --gin_file=F (repeatable) and --gin.BINDING=VALUE."""
from __future__ import annotations

import ast
import difflib
import os
import re
import sys
from typing import Iterator, Sequence

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Binding(str):
    """A gin binding from the command line that remembers its flag (`--gin.` or `--gin_bindings`),
    so that an error names the flag the user typed. A plain string reads as `--gin.`."""

    flag: str = "--gin."

    def __new__(cls, text: str, flag: str = "--gin."):
        self = super().__new__(cls, text)
        self.flag = flag
        return self


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Returns (gin files, gin bindings, other args) from a command line; each binding is a
    `Binding`, a str that knows its flag."""
    files, bindings, rest = [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file":
            files.append(next(it, ""))
        elif arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append(Binding(f"{name} = {value}", "--gin."))
        elif arg.startswith("--gin_bindings="):
            bindings.append(Binding(arg.split("=", 1)[1], "--gin_bindings"))
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
    gin.parse_config_files_and_bindings(list(files), [], finalize_config=False)
    for binding in bindings:  # one at a time, so an error names its flag
        try:
            gin.parse_config(binding)
        except Exception as e:  # gin raises many types
            raise ValueError(_binding_error(binding, e)) from None
    _check_macros_used(bindings)


def _from_gin_bindings(binding: str) -> bool:
    return getattr(binding, "flag", "--gin.") == "--gin_bindings"


def _binding_error(binding: str, e: BaseException) -> str:
    name, eq, value = (part.strip() for part in binding.partition("="))
    if not eq or "\n" in binding or _from_gin_bindings(binding):  # as the user typed it
        flag = f"--gin_bindings={str(binding)!r}"
        quoted = f'--gin_bindings="{name} = \'{value}\'"'
    else:
        flag = f"--gin.{name}={value}"
        quoted = f"--gin.{name}=\"'{value}'\""
    if eq and "\n" not in binding:
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if not value.startswith(("@", "%", "[", "{", "(", "'", '"')):
                # gin reads a bare word as a reference it cannot resolve; a quoted one is a string
                return f"{flag}: cannot parse the value (a string needs inner quotes: {quoted})"
    return f"{flag}: {error_line(e, with_location=True)}"


def _macro_refs(value) -> Iterator[str]:
    """Names of the macros (`%NAME`) a bound value refers to, at any depth."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.selector == "gin.macro":
            yield value.scoped_selector.rsplit("/", 1)[0]
    elif isinstance(value, dict):
        for v in value.values():
            yield from _macro_refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _macro_refs(v)


def _macros() -> tuple[set[str], set[str]]:
    """(macros some binding refers to, macros that are set) in gin's current config."""
    # gin keeps no public index of references; its binding table is stable across releases.
    table = gin.config._CONFIG  # pylint: disable=protected-access
    used = {name for params in table.values() for v in params.values() for name in _macro_refs(v)}
    return used, {sel for sel, fn in table if fn == "gin.macro"}


def _check_macros_used(bindings: Sequence[str]) -> None:
    """A macro set on the command line that no config refers to is a typo (t5x ignores it)."""
    given = [(b.split("=", 1)[0].strip(), b) for b in bindings]
    macros = [(g, b) for g, b in given if g and "." not in g and "/" not in g]
    if not macros:
        return
    used, defined = _macros()
    for name, binding in macros:
        if name not in used:
            close = difflib.get_close_matches(name, sorted(defined & used), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            flag = f"--gin_bindings={str(binding)!r}" if _from_gin_bindings(binding) else f"--gin.{name}"
            raise ValueError(f"{flag}: no gin file uses the macro %{name}{hint}")


def undefined_macros() -> list[str]:
    """Macros (`%NAME`) that some binding refers to but nothing sets."""
    used, defined = _macros()
    return sorted(used - defined)


def error_line(e: BaseException, with_location: bool = False) -> str:
    """One line for the user: gin appends multi-line context to error messages."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    # A scoped configurable (policy/ or value/ OptimizerConfig): say which one the message is about.
    scoped = re.search(r"In call to configurable '(\w+)' .* in scope '([\w/]+)'", str(e))
    if scoped and first.startswith(scoped.group(1) + "."):
        first = f"{scoped.group(2)}/{first}"
    if with_location:
        where = [l for l in lines[1:] if l.startswith("In file")]
        if where:
            first += f" ({where[0][len('In '):]})"
    return first
