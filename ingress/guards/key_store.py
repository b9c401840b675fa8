"""The ingress's view of the key file (:mod:`ingress.guards.keys`): its keys by hash,
re-read in a thread whenever the file changes, the last good version kept while it is
broken (less the keys it lists revoked), a file gone kept for a moment to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ingress.guards.keys import (
    KEY_FILE_ERRORS,
    BadEntries,
    BadEntry,
    KeyFile,
    VirtualKey,
    hash_key,
    parse_keys,
)

log = logging.getLogger(__name__)


def by_hash(keys: KeyFile) -> dict[str, VirtualKey]:
    """The keys by hash. A hash listed more than once (a file merged by hand) is its
    first entry, revoked if any entry of it is: the last one won, so a revoked key was
    taken as long as a live copy of it followed."""
    found: dict[str, VirtualKey] = {}
    for key in keys.keys:
        first = found.setdefault(key.hash, key)
        if key.revoked and not first.revoked:
            found[key.hash] = first.model_copy(update={"revoked": True})
    return found


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collections while a key file is parsed (the next one collects what it
    left): each one its allocations trigger holds the GIL over the whole heap, stalling
    the event loop's thread (20,000 keys: longest stall 0.75 s with them, 0.1 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# What a reload compares: inode (a write replaces the file), mtime, ctime (which no tool
# can set back, as `cp -p` or `rsync -t` set mtime) and size; None: no file.
Stamp = tuple[int, int, int, int] | None
# A file edited again within its ctime's resolution (a filesystem tick, up to seconds)
# keeps its ctime, and edited in place to the same size its whole stamp: one read
# while its ctime was this recent is read again at each reload, and its content
# compared, until it is older (git's "racily clean" entries).
RACY_NS = 2_000_000_000
# How long the keys of a key file found gone are kept for it to come back (a tool that
# deletes it before it writes it anew), before every key is dropped.
GONE_GRACE_S = 5.0


class KeyStore:
    """The ingress's view of the key file: lookups by hash, reloaded when it changes.

    Lookups only read what the last reload installed; reloading (reading and parsing the
    file, seconds for tens of thousands of keys) is for a thread, never the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, VirtualKey] = {}
        self._stamp: Stamp = None  # of the file last read, loaded or not
        self._digest = b""  # of its content
        self._racy = False  # read within RACY_NS of its ctime: its stamp may not move
        self._gone_at: float | None = None  # monotonic time the file was first found gone
        self._unreadable = ""  # why the file could not be opened, as last logged
        self._reloading = threading.Lock()
        # The reload a lookup that missed waits for (:meth:`refreshed`), one at a time.
        self._refreshing: asyncio.Future[bool] | None = None

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, secret: str) -> VirtualKey | None:
        """The live (not revoked) key for a presented secret, or None: a key made a moment
        ago is known after the next reload (within about a second), or after
        :meth:`refreshed`, which a caller asks when a lookup missed."""
        if not secret:
            return None
        key = self._by_hash.get(hash_key(secret))
        return None if key is None or key.revoked else key

    def changed(self) -> bool:
        """Whether the file is not the one last read (its stamp moved: one ``stat``, no
        read), or is being read now (its stamp taken, its keys not installed yet). A
        file missing or unreadable is the reloads' to judge (kept for a grace, logged),
        not this."""
        if self._reloading.locked():
            return True
        try:
            found = os.stat(self.path)
        except OSError:
            return False
        return (found.st_ino, found.st_mtime_ns, found.st_ctime_ns, found.st_size) != self._stamp

    async def refreshed(self) -> bool:
        """Reload now, in a thread, if the file changed since it was read; whether it was
        read again (by this reload or the one under way when it was asked: a lookup may
        now find what it missed). Asked when a presented key is not known: a key made by
        `llmtap keys create` a moment ago then works at once, not after the next
        periodic reload (a script that makes a key and calls with it got 401 for up to
        a second). Costs a ``stat`` when nothing changed (unknown keys sent in a flood
        cost that much each); the calls missing meanwhile wait for one reload."""
        if not self.changed():
            return False
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.reload))
        try:
            await asyncio.shield(self._refreshing)
        except Exception:  # (a cancelled call is no Exception: it goes on up)
            log.exception("reloading the key file %s failed", self.path)
            return False
        return True

    async def follow(self, every_s: float) -> None:
        """Reload every ``every_s`` seconds, in a thread, until cancelled. A reload that
        fails in a way :meth:`reload` does not foresee is logged and tried again: the
        keys must not stop following the file (revocations with them)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                log.exception("reloading the key file %s failed", self.path)

    def reload(self) -> bool:
        """Re-read the file if it changed; keep the last good version if it is broken,
        less the keys it lists revoked (:meth:`_revoke_as_listed`).

        One reload at a time, each reading the file as it is then, so a slow one never
        installs an older file over a newer. A broken file is read (and its error logged)
        once, not again until it changes."""
        with self._reloading:
            try:
                with self.path.open("rb") as file:
                    self._gone_at = None
                    self._unreadable = ""
                    stat = os.fstat(file.fileno())
                    stamp: Stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
                    if stamp == self._stamp and not self._racy:
                        return False
                    content = file.read()
                    self._racy = time.time_ns() - stat.st_ctime_ns < RACY_NS
                    digest = hashlib.sha256(content).digest()
                    if stamp == self._stamp and digest == self._digest:
                        return False
                    self._stamp, self._digest = stamp, digest
                    with _gc_paused():
                        keys = parse_keys(content.decode())
            except FileNotFoundError:
                # Gone for a moment (a tool that deletes before it writes) is no reason
                # to answer every client 401: the keys are kept GONE_GRACE_S. Gone for
                # longer, they are dropped: the commands cannot revoke a key of a file
                # that is not there (and one made then would be the file's only key).
                if self._stamp is None:
                    return False
                if self._gone_at is None:
                    self._gone_at = time.monotonic()
                    log.warning(
                        "key file %s is gone: its %d keys are kept %.0f s for it to return",
                        self.path,
                        len(self._by_hash),
                        GONE_GRACE_S,
                    )
                if time.monotonic() - self._gone_at < GONE_GRACE_S:
                    return False
                log.error("key file %s is gone: every key is dropped", self.path)
                self._stamp, self._digest, keys = None, b"", KeyFile()
            except KEY_FILE_ERRORS as exc:
                # Said once until what is wrong changes: a file the proxy's user may not
                # open was logged every second, for as long as it lasted.
                if str(exc) != self._unreadable:
                    self._unreadable = str(exc)
                    log.error(
                        "key file %s unreadable, keeping the previous keys: %s", self.path, exc
                    )
                return isinstance(exc, BadEntries) and self._revoke_as_listed(exc.entries)
            self._by_hash = by_hash(keys)
            log.info("loaded %d virtual keys from %s", len(self._by_hash), self.path)
            return True

    def _revoke_as_listed(self, entries: list[VirtualKey | BadEntry]) -> bool:
        """Refuse the keys a file of bad entries lists revoked (by a valid entry, or a bad
        one whose ``revoked`` is true, by its ``hash`` or its ``id``), the previous keys
        kept otherwise: one bad hand edit kept a leaked key, revoked by `keys revoke`,
        live until it was fixed. By its id too: `keys revoke` marks a bad entry of the id
        revoked, and one whose hash the edit broke (``hsh:``) named no key by it. A
        revocation only takes a key away. Whether any key was revoked."""
        hashes: set[str] = set()
        ids: set[str] = set()
        for entry in entries:
            if isinstance(entry, VirtualKey):
                if entry.revoked:
                    hashes.add(entry.hash)
                    ids.add(entry.id)
            elif isinstance(listed := entry.content, dict) and listed.get("revoked") is True:
                if isinstance(listed.get("hash"), str):
                    hashes.add(listed["hash"].lower())
                if isinstance(listed.get("id"), str):
                    ids.add(listed["id"])
        now = {
            digest: key.model_copy(update={"revoked": True})
            for digest, key in self._by_hash.items()
            if not key.revoked and (digest in hashes or key.id in ids)
        }
        if not now:
            return False
        self._by_hash = {**self._by_hash, **now}
        log.error(
            "key file %s has bad entries: of the previous keys, %d it lists revoked are refused",
            self.path,
            len(now),
        )
        return True
