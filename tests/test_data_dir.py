"""A data directory is one `llmtap up`'s at a time (llmtap/data_dir.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmtap.config import CONFIG_ENV, ConfigError, Settings
from llmtap.data_dir import claimed
from tests.conftest import UP_TIMEOUT_S
from tests.fake_provider import free_ports
from tests.test_storage import migrated_by_a_newer_llmtap

HOLD_DATA_DIR = (
    "import sys; from llmtap.config import Settings; from llmtap.data_dir import claimed\n"
    "with claimed(Settings()):\n"
    "    print('held', flush=True); sys.stdin.read()"
)
HOLD_STORE = (
    "import sys; from llmtap.config import Settings; from sql.store import Store; "
    "s = Store(Settings().store_dsn); s.command('SELECT 1'); print('held', flush=True); "
    "sys.stdin.read()"
)


@contextmanager
def holder(code: str, data_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A process running ``code`` on ``data_dir`` until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "LLMTAP_DATA_DIR": str(data_dir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield process
    finally:
        if process.poll() is None:
            process.communicate(timeout=60)  # its stdin closed: it exits


def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`llmtap up` on ports of its own, expected to refuse at once (were it to start,
    the timeout ends the test)."""
    proxy, api, worker, broker = free_ports(4)
    ports = {
        "LLMTAP_PROXY_PORT": str(proxy),
        "LLMTAP_API_PORT": str(api),
        "LLMTAP_WORKER_METRICS_PORT": str(worker),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker}",
    }
    return subprocess.run(
        [sys.executable, "-m", "llmtap", "up"],
        env={**os.environ, **ports, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_up_on_a_data_dir_in_use_is_refused_at_once_naming_the_holder(
    tmp_path: Path,
) -> None:
    """It started everything on its other ports, then said only "startup failed: store
    exited" (chDB's lock); on the spool or the key file it would have shared, nothing."""
    with holder(HOLD_DATA_DIR, tmp_path) as first:
        second = up({"LLMTAP_DATA_DIR": str(tmp_path)})
    assert second.returncode == 2, second.stderr
    assert f"is in use by another llmtap up (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


class UpRunning:
    """`llmtap up` on ``data_dir``, its output read as it comes; and what an `llmtap
    ingress` started over the same data_dir, on a port of its own, says."""

    def __init__(self, data_dir: Path) -> None:
        proxy, api, worker, broker, self.other = free_ports(5)
        self.proxy = proxy
        self.env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(data_dir),
            "LLMTAP_PROXY_PORT": str(proxy),
            "LLMTAP_API_PORT": str(api),
            "LLMTAP_WORKER_METRICS_PORT": str(worker),
            "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker}",
        }
        self.env.pop(CONFIG_ENV, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "up"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.output.extend(self.process.stdout or ()), daemon=True
        )
        self._reader.start()

    def said(self, text: str) -> None:
        """Wait until up's output says ``text``."""
        deadline = time.monotonic() + UP_TIMEOUT_S
        while not any(text in line for line in self.output):
            assert self.process.poll() is None, "".join(self.output[-40:])
            assert time.monotonic() < deadline, "".join(self.output[-40:])
            time.sleep(0.1)

    def children(self) -> dict[str, int]:
        """The processes up started, by name (the latest of each)."""
        return {
            name: int(pid)
            for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", "".join(self.output))
        }

    def stranger(self) -> str:
        """What an `llmtap ingress` over up's data_dir says, refused (exit status 2)."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "llmtap", "ingress"],
                env={**self.env, "LLMTAP_PROXY_PORT": str(self.other)},
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("an llmtap ingress on up's data_dir started and served")
        assert done.returncode == 2, done.stderr[-2000:]
        return done.stderr

    def close(self) -> None:
        """Stop up, or, killed, every process it started."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)
        else:
            for pid in self.children().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=10)


def test_an_ingress_started_while_up_starts_is_refused_and_up_comes_up(tmp_path: Path) -> None:
    """`up` let go of the ingress lock once it had checked it, for its own ingress to
    take: an `llmtap ingress` started on its data_dir in the seconds before that one
    (while the broker, the migrations, the store and the worker start) took it, and
    up's ingress was refused: "startup failed: ingress exited", or, once up, started
    again and refused every 1 to 60 s for good. `up` holds it from its start to its
    end, for its own ingress; another is refused, naming up's pid, whenever it comes."""
    up = UpRunning(tmp_path)
    try:
        up.said("applying the store's migrations")  # its ingress comes last
        said = f"is in use by another llmtap up (pid {up.process.pid}, or the ingress it started)"
        assert said in up.stranger()
        up.said("llmtap is up")
        assert said in up.stranger()
        assert not any("ingress exited" in line for line in up.output), "".join(up.output)
        # Its own ingress, started again, runs under up's lock.
        os.kill(up.children()["ingress"], signal.SIGKILL)
        up.said("ingress exited with code -9; starting it again")
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            assert up.process.poll() is None, "".join(up.output[-40:])
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{up.proxy}/healthz", timeout=2):
                    break
            assert time.monotonic() < deadline, "".join(up.output[-40:])
            time.sleep(0.1)
        assert not any("in use by" in line for line in up.output), "".join(up.output)
    finally:
        up.close()


def test_up_killed_its_ingress_holds_the_lock_while_it_lives(tmp_path: Path) -> None:
    """`up` killed (SIGKILL, the OOM killer), its children are told to stop (SIGTERM,
    PR_SET_PDEATHSIG); its ingress then flushes its events, to the spool if the broker
    is gone, and lets calls in flight finish (shutdown_grace_s). It ran under up's lock
    by being up's child, holding none of its own, so an ingress (or an up) started
    meanwhile was not refused, and two processes had the spool. It holds the lock up
    handed it as long as it lives: here held alive (SIGSTOP) from before up is killed."""
    up = UpRunning(tmp_path)
    try:
        up.said("llmtap is up")
        os.kill(up.children()["ingress"], signal.SIGSTOP)
        up.process.kill()
        up.process.wait(timeout=30)
        said = f"is in use by another llmtap up (pid {up.process.pid}, or the ingress it started)"
        assert said in up.stranger()
    finally:
        up.close()


def test_an_embedded_store_another_process_holds_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    """A clickhouse_dsn of chdb:// shared by two data directories: the second up's store
    could not open it, and up said only that the store exited."""
    store = tmp_path / "shared"
    with holder(HOLD_STORE, store):
        second = up(
            {
                "LLMTAP_DATA_DIR": str(tmp_path / "other"),
                "LLMTAP_CLICKHOUSE_DSN": Settings(data_dir=store).store_dsn,
            }
        )
    assert second.returncode == 2, second.stderr
    assert "is in use by another process" in second.stderr
    assert "Traceback" not in second.stderr


def test_the_claim_ends_with_its_holder_however_it_ends(tmp_path: Path) -> None:
    """Released at the block's end, and by the kernel when the holder is killed: a
    killed `up` leaves no stale claim behind."""
    settings = Settings(data_dir=tmp_path)
    with claimed(settings):
        pass
    with holder(HOLD_DATA_DIR, tmp_path) as first:
        with pytest.raises(ConfigError, match=f"pid {first.pid}"), claimed(settings):
            pass
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    with claimed(settings):
        for held in ("up.lock", "ingress.lock"):  # the second for its own ingress
            assert (tmp_path / "run" / held).read_text() == f"{os.getpid()} up\n"


def test_up_over_a_store_a_newer_llmtap_migrated_stops_at_once_saying_why(
    tmp_path: Path,
) -> None:
    """`up` migrates first: a downgrade fails the start as the migrations end, with
    their one line, not once the broker is up nor as "store exited"."""
    migrated_by_a_newer_llmtap(tmp_path)
    refused = up({"LLMTAP_DATA_DIR": str(tmp_path)})
    assert refused.returncode == 1, refused.stderr
    assert "a newer llmtap wrote it" in refused.stderr
    assert "applying the store's migrations failed" in refused.stderr
    assert "started store" not in refused.stderr


@pytest.mark.parametrize("command", ["migrate", "store", "worker"])
def test_a_data_dir_that_cannot_be_used_is_said_naming_it(tmp_path: Path, command: str) -> None:
    """`llmtap up` said "data_dir ...: cannot be used" (exit status 2); the commands
    compose runs said "llmtap worker failed: [Errno 17] File exists: '...'" in a JSON
    line with a traceback, exit 1, naming no setting (the store and the worker once
    the broker answered: a container restarted for ever)."""
    data_dir = tmp_path / "a-file"
    data_dir.write_text("not a directory\n")
    [broker_port] = free_ports(1)  # nothing listens: neither may wait for a broker
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(data_dir),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_WORKER_METRICS_PORT": "0",
    }
    env.pop("LLMTAP_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "llmtap", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"llmtap: data_dir {data_dir}: cannot be used"), done.stderr
    assert "Traceback" not in done.stderr
