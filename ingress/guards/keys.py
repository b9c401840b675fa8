"""Virtual keys: what clients present instead of a provider key.

A key is shown once, when `llmtap keys create` makes it; the key file keeps only its
SHA-256 hash with the key's id, owner (tenant, team, user), the models it may use,
and whether it is revoked. The ingress looks keys up by hash and re-reads the file
when it changes (:mod:`ingress.guards.key_store`), so creating or revoking a key needs
no restart. Writers hold a lock file beside it (``keys.yaml.lock``), so concurrent ones
never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmtap.config_sources import refuse_duplicate_keys
from llmtap.events import UtcDatetime, utcnow

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
    """The keys of a key file's text, every entry a key (:func:`_content`); one that is
    not raises :class:`BadEntries`, naming it."""
    data = _content(text)
    try:
        return KeyFile.model_validate(data)
    except ValidationError:
        entries = _entries(data)  # the file itself refused: raised there
        if any(isinstance(entry, BadEntry) for entry in entries):
            raise BadEntries(entries) from None
        raise


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


class BadEntries(ValueError):
    """A key file with an entry that is no key (a bad hand edit): each such named as the
    operator counts them (the first is entry 1), not pydantic's ``keys.0.rpm``."""

    def __init__(self, entries: list[VirtualKey | BadEntry]) -> None:
        self.entries = entries
        bad = [entry for entry in entries if isinstance(entry, BadEntry)]
        super().__init__("; ".join(f"{entry} is not a valid key: {entry.why}" for entry in bad))


def parse_entries(text: str) -> list[VirtualKey | BadEntry]:
    """Each entry of a key file's text: a key, or a :class:`BadEntry`. The file itself
    is refused as :func:`parse_keys` refuses it (not YAML, a field named twice, no
    top-level ``keys:`` list, another top-level field)."""
    return _entries(_content(text))


def _entries(data: dict[str, Any]) -> list[VirtualKey | BadEntry]:
    """:func:`parse_entries` of the file's content, read."""
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
                f"{'.'.join(map(str, error['loc'])) or 'the entry'}: "
                f"{error['msg'].removeprefix('Value error, ')}"
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
