"""Virtual keys: what clients present instead of a provider key.

A key is shown once, when `llmtap keys create` makes it; the key file keeps only its
SHA-256 hash with the key's id, owner (tenant, team, user), the models it may use,
and whether it is revoked. The ingress looks keys up by hash and re-reads the file
when it changes, so creating or revoking a key needs no restart. Writers hold a lock
file beside it (``keys.yaml.lock``), so concurrent ones never lose each other's changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmtap.config_sources import refuse_duplicate_keys
from llmtap.events import UtcDatetime, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "ltk_"

# libyaml's loader when PyYAML has it: the pure-Python one takes seconds for thousands of keys.
try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


class _UniqueKeys(_Loader):
    """The key file's loader, refusing a field named twice: PyYAML kept the last without
    a word, so a key revoked by hand (`revoked: true` added above its `revoked: false`)
    stayed live, and the commands rewrote it so."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        refuse_duplicate_keys(self, node, deep)
        result: dict[Any, Any] = super().construct_mapping(node, deep)
        return result


def hash_key(secret: str) -> str:
    """The SHA-256 (hex) a key file keeps of a key's secret. Any string has one: a
    credential sent with bytes that are not UTF-8 (aiohttp reads them as lone
    surrogates) is hashed with those encoded as they are (``surrogatepass``), so it is
    an unknown key, answered 401, not an exception (a bare 500); a UTF-8 secret's hash
    is as ever."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class VirtualKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    tenant: str
    team: str = ""
    user: str = ""
    # Empty: every model. Otherwise exact names, or prefixes ending in "*".
    allowed_models: tuple[str, ...] = ()
    # Rate limits; None: unlimited.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    revoked: bool = False
    created_at: UtcDatetime = Field(default_factory=utcnow)
    # Last, as the key file lists it: an entry read cut short (a file rewritten in place,
    # read half written) has no hash yet, and is refused with its file, the previous
    # keys kept. Listed second, a key cut before its `revoked:`, `allowed_models:` or
    # rates (or mid-tenant) was a key of the defaults: live, of every model, unlimited.
    hash: str

    @field_validator("rpm", "tpm", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """YAML 1.1 reads ``rpm: yes`` (or ``on``, ``true``) as a yes/no, which pydantic
        took for 1: a key limited to one call a minute."""
        if isinstance(value, bool):
            raise ValueError(
                "a limit is a whole number of at least 1, not a yes/no (yes, true, on)"
            )
        return value

    @field_validator("hash")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        """Hex in lower case, as :func:`hash_key` gives it: a hash pasted in upper case
        never matched, and its key was refused without a word."""
        return value.lower()

    def allows(self, model: str) -> bool:
        if not self.allowed_models:
            return True
        return any(
            model.startswith(pattern[:-1]) if pattern.endswith("*") else model == pattern
            for pattern in self.allowed_models
        )


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[VirtualKey] = Field(default_factory=list)


# What reading a key file that cannot be used raises: unreadable (a directory, no
# permission), not YAML, or not a key file's content.
KEY_FILE_ERRORS = (OSError, ValueError, yaml.YAMLError)


def _content(text: str) -> dict[str, Any]:
    """A key file's text as YAML. One with no top-level ``keys`` (an empty file: one
    rewritten in place, read before it was written) is refused, not read as no keys:
    a reload would drop every key for as long. ``keys: []`` names none."""
    data = yaml.load(text, Loader=_UniqueKeys)
    if not isinstance(data, dict) or "keys" not in data:
        raise ValueError("no top-level 'keys:' list (empty, or still being written?)")
    return data


def parse_keys(text: str) -> KeyFile:
    """The keys of a key file's text, every entry a key (:func:`_content`)."""
    return KeyFile.model_validate(_content(text))


@dataclass(frozen=True)
class BadEntry:
    """An entry of a key file that is no key (a bad hand edit): what it holds, as read,
    and why it is no key."""

    number: int  # 1: the first entry
    content: Any
    why: str

    def __str__(self) -> str:
        named = self.content.get("id") if isinstance(self.content, dict) else None
        return f"entry {self.number}" + (f" (id {named!r})" if named is not None else "")


def parse_entries(text: str) -> list[VirtualKey | BadEntry]:
    """Each entry of a key file's text: a key, or a :class:`BadEntry`. The file itself
    is refused as :func:`parse_keys` refuses it (not YAML, a field named twice, no
    top-level ``keys:`` list, another top-level field)."""
    data = _content(text)
    KeyFile.model_validate({**data, "keys": []})  # the file's own fields
    listed = data["keys"]
    if not isinstance(listed, list):
        raise ValueError("its top-level 'keys:' is not a list")
    entries: list[VirtualKey | BadEntry] = []
    for number, entry in enumerate(listed, 1):
        try:
            entries.append(VirtualKey.model_validate(entry))
        except ValidationError as exc:
            why = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'the entry'}: {error['msg']}"
                for error in exc.errors()
            )
            entries.append(BadEntry(number, entry, why))
    return entries


def read_keys(path: Path) -> KeyFile:
    """The key file's keys, for the commands that edit it: an empty file (made by hand)
    has none; the proxy's reload refuses one (:func:`parse_keys`)."""
    text = _text(path)
    return parse_keys(text) if text.strip() else KeyFile()


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # not made yet (a path under a file is no such file: said)
        return ""


def write_keys(path: Path, keys: KeyFile) -> None:
    """Replace the key file atomically and durably: readers see the old file or the
    new, never half, and a crash after it returns keeps the new (its directory synced:
    a revocation said done must not come undone at a power loss). A writer that read
    the file first holds :func:`locked` across both.

    The new file keeps the old one's owner (when written as root), group (when its
    writer may give it) and mode, never readable by others (a new one: 0600, its
    writer's): a command run as another user (``sudo llmtap keys revoke``, an operator
    of the file's group) left a file the proxy's user could not read, and the proxy,
    keeping the keys it had, went on taking the key revoked.

    A ``path`` that is a symbolic link (config management's, a mount's) is written
    through: its target is replaced, the link kept (:func:`real_path`)."""
    _write(path, keys.model_dump(mode="json"))


def _write(path: Path, content: dict[str, Any]) -> None:
    """:func:`write_keys` of a key file's ``content``, as YAML."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_dump(content, sort_keys=False)
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(data)
            out.flush()
            if before is not None:
                os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode) & 0o770)
                mine = os.fstat(out.fileno())
                if (mine.st_uid, mine.st_gid) != (before.st_uid, before.st_gid):
                    try:  # only root may give the file to another user
                        os.fchown(out.fileno(), before.st_uid, before.st_gid)
                    except PermissionError:  # its group, at least (a member may)
                        with contextlib.suppress(PermissionError):
                            os.fchown(out.fileno(), -1, before.st_gid)
            else:
                os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def real_path(path: Path) -> Path:
    """The file a key file's path names, its symbolic links followed (to where one
    points, made or not): replaced by a rename, the link itself became a file of its
    own, and what it pointed to (the file config management keeps, what another link
    to it reads) kept every key it had, the revoked one live."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


LOCK_MODE = 0o640  # the key file's lock: its owner's and its directory's group's


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the key file's writer lock (an flock on ``<file>.lock``, beside it, a linked
    one's beside its target): every read-modify-write of the file goes under it, or
    concurrent writers lose changes.

    The lock is opened to read (an flock needs no more) and given its directory's group
    (LOCK_MODE): whoever may rewrite the key file (a writer of its directory, an
    operator of its group) may take it. Made 0600, its maker's, an operator of the
    group could not open it, and `keys revoke` revoked nothing."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY | os.O_CREAT, LOCK_MODE)
    try:
        _shared_with_writers(fd, path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _shared_with_writers(fd: int, directory: Path) -> None:
    """Give the lock ``fd`` its directory's group, readable by it (LOCK_MODE), when this
    process may (its owner, or root): a lock made before (0600, or before the directory
    was given to its group) is mended by the next command run so."""
    lock, group = os.fstat(fd), os.stat(directory).st_gid
    # Best effort: not allowed (another's lock), or a filesystem without owners (a
    # bind mount's, NFS's root squashed) leaves it as it is.
    if lock.st_gid != group:
        with contextlib.suppress(OSError):
            os.fchown(fd, -1, group)
    if stat.S_IMODE(lock.st_mode) != LOCK_MODE:
        with contextlib.suppress(OSError):
            os.fchmod(fd, LOCK_MODE)


def create_key(
    path: Path,
    *,
    tenant: str,
    team: str = "",
    user: str = "",
    allowed_models: tuple[str, ...] = (),
    rpm: int | None = None,
    tpm: int | None = None,
) -> tuple[str, VirtualKey]:
    """Make a key; return the secret (shown once, never stored) and its record."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = VirtualKey(
        id="key_" + secrets.token_hex(6),
        hash=hash_key(secret),
        tenant=tenant,
        team=team,
        user=user,
        allowed_models=allowed_models,
        rpm=rpm,
        tpm=tpm,
    )
    with locked(path):
        keys = read_keys(path)
        keys.keys.append(key)
        write_keys(path, keys)
    return secret, key


@dataclass(frozen=True)
class Revocation:
    """What :func:`revoke_key` found and did."""

    found: bool  # an entry of the key's id
    changed: bool  # one was live (False: every entry of it was revoked already)
    bad: tuple[BadEntry, ...]  # the file's entries that are no key, left as they are


def revoke_key(path: Path, key_id: str) -> Revocation:
    """Revoke the key ``key_id``; one already revoked is left as it is. Every entry of
    that id is revoked: a file merged by hand may list a key twice, and the one left
    live was taken.

    An entry that is no key (a bad hand edit) stops no revocation: it is kept as it was
    read, marked ``revoked: true`` if its ``id`` is ``key_id``, and returned to be said.
    The whole file refused (:func:`parse_entries`) revokes nothing."""
    with locked(path):
        text = _text(path)
        entries = parse_entries(text) if text.strip() else []
        found = changed = False
        for i, entry in enumerate(entries):
            if isinstance(entry, VirtualKey):
                if entry.id == key_id:
                    found = True
                    if not entry.revoked:
                        entries[i] = entry.model_copy(update={"revoked": True})
                        changed = True
            elif isinstance(entry.content, dict) and entry.content.get("id") == key_id:
                found = True
                if entry.content.get("revoked") is not True:
                    entry.content["revoked"] = True
                    changed = True
        if changed:
            listed = [
                entry.model_dump(mode="json") if isinstance(entry, VirtualKey) else entry.content
                for entry in entries
            ]
            _write(path, {"keys": listed})
        bad = tuple(entry for entry in entries if isinstance(entry, BadEntry))
        return Revocation(found, changed, bad)


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
            text = ""
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
                        text = content.decode()
                        keys = parse_keys(text)
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
                return isinstance(exc, ValidationError) and self._revoke_as_listed(text)
            self._by_hash = by_hash(keys)
            log.info("loaded %d virtual keys from %s", len(self._by_hash), self.path)
            return True

    def _revoke_as_listed(self, text: str) -> bool:
        """Refuse the keys a file of bad entries lists revoked (by a valid entry, or a bad
        one whose ``hash`` is a string and ``revoked`` true), the previous keys kept
        otherwise: one bad hand edit kept a leaked key, revoked by `keys revoke`, live
        until it was fixed. A revocation only takes a key away; an entry cut short (a
        file read half written) has no hash, and a hash cut short is no key's. Whether
        any key was revoked."""
        try:
            entries = parse_entries(text)
        except KEY_FILE_ERRORS:  # the file itself is no key file
            return False
        revoked: set[str] = set()
        for entry in entries:
            if isinstance(entry, VirtualKey):
                if entry.revoked:
                    revoked.add(entry.hash)
            elif isinstance(listed := entry.content, dict) and listed.get("revoked") is True:
                if isinstance(listed.get("hash"), str):
                    revoked.add(listed["hash"].lower())
        now = {
            digest: key.model_copy(update={"revoked": True})
            for digest in revoked
            if (key := self._by_hash.get(digest)) is not None and not key.revoked
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
