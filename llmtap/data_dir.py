"""A data directory is one `llmtap up`'s at a time.

A second `up` on other ports over the same data directory shared its spool, its key
file's writes and its pinned config's run directory with the first, and failed late
and obscurely: its store could not open the embedded ClickHouse the first's held, and
`up` said only "store exited". Now `up` claims the directory before it starts
anything, and a second one is told at once whose it is.

So is a second `llmtap ingress` over a directory one holds (an `up`'s, or one started
alone): the spool under it opens in one process at a time, and the second served on
with its events held in memory (late; with the broker down, lost by a crash or at its
stop), an ERROR a minute. `up` holds the ingress lock itself, from its start to its
end, and hands it to its own ingress (the lock's descriptor, inherited): one started on
its directory while it started took the lock, and up's ingress was refused, or started
again and refused for good. Inherited, the lock is held as long as either holds it:
an `up` killed, its ingress goes on holding it while it stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtap.config import INGRESS_LOCK_ENV, ConfigError, Settings

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


def _lock(settings: Settings, name: str, kind: str) -> int:
    """A descriptor of ``run/<name>`` holding its lock, this pid and ``kind`` (what this
    process is) written in it; raises :class:`ConfigError` naming the holder's pid and
    kind when another process has it."""
    lock_path = settings.run_dir / name
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"data_dir {settings.data_dir}: cannot be used: {exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        said = os.pread(descriptor, 64, 0).decode(errors="replace").split()
        os.close(descriptor)
        pid = int(said[0]) if said and said[0].isdigit() else None
        # Its kind; a file an llmtap wrote before kinds were: the kind the file is for.
        holder = said[1] if len(said) > 1 else name.removesuffix(".lock")
        # An up's ingress holds it too (handed over), and still, stopping, if up was killed.
        also = ", or the ingress it started" if holder == "up" and name == INGRESS_LOCK_FILE else ""
        raise ConfigError(
            f"data_dir {settings.data_dir.resolve()} is in use by another llmtap {holder} "
            f"(pid {pid or 'unknown'}{also}): stop it, or give this one a data_dir of its "
            "own (LLMTAP_DATA_DIR)"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} {kind}\n".encode(), 0)
    return descriptor


@contextmanager
def claimed(settings: Settings) -> Iterator[int]:
    """Hold ``settings.data_dir`` for this process while the block runs (advisory locks
    on ``run/up.lock`` and ``run/ingress.lock``, released by the kernel however the
    process ends, so a killed `up` leaves nothing to clean); the block gets the second's
    descriptor, to hand to its own ingress (:func:`ingress_claimed`). Raises
    :class:`ConfigError` naming the holder when another `up` has it, or an `llmtap
    ingress`, or when the embedded store it would open is another process's (a
    ``clickhouse_dsn`` of ``chdb://`` shared across data directories)."""
    with contextlib.ExitStack() as held:
        descriptors = [_lock(settings, name, "up") for name in (LOCK_FILE, INGRESS_LOCK_FILE)]
        for descriptor in descriptors:
            held.callback(os.close, descriptor)
        if chdb_held(settings.store_dsn):
            raise ConfigError(
                f"the embedded ClickHouse at {settings.store_dsn.removeprefix('chdb://')} is "
                "in use by another process (chDB opens a data directory in one process at a "
                "time): stop it, or give this up a clickhouse_dsn of its own"
            )
        yield descriptors[1]


def spool_left(spool_dir: Path) -> bool:
    """Whether ``spool_dir`` holds segment files a run left, to replay: the spool's own
    names (ingress/spool.py: twenty digits, ``.seg``)."""
    try:
        return any(
            p.stem.isascii() and p.stem.isdigit() and len(p.stem) == 20
            for p in spool_dir.glob("*.seg")
        )
    except OSError:  # one that cannot be read: opening it fails too, and says why
        return False


def uses_spool(settings: Settings) -> bool:
    """Whether an ingress opens the spool under ``data_dir``: it keeps one
    (``spool_max_bytes`` above 0), or it has one to replay that a run with a spool left
    (with 0, it writes nothing there). Without, it touches nothing under ``data_dir``."""
    return settings.spool_max_bytes > 0 or spool_left(settings.spool_dir)


@contextmanager
def ingress_claimed(settings: Settings) -> Iterator[None]:
    """Hold ``settings.data_dir`` for this ingress while the block runs (a lock on
    ``run/ingress.lock``, released however the process ends), if it opens the spool
    there (:func:`uses_spool`). Raises :class:`ConfigError` naming the holder when
    another ingress has it, or an `up`: the spool is one process's. An `up`'s own
    ingress runs under the lock `up` handed it (:func:`handed`)."""
    inherited = handed(settings)
    if not uses_spool(settings) or inherited is not None:
        yield
        return
    descriptor = _lock(settings, INGRESS_LOCK_FILE, "ingress")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(descriptor)


def handed(settings: Settings) -> int | None:
    """The ingress lock an `up` handed this process, its ingress: the descriptor named
    by ``LLMTAP_INGRESS_LOCK_FD`` (taken out of the environment), if it is this
    data_dir's ``run/ingress.lock`` and holds its lock; else None. The lock is the open
    file's: held as long as `up` or this process has it open."""
    said = os.environ.pop(INGRESS_LOCK_ENV, "")
    if not said.isdigit():
        return None
    descriptor = int(said)
    try:
        held, lock = os.fstat(descriptor), os.stat(settings.run_dir / INGRESS_LOCK_FILE)
        if (held.st_dev, held.st_ino) != (lock.st_dev, lock.st_ino):
            return None
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the open file's: held
    except OSError:  # not open, another file, or a lock another open file holds
        return None
    return descriptor
