"""Small file helpers shared by the command-line tools."""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
import time
from typing import Any, Iterable

import numpy as np


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


def file_key(path: str):
    """Identity of a file: (device, inode) for an existing local one, so hard and symbolic links
    match; the resolved path for a missing one; the URL itself for a remote one."""
    if "://" in path:
        return path
    if not os.path.exists(path):
        return os.path.realpath(path)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (see `file_key`)."""
    return file_key(a) == file_key(b)


def check_new_output(path: str, flag: str, *, overwrite: bool) -> None:
    """An existing output file is replaced only with --overwrite; ValueError (one line) otherwise."""
    if not overwrite and os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} exists; pass --overwrite to replace it")


def write_text_atomically(path: str, lines: Iterable[str], *, compress: bool = False) -> None:
    """Writes `lines` (UTF-8; gzipped when `compress`) to `path` through a temporary file.

    The temporary file has a fresh name in `path`'s folder (`path + ".tmp"` could be a user's
    file, even an input) and is removed whatever fails (an error while producing or encoding the
    lines, an interrupt): `path` is either untouched or complete. Missing folders are created
    (and removed again when the write fails).
    """
    parent = os.path.dirname(os.path.abspath(path))
    created = []  # the folders this call makes, deepest first
    d = parent
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    tmp, done = None, False
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the output private
        finally:
            os.close(fd)
        with (gzip.open(tmp, "wt", encoding="utf-8") if compress
              else open(tmp, "w", encoding="utf-8")) as f:
            f.writelines(lines)
        os.replace(tmp, path)
        done = True
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
        for folder in () if done else created:
            try:
                os.rmdir(folder)  # only while empty
            except OSError:
                break


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


LOCK_FILE = ".dro_jax_train.lock"


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock, or it cannot be taken; one line."""


@contextlib.contextmanager
def exclusive_dir_lock(path: str, name: str):
    """Holds an exclusive lock on directory `path` (created if missing) while the block runs.

    flock(2) on `path/.dro_jax_train.lock`: the kernel drops it when the holder exits, even
    on kill -9, so a stale file never blocks a resume. The file records the holder (pid, host,
    start) for the error. On file systems without locks this warns and runs unlocked.
    """
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    except OSError as e:  # e.g. another user's lock file
        raise DirectoryInUse(f"{name}={path}: cannot open the lock file {lock_path} "
                             f"({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder may be between truncating and writing its note
                with open(lock_path, encoding="utf-8", errors="replace") as f:
                    holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            holder = holder or "unknown process"
            raise DirectoryInUse(f"{name}={path} is in use by another training run ({holder}); "
                                 f"wait for it or stop it, or choose another {name}") from None
        except OSError as e:  # e.g. ENOLCK on a file system without locking
            logging.getLogger(__name__).warning("%s=%s: cannot lock %s (%s); nothing stops a second run "
                                                "from writing here", name, path, lock_path, e.strerror or e)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class _DropMessages(logging.Filter):
    def __init__(self, containing: str):
        super().__init__()
        self.containing = containing

    def filter(self, record: logging.LogRecord) -> bool:
        return self.containing not in record.getMessage()


@contextlib.contextmanager
def without_absl_messages(containing: str):
    """Drops the absl log records whose message contains `containing`, for the block (orbax and
    seqio log through absl)."""
    absl_logger, drop = logging.getLogger("absl"), _DropMessages(containing)
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


class PartialOutput:
    """What an interrupted tool finished (the first `done` rows of an array), kept next to its
    output as OUTPUT.partial.npz with the settings that produced them: the same command continues
    from there, and other settings are refused (they would mix two runs in one output)."""

    SUFFIX = ".partial.npz"
    EVERY_S = 300.0  # also kept while it runs: a kill -9 loses at most this much

    def __init__(self, output: str, settings: dict[str, Any]):
        self.path = output + self.SUFFIX
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self._saved_at = time.time()

    def load(self, shape: tuple, dtype, *, overwrite: bool) -> tuple[int, np.ndarray]:
        """(rows done, an array of `shape` holding them); `overwrite` discards other settings' rows."""
        out = np.zeros(shape, dtype)
        if not os.path.exists(self.path):
            return 0, out
        try:
            with np.load(self.path) as f:
                saved, done, part = json.loads(str(f["settings"])), int(f["done"]), f["rows"]
        except Exception as e:  # pylint: disable=broad-except
            if overwrite:
                os.remove(self.path)
                return 0, out
            raise ValueError(f"{self.path}: cannot read what an interrupted run kept ({type(e).__name__}); "
                             "pass --overwrite (or delete it) to start over") from None
        if saved != self.settings:
            if overwrite:
                os.remove(self.path)
                return 0, out
            missing = sorted(set(self.settings) - set(saved))
            if missing:
                raise ValueError(f"{self.path} was written by an earlier dro_jax, which did not record "
                                 f"{', '.join(missing)}; pass --overwrite to start over")
            k = next(k for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} holds an interrupted run of other settings ({k}: {saved.get(k)!r}, now "
                             f"{self.settings.get(k)!r}); rerun that command to finish it, or pass --overwrite to "
                             "start over")
        out[:done] = part[:done]
        return done, out

    def save(self, rows: np.ndarray, done: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)),
                                   prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, settings=json.dumps(self.settings), done=done, rows=rows[:done])
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._saved_at = time.time()

    def maybe_save(self, rows: np.ndarray, done: int) -> None:
        if time.time() - self._saved_at >= self.EVERY_S:
            self.save(rows, done)

    def interrupted(self, e: KeyboardInterrupt, rows: np.ndarray, done: int, first: int, *, tool: str,
                    total: int, unit: str) -> tuple[str, str]:
        """Keeps the rows done since `first` and returns (Ctrl-C or SIGTERM, the line to print)."""
        if done > first:
            self.save(rows, done)
        how = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        kept = (f"what it finished is kept in {self.path}, and the same command continues from there"
                if done else "nothing to keep")
        return how, f"[{tool}] stopped by {how} after {done} of {total} {unit}; {kept}"

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a preemption, `kill`) raises KeyboardInterrupt('SIGTERM') as Ctrl-C does, so a tool
    keeps what it finished (Python's default ends the process at once)."""
    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def params_digest(params) -> str:
    """sha256 of a strided sample (about 4k values) of each parameter, in path order: tells two
    checkpoints apart (a run retrained to the same step) without hashing gigabytes."""
    import jax

    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
        flat = leaf.reshape(-1)  # numpy or a device array: only the sample leaves the device
        digest.update(jax.tree_util.keystr(path).encode() + str(flat.size).encode())
        digest.update(np.ascontiguousarray(np.asarray(flat[::max(1, flat.size // 4096)])).tobytes())
    return digest.hexdigest()


def text_digest(texts: Iterable[str]) -> str:
    """sha256 of the texts in order (each ended by NUL, so boundaries count)."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()
