"""t5x-style gin command lines: --gin_file=F (repeatable) and --gin.BINDING=VALUE."""
from __future__ import annotations

import ast
import difflib
import io
import logging
import os
import re
import sys
import tokenize
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
        elif arg == "--gin_bindings":  # absl's form, as t5x users type it
            bindings.append(Binding(next(it, ""), "--gin_bindings"))
        else:
            rest.append(arg)
    return files, bindings, rest


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files and bindings; `tasks.*` and `gin_configs/...` resolve from the
    working directory or, failing that, the repo this package was installed from."""
    for root in _search_roots():
        if root not in sys.path and os.path.isdir(os.path.join(root, "tasks")):
            sys.path.append(root)
        if root not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
            gin.add_config_file_search_path(root)
    for f in files:
        if _resolve(f) is None:
            raise FileNotFoundError(f"--gin_file={f}: no such file")
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_gin_path_not_found)  # the error below says it, once
    try:
        gin.parse_config_files_and_bindings(list(files), [], finalize_config=False)
    except tokenize.TokenError as e:  # gin names neither the file nor a useful line
        raise ValueError(_token_error_where(files) or f"a gin file ends inside a bracket or string ({e.args[0]})") from None
    except ModuleNotFoundError as e:  # gin keeps only the message
        t5x = re.match(r"No module named '(t5x[\w.]*)'", str(e))
        if t5x:
            raise ValueError(f"No module named {t5x.group(1)!r}: this is a t5x recipe (gin_configs/t5x/), run it "
                             "with python -m t5x.train (README: Running under t5x)") from None
        raise
    finally:
        root_logger.removeFilter(_drop_gin_path_not_found)
    for binding in bindings:  # one at a time, so an error names its flag
        try:
            gin.parse_config(binding)
        except Exception as e:  # gin raises many types
            raise ValueError(_binding_error(binding, e)) from None
    _check_macros_used(bindings)


def _search_roots() -> list[str]:
    return list(dict.fromkeys((os.getcwd(), REPO_ROOT)))


def _resolve(path: str) -> str | None:
    """A gin file as gin finds it: as given, else under the working directory or the repo."""
    for candidate in [path] + [os.path.join(r, path) for r in _search_roots()]:
        if os.path.isfile(candidate):
            return candidate
    return None


def _drop_gin_path_not_found(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found:")


def config_files(files: Sequence[str]) -> list[str]:
    """The gin files a command line reads, with the files they `include`, in parse order."""
    out: list[str] = []

    def visit(path):
        found = _resolve(path)
        if found is None or found in out:
            return
        out.append(found)
        with open(found, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = re.match(r"\s*include\s+['\"](.+?)['\"]", line)
                if m:
                    visit(m.group(1))

    for path in files:
        visit(path)
    return out


def _token_error_where(files: Sequence[str]) -> str | None:
    """'FILE:LINE: ...' for the first gin file that Python's tokenizer (gin's) cannot finish:
    the line of the bracket or string left open."""
    for path in config_files(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        opened: list[tuple[str, int]] = []
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.OP and tok.string in "([{":
                    opened.append((tok.string, tok.start[0]))
                elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                    opened.pop()
        except tokenize.TokenError as e:
            if "string" in str(e.args[0]):
                return f"{path}:{e.args[1][0]}: a string opened here is never closed"
            if opened:
                bracket, line = opened[-1]
                return f"{path}:{line}: '{bracket}' opened here is never closed"
            return f"{path}: {e.args[0]}"
    return None


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
    if isinstance(e, tokenize.TokenError):
        return f"{flag}: the value ends inside an open bracket or string"
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


def _set_names(binding: str) -> list[str]:
    """The names a binding text sets, one per unindented `NAME = ...` line (`import`/`include` set
    none; indented lines under a `selector:` block set that selector's parameters)."""
    return [m.group(1) for m in re.finditer(r"^([\w./]+)\s*=", binding.strip(), re.MULTILINE)]


def _check_macros_used(bindings: Sequence[str]) -> None:
    """A macro set on the command line that no config refers to is a typo (t5x ignores it)."""
    given = [(name, b) for b in bindings for name in _set_names(b)]
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


def undefined_macro_error(files: Sequence[str], bindings: Sequence[str] = ()) -> str | None:
    """One line for the first macro used but never set: where it is used (the binding, and the
    file and line or the flag) and the set macro it is closest to; None when all are set."""
    missing = undefined_macros()
    if not missing:
        return None
    name = "MODEL_CONFIG" if "MODEL_CONFIG" in missing else missing[0]
    missing = [name] + [m for m in missing if m != name]
    if name == "MODEL_CONFIG":  # a recipe without a model size
        return ("%MODEL_CONFIG used but never set (add a model size: "
                "--gin_file=gin_configs/models/{tiny,small,base,large,xl,xxl}.gin)")
    table = gin.config._CONFIG  # pylint: disable=protected-access
    users = [f"{scope + '/' if scope else ''}{selector}.{param}" for (scope, selector), params in table.items()
             for param, v in params.items() if name in _macro_refs(v)]
    pattern = re.compile(r"%" + re.escape(name) + r"\b")
    where = []
    for path in config_files(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            where += [f"{path}:{i}" for i, line in enumerate(f, 1) if pattern.search(line.split("#", 1)[0])]
    where += [f"--gin.{_set_names(b)[0]}" if _set_names(b) and not _from_gin_bindings(b) else "--gin_bindings"
              for b in bindings if pattern.search(b)]
    _, defined = _macros()
    close = difflib.get_close_matches(name, sorted(defined), n=1)
    line = f"%{name} used but never set"
    if users:
        line += f", in {users[0]}"
    if where:
        line += f" ({where[0]})"
    line += f"; did you mean %{close[0]}?" if close else f" (set it with --gin.{name}=...)"
    return line + (f" ({len(missing) - 1} more unset: {', '.join('%' + m for m in missing[1:])})"
                   if len(missing) > 1 else "")


def error_line(e: BaseException, with_location: bool = False) -> str:
    """One line for the user: gin appends multi-line context to error messages."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    # A scoped configurable (policy/ or value/ OptimizerConfig): say which one the message is about.
    scoped = re.search(r"In call to configurable '(\w+)' .* in scope '([\w/]+)'", str(e))
    if scoped and first.startswith(scoped.group(1) + ".") and not scoped.group(2).isupper():  # not a macro's
        first = f"{scoped.group(2)}/{first}"
        rate = f"{scoped.group(2)}/OptimizerConfig.learning_rate "
        if scoped.group(2) in ("policy", "value") and first.startswith(rate):  # the recipes' macro for it
            first = f"{rate}({scoped.group(2).upper()}_LEARNING_RATE) {first[len(rate):]}"
    if with_location:
        where = [l for l in lines[1:] if l.startswith("In file")]
        if where:
            first += f" ({where[0][len('In '):]})"
    return first
