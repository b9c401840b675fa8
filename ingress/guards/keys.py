"""Virtual keys: what clients present instead of a provider key.

A key is shown once, when `llmtap keys create` makes it; the key file keeps only its
SHA-256 hash with the key's id, owner (tenant, team, user), the models it may use,
and whether it is revoked. The ingress looks keys up by hash and re-reads the file
when it changes, so creating or revoking a key needs no restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmtap.events import UtcDatetime, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "ltk_"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class VirtualKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    hash: str
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


def read_keys(path: Path) -> KeyFile:
    if not path.exists():
        return KeyFile()
    return KeyFile.model_validate(yaml.safe_load(path.read_text()) or {})


def write_keys(path: Path, keys: KeyFile) -> None:
    """Replace the key file atomically: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".yaml")
    with os.fdopen(fd, "w") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


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
    keys = read_keys(path)
    keys.keys.append(key)
    write_keys(path, keys)
    return secret, key


def revoke_key(path: Path, key_id: str) -> bool:
    keys = read_keys(path)
    found = False
    for i, key in enumerate(keys.keys):
        if key.id == key_id:
            keys.keys[i] = key.model_copy(update={"revoked": True})
            found = True
    if found:
        write_keys(path, keys)
    return found


class KeyStore:
    """The ingress's view of the key file: lookups by hash, reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, VirtualKey] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, secret: str) -> VirtualKey | None:
        """The live (not revoked) key for a presented secret, or None.

        A key not known yet is looked for again after re-reading the file if it changed
        (a stat; the file is read only then), so a key made a moment ago works at once
        rather than after the next periodic reload."""
        if not secret:
            return None
        digest = hash_key(secret)
        key = self._by_hash.get(digest)
        if key is None and self.reload():
            key = self._by_hash.get(digest)
        return None if key is None or key.revoked else key

    def reload(self) -> bool:
        """Re-read the file if it changed; keep the last good version if it is broken."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        try:
            keys = read_keys(self.path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("key file %s unreadable, keeping the previous keys: %s", self.path, exc)
            return False
        self._by_hash = {k.hash: k for k in keys.keys}
        self._stamp = stamp
        log.info("loaded %d virtual keys from %s", len(self._by_hash), self.path)
        return True
