"""A data directory is one `llmtap up`'s at a time.

A second `up` on other ports over the same data directory shared its spool, its key
file's writes and its pinned config's run directory with the first, and failed late
and obscurely: its store could not open the embedded ClickHouse the first's held, and
`up` said only "store exited". Now `up` claims the directory before it starts
anything, and a second one is told at once whose it is.
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


@contextmanager
def claimed(settings: Settings) -> Iterator[None]:
    """Hold ``settings.data_dir`` for this process while the block runs (an advisory
    lock on ``run/up.lock``, released by the kernel however the process ends, so a
    killed `up` leaves nothing to clean). Raises :class:`ConfigError` naming the holder
    when another `up` has it, or when the embedded store it would open is another
    process's (a ``clickhouse_dsn`` of ``chdb://`` shared across data directories)."""
    lock_path = settings.run_dir / LOCK_FILE
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"data_dir {settings.data_dir}: cannot be used: {exc}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            raise ConfigError(
                f"data_dir {settings.data_dir.resolve()} is in use by another llmtap up "
                f"(pid {holder or 'unknown'}): stop it, or give this one a data_dir of its "
                "own (LLMTAP_DATA_DIR)"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
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
