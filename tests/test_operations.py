"""Operating llmtap as a platform team runs it: each process started on its own (as
docker-compose.yml runs them), its settings from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingress.spool import Record, Spool
from llmtap.config import CONFIG_ENV, Settings
from llmtap.ports import unresolved
from tests.conftest import Broker
from tests.fake_provider import free_ports


def refused_at_start(command: str, env: dict[str, str], timeout: float) -> str:
    """Run ``llmtap <command>`` with ``env`` (and no config file): it must exit at once,
    status 2, without a traceback, not start and serve. Returns what it said."""
    env = {name: value for name, value in env.items() if name != CONFIG_ENV}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llmtap", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # it started, and served
        pytest.fail(f"llmtap {command} started, not refused: {exc.stderr!r}"[-2000:])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stderr


def test_an_ingress_whose_data_dir_cannot_hold_its_spool_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """`llmtap ingress` keeps its spool under data_dir. One that could not be made (a file
    of that name, a volume its user cannot write) started and answered calls all the same,
    ready while the broker answered, its events in memory only (lost by a crash or a
    broker outage longer than the queue), an ERROR once a minute; the worker, the store
    and migrate refuse such a data_dir at start, naming it, exit status 2."""
    data_dir = tmp_path / "a-file"
    data_dir.write_text("not a directory\n")
    proxy_port, broker_port = free_ports(2)  # nothing listens there: no broker
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(data_dir),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_KEYS_FILE": str(tmp_path / "keys.yaml"),
    }
    stderr = refused_at_start("ingress", env, timeout=20)
    assert stderr.startswith(f"llmtap: data_dir {data_dir}: cannot be used"), stderr


@pytest.mark.parametrize(
    "name",
    ["data_dir", "tls_certfile", "tls_keyfile", "kafka_ssl_cafile", "kafka_ssl_certfile"],
)
def test_an_empty_path_setting_in_the_environment_is_its_default(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "An empty file setting (`LLMTAP_KEYS_FILE=`, compose's `${VAR:-}`) is its
    default." Only keys_file and pricing_file were: `LLMTAP_DATA_DIR=` put the store,
    spool and keys in the current directory (not `.llmtap`), and an optional TLS file
    left empty (`LLMTAP_TLS_CERTFILE: ${TLS_CERT:-}`) refused every start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv(f"LLMTAP_{name.upper()}", "")
    settings = Settings()
    assert getattr(settings, name) == Settings.model_fields[name].default


def test_a_heartbeat_no_more_often_than_the_session_lasts_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """Kafka: heartbeat.interval.ms "must be set lower than session.timeout.ms". Lowering
    `stream_session_timeout_s` to 1 (its heartbeat's default), or raising the heartbeat
    past it, started a worker whose coordinator would expire it between two heartbeats
    (aiokafka checks nothing; Tansu expires no session, so no test here saw it)."""
    [broker_port] = free_ports(1)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_WORKER_METRICS_PORT": "0",
        "LLMTAP_STREAM_SESSION_TIMEOUT_S": "1",
    }
    assert "stream_heartbeat_interval_s" in refused_at_start("worker", env, timeout=20)
    assert Settings(stream_session_timeout_s=3, stream_heartbeat_interval_s=1)


def test_a_session_a_kafka_broker_refuses_is_refused_at_start(tmp_path: Path) -> None:
    """Kafka refuses a group join whose session is below group.min.session.timeout.ms
    (6 s by default): a worker given `stream_session_timeout_s` 5 waited for the broker,
    then failed its join with INVALID_SESSION_TIMEOUT, naming no setting. The embedded
    broker (Tansu) has no such minimum: there, a shorter one is taken."""
    [broker_port] = free_ports(1)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_EMBEDDED_BROKER": "false",
        "LLMTAP_WORKER_METRICS_PORT": "0",
        "LLMTAP_STREAM_SESSION_TIMEOUT_S": "5",
    }
    stderr = refused_at_start("worker", env, timeout=20)
    assert "stream_session_timeout_s (5) must be at least 6" in stderr, stderr
    assert "group.min.session.timeout.ms" in stderr
    assert Settings(embedded_broker=False, stream_session_timeout_s=6)
    assert Settings(embedded_broker=True, stream_session_timeout_s=3)


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        ("ingress", "proxy_host"),
        ("store", "api_host"),
        ("worker", "worker_metrics_host"),
        ("up", "proxy_host"),
        ("up", "api_host"),
    ],
)
def test_a_host_to_listen_on_that_does_not_resolve_is_refused_at_start(
    command: str, setting: str, tmp_path: Path
) -> None:
    """A bind host that does not resolve ended the ingress with "llmtap ingress failed:
    [Errno -2] Name or service not known" and a traceback, exit 1, naming no setting
    (the store and the worker once the broker answered, `up` as "proxy_port"); each is
    refused at start, naming the setting and its value, exit status 2."""
    proxy_port, api_port, metrics_port, broker_port = free_ports(4)  # no broker
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path / "data"),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_WORKER_METRICS_PORT": str(metrics_port),
        f"LLMTAP_{setting.upper()}": "nosuch.invalid",
    }
    stderr = refused_at_start(command, env, timeout=30)
    assert stderr.startswith(f"llmtap: {setting} 'nosuch.invalid' does not resolve"), stderr
    assert not (tmp_path / "data" / "clickhouse").exists()  # nothing was started


@pytest.mark.parametrize("setting", ["proxy_host", "api_host", "worker_metrics_host"])
def test_a_bracketed_ipv6_host_to_listen_on_is_refused_saying_how_to_write_it(
    setting: str, tmp_path: Path
) -> None:
    """``[::1]``, as an address is bracketed in a URL or in kafka_bootstrap, is no host
    to bind: refused as not resolving, with nothing to say that the setting takes
    ``::1``, which listens."""
    settings = Settings(data_dir=tmp_path)
    [said] = unresolved(settings.model_copy(update={setting: "[::1]"}), "up")
    assert said.startswith(f"{setting} '[::1]' does not resolve"), said
    assert said.endswith("an IPv6 address is written without brackets here: '::1'"), said
    assert unresolved(settings.model_copy(update={setting: "::1"}), "up") == []


def test_an_ingress_on_an_ipv6_host_serves_there(tmp_path: Path) -> None:
    """``proxy_host: "::1"`` (what the hint above says to write) is listened on."""
    proxy_port, broker_port = free_ports(2)  # no broker: none needed to answer /healthz
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_HOST": "::1",
        "LLMTAP_PROXY_PORT": str(proxy_port),
    }
    with ingress_serving(env, proxy_port, host="[::1]"):
        pass


@contextlib.contextmanager
def ingress_serving(
    env: dict[str, str], port: int, host: str = "127.0.0.1"
) -> Iterator[subprocess.Popen[bytes]]:
    """`llmtap ingress` with ``env``, once its /healthz answers on ``host`` and ``port``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "ingress"],
        env={name: value for name, value in env.items() if name != CONFIG_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the first ingress exited"
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the first ingress did not answer"
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_second_ingress_on_a_data_dir_in_use_is_refused_at_start(tmp_path: Path) -> None:
    """Two ingresses on one data_dir: the second cannot open the spool (the first holds
    it), and served on, an ERROR a minute, its events held in memory until half its
    queue was full or it stopped (late spend, windows and alerts), with the broker down
    nowhere durable (lost by a crash, or at its stop). It is refused at start, naming
    the data_dir and the first's pid, and so is an `llmtap up` over it (it would start
    everything, then fail at its ingress)."""
    proxy_port, other_port, api_port, metrics_port, broker_port = free_ports(5)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",  # no broker: none needed
        "LLMTAP_PROXY_PORT": str(proxy_port),
    }
    with ingress_serving(env, proxy_port) as first:
        said = f"data_dir {tmp_path.resolve()} is in use by another llmtap ingress "
        said += f"(pid {first.pid})"
        second = refused_at_start("ingress", {**env, "LLMTAP_PROXY_PORT": str(other_port)}, 20)
        assert said in second, second
        elsewhere = {
            "LLMTAP_PROXY_PORT": str(other_port),
            "LLMTAP_API_PORT": str(api_port),
            "LLMTAP_WORKER_METRICS_PORT": str(metrics_port),
        }
        assert said in refused_at_start("up", {**env, **elsewhere}, 30)
        assert not (tmp_path / "clickhouse").exists()  # up started nothing
    # Released with the first's end: the next one starts.
    with ingress_serving({**env, "LLMTAP_PROXY_PORT": str(other_port)}, other_port):
        pass


def test_an_ingress_without_a_spool_holds_the_one_it_replays(tmp_path: Path) -> None:
    """With ``spool_max_bytes`` 0 an ingress took no lock on its data_dir, yet opened
    the spool there to replay what a run with a spool had left: an ingress with a spool
    started beside it took the lock and served on, the spool open in one of the two
    (the other an ERROR a minute, its events in memory). It takes the lock while it has
    something to replay; with nothing, it takes none, and leaves the spool alone."""
    settings = Settings(data_dir=tmp_path)
    left = Spool(settings.spool_dir, max_bytes=1 << 20)
    assert left.append([Record(settings.kafka.names.requests, b"key", b"{}")]) == 0
    left.close()
    first_port, other_port, broker_port = free_ports(3)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",  # no broker: it stays spooled
        "LLMTAP_PROXY_PORT": str(first_port),
    }
    without_spool = {**env, "LLMTAP_SPOOL_MAX_BYTES": "0"}
    with ingress_serving(without_spool, first_port) as first:
        said = f"data_dir {tmp_path.resolve()} is in use by another llmtap ingress "
        said += f"(pid {first.pid})"
        second = refused_at_start("ingress", {**env, "LLMTAP_PROXY_PORT": str(other_port)}, 20)
        assert said in second, second
    for segment in settings.spool_dir.glob("*.seg"):
        segment.unlink()  # nothing to replay: it takes no lock, beside one that holds it
    with (
        ingress_serving(env, first_port),
        ingress_serving({**without_spool, "LLMTAP_PROXY_PORT": str(other_port)}, other_port),
    ):
        pass


@pytest.mark.parametrize("command", ["up", "ingress", "store"])
def test_a_keys_file_that_cannot_be_loaded_is_refused_at_start(
    command: str, tmp_path: Path
) -> None:
    """A `keys_file` naming a directory (or a file that is not a key file) started the
    proxy and the analytics API all the same: "unreadable, keeping the previous keys"
    (none), /readyz 200 with `keys_loaded: 0`, every call a 401, while `llmtap keys`
    refuses the same file naming keys_file, exit status 2."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    proxy_port, api_port, broker_port = free_ports(3)  # no broker: nothing may wait for one
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path / "data"),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_KEYS_FILE": str(keys_dir),
    }
    stderr = refused_at_start(command, env, timeout=30)
    assert stderr.startswith(f"llmtap: keys_file {keys_dir} cannot be used"), stderr


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing children (decode processes) of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


async def test_ctrl_c_on_a_store_in_a_terminal_ends_it_in_json_lines_only(
    tmp_path: Path, broker: Broker
) -> None:
    """Ctrl-C sends SIGINT to the terminal's whole foreground process group: the store's
    decode processes (sink_decode_processes) took it too, and each wrote Python's
    KeyboardInterrupt traceback to stderr among the JSON lines (README: every process
    logs JSON lines). The store stops them itself, as it does on SIGTERM."""
    [api_port] = free_ports(1)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LLMTAP_EMBEDDED_BROKER": "false",
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_SINK_DECODE_PROCESSES": "2",
    }
    env.pop(CONFIG_ENV, None)
    store = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmtap",
        "store",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # a process group of its own, as a terminal's job is
    )
    assert store.stderr is not None
    lines: list[bytes] = []

    async def read() -> None:
        assert store.stderr is not None
        async for line in store.stderr:
            lines.append(line)

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(120):
            while len(_spawned_children(store.pid)) < 2 or not any(
                b"ClickHouse writer consuming" in line for line in lines
            ):
                assert store.returncode is None, b"".join(lines).decode()[-2000:]
                await asyncio.sleep(0.2)
        os.killpg(store.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        async with asyncio.timeout(60):
            await store.wait()
        await reader
    finally:
        if store.returncode is None:
            store.kill()
            await store.wait()
    said = b"".join(lines).decode()
    assert store.returncode == 0, said[-2000:]
    assert "Traceback" not in said, said[-3000:]
    for line in said.splitlines():
        json.loads(line)  # JSON lines only


@pytest.mark.parametrize(
    ("sig", "after"),
    [
        (signal.SIGINT, '"process":"up"'),  # its first line: the stop handlers are set
        (signal.SIGTERM, '"message":"started store (pid'),
    ],
    ids=["sigint-at-its-first-line", "sigterm-once-the-store-started"],
)
async def test_up_stopped_while_it_starts_stops_cleanly(
    sig: signal.Signals, after: str, tmp_path: Path
) -> None:
    """Ctrl-C (or SIGTERM) on `llmtap up` before it was up stopped it, status 0, but
    logged "startup failed: stopped while ..." at ERROR: a stop asked is an info line.
    Run as a user runs it: its defaults, in a home of its own (ports moved only, as
    other tests run beside it)."""
    proxy_port, api_port, metrics_port, broker_port = free_ports(4)
    env = {name: value for name, value in os.environ.items() if not name.startswith("LLMTAP_")}
    env |= {
        "HOME": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_WORKER_METRICS_PORT": str(metrics_port),
    }
    up = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmtap", "up"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert up.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(120):
            async for raw in up.stdout:
                lines.append(raw.decode(errors="replace"))
                if after in lines[-1]:
                    break
        assert up.returncode is None, "".join(lines)[-2000:]
        up.send_signal(sig)
        async with asyncio.timeout(120):
            lines += [raw.decode(errors="replace") async for raw in up.stdout]
            await up.wait()
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    said = "".join(lines)
    assert up.returncode == 0, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    for line in said.splitlines():
        assert json.loads(line)["level"] not in ("ERROR", "CRITICAL"), said[-3000:]
    assert f"llmtap up stopped ({sig.name}) before it was up" in said, said[-3000:]
    assert (tmp_path / ".llmtap").is_dir()  # its defaults: the data_dir under its cwd
