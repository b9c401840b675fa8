"""A data directory is one `llmtap up`'s at a time.

A second `up` on other ports over the same data directory shared its spool, its key
file's writes and its pinned config's run directory with the first, and failed late
and obscurely: its store could not open the embedded ClickHouse the first's held, and
`up` said only "store exited". Now `up` claims the directory before it starts
anything, and a second one is told at once whose it is.

So is a second `llmtap ingress` over a directory one holds (an `up`'s, or one started
alone): the spool under it opens in one process at a time, and the second served on
with its events held in memory (late; with the broker down, lost by a crash or at its
stop), an ERROR a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtap.config import ConfigError, Settings

LOCK_FILE = "up.lock"
INGRESS_LOCK_FILE = "ingress.lock"


def chdb_held(dsn: str) -> bool:
    """Whether an embedded ClickHouse's data directory is open in another process
    (ClickHouse holds an exclusive lock on its ``status`` file while it runs)."""
    if not dsn.startswith("chdb://"):
        return False
    try:
        with open(Path(dsn.removeprefix("chdb://")) / "status", "rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _lock(settings: Settings, name: str, who: str) -> int:
    """A descriptor of ``run/<name>`` holding its lock, this pid written in it; raises
    :class:`ConfigError` naming the holder's pid when another process has it."""
    lock_path = settings.run_dir / name
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"data_dir {settings.data_dir}: cannot be used: {exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        os.close(descriptor)
        raise ConfigError(
            f"data_dir {settings.data_dir.resolve()} is in use by another llmtap {who} "
            f"(pid {holder or 'unknown'}): stop it, or give this one a data_dir of its "
            "own (LLMTAP_DATA_DIR)"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


@contextmanager
def claimed(settings: Settings) -> Iterator[None]:
    """Hold ``settings.data_dir`` for this process while the block runs (an advisory
    lock on ``run/up.lock``, released by the kernel however the process ends, so a
    killed `up` leaves nothing to clean). Raises :class:`ConfigError` naming the holder
    when another `up` has it, or an `llmtap ingress` (its own would then be refused,
    once everything else was started), or when the embedded store it would open is
    another process's (a ``clickhouse_dsn`` of ``chdb://`` shared across data
    directories)."""
    descriptor = _lock(settings, LOCK_FILE, "up")
    try:
        os.close(_lock(settings, INGRESS_LOCK_FILE, "ingress"))  # free: its own takes it
        if chdb_held(settings.store_dsn):
            raise ConfigError(
                f"the embedded ClickHouse at {settings.store_dsn.removeprefix('chdb://')} is "
                "in use by another process (chDB opens a data directory in one process at a "
                "time): stop it, or give this up a clickhouse_dsn of its own"
            )
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(descriptor)


@contextmanager
def ingress_claimed(settings: Settings) -> Iterator[None]:
    """Hold ``settings.data_dir`` for this ingress while the block runs (a lock on
    ``run/ingress.lock``, released however the process ends), if it keeps a spool
    there (``spool_max_bytes`` above 0). Raises :class:`ConfigError` naming the holder
    when another ingress has it: the spool is one process's."""
    if not settings.spool_max_bytes:
        yield
        return
    descriptor = _lock(settings, INGRESS_LOCK_FILE, "ingress")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(descriptor)
