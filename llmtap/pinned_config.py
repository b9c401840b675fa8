"""The config file pinned for ``llmtap up``'s children (:func:`pinned_config`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtap.config import CONFIG_ENV, ConfigError, Settings, load_settings


@contextmanager
def pinned_config(settings: Settings) -> Iterator[Settings]:
    """What ``llmtap up``'s children read, pinned: a copy of the config file under the
    run directory, which they are pointed at. A child restarted after the file was
    edited (a crash, a broker restart) runs what the others run, not a mix (the edited
    proxy port, unchecked and unannounced; broken YAML, a crash loop); an edit applies
    at the next start. The settings are read again from the copy, so they are its.

    The copy is this process's own (named by its pid: a second ``up`` failing on the
    same ports replaces nothing of the first's), readable by its owner only (it may
    hold secrets), and removed at the end; copies of processes gone are removed too.
    Raises :class:`ConfigError` when the copy cannot be made or read."""
    source = os.environ.get(CONFIG_ENV)
    if not source:
        yield settings
        return
    run_dir = settings.run_dir
    pinned = run_dir / f"config.{os.getpid()}.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob("config.*.yaml"):
            if not _running(stale.name.removeprefix("config.").removesuffix(".yaml")):
                stale.unlink(missing_ok=True)
        text = Path(source).read_bytes()
        descriptor = os.open(pinned, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as copy:
            os.fchmod(copy.fileno(), 0o600)
            copy.write(text)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_ENV}: {source} cannot be copied to {pinned}: {exc}") from None
    try:
        yield load_settings(str(pinned))
    finally:
        pinned.unlink(missing_ok=True)


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True  # not a copy of ours: left alone
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
