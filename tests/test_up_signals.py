"""`llmtap up` and signals: its children told once that it is gone, however the kernel
tells them; a second Ctrl-C hurries its stop."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from llmtap.config import Settings
from llmtap.stopping import PARENT_GONE, die_with_parent
from llmtap.supervisor import Supervisor
from tests.conftest import FakeUpstream, Running, pid_alive, run_llmtap
from tests.fake_provider import free_ports
from tests.faults.harness import until

# `llmtap up`'s start of a child, its ingress, with up's own code; then up gone as the
# kernel sees it when up is killed outright: each of its threads that held the child
# exits in turn, and the kernel sends the child its parent-death signal at each (a probe
# of a SIGKILLed parent with a few idle threads saw 1 to 4 in a row, ~10 ms apart). Here
# deterministic: the main thread (which started the child) exits first, then the
# process is SIGKILLed with its other thread alive.
PARENT = """
import asyncio, ctypes, threading, time

from llmtap.config import Settings
from llmtap.supervisor import Supervisor, http_ok

threading.Thread(target=time.sleep, args=(3600,)).start()


async def main():
    supervisor = Supervisor(Settings())
    child = await supervisor.spawn_llmtap("ingress")
    url = supervisor.settings.health_url("ingress")
    await supervisor.wait_ready("ingress", lambda: http_ok(url))
    print(child.process.pid, flush=True)
    ctypes.CDLL(None).pthread_exit(None)


asyncio.run(main())
"""

DELAY_S = 3.0
GONE = "the llmtap up that started this process is gone"


def _stopped_once_after_its_delay(said: list[dict[str, str]], delay_s: float) -> None:
    """The ingress's log lines: one stop, begun shutdown_delay_s after its SIGTERM."""

    def when(start: str) -> list[float]:
        return [
            datetime.fromisoformat(line["ts"]).timestamp()
            for line in said
            if line["message"].startswith(start)
        ]

    unready = when("SIGTERM: /readyz answers 503")
    closing = when("stopping: no new connections")
    assert len(unready) == 1 and len(closing) == 1, said
    assert closing[0] - unready[0] >= delay_s - 0.1, said
    assert not when("signal ignored"), said


def _alive(pid: int) -> bool:
    """Running: not gone, nor a zombie left for whoever adopted it to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_child_of_a_killed_up_stops_once_taking_its_shutdown_delay(tmp_path: Path) -> None:
    """Its children got SIGTERM as their parent-death signal, once for each of up's
    threads that exited holding them: the ingress took the second as a hurry and cut
    its shutdown_delay_s short, closing its port at once (a load balancer's calls
    reset). They get PARENT_GONE now, and take the first as one SIGTERM."""
    proxy, broker = free_ports(2)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path / "data"),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker}",  # none: the proxy answers anyway
        "LLMTAP_PROXY_PORT": str(proxy),
        "LLMTAP_AUTH": "passthrough",
        "LLMTAP_SHUTDOWN_DELAY_S": str(DELAY_S),
        "LLMTAP_SHUTDOWN_GRACE_S": "1",
    }
    log = tmp_path / "children.log"
    with log.open("wb") as err:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert parent.stdout is not None
        ingress = int(parent.stdout.readline() or 0)
        assert ingress, log.read_text()[-3000:]
        time.sleep(0.5)  # the main thread gone, the other holds the child
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(ingress):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    said = [line for line in lines if line["process"] == "ingress"]
    _stopped_once_after_its_delay(said, DELAY_S)
    gone = [line for line in said if line["message"].startswith(GONE)]
    assert len(gone) == 1, said


def _said(running: Running, text: str) -> bool:
    return any(text in line for line in running.output)


async def test_a_second_ctrl_c_cuts_up_s_wait_for_the_store_short(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Once the proxy and the worker stopped, `up` waits up to 20 s for the store to
    read what the worker wrote (and as long for the worker before): a second Ctrl-C did
    not cut that short. It does now, saying what is left unread. The store is held
    back (SIGSTOP) with the worker's last costed calls unread."""
    loop = asyncio.get_running_loop()
    async with run_llmtap(tmp_path / "data", upstream) as running:
        pids = running.child_pids()
        os.kill(pids["store"], signal.SIGSTOP)
        try:
            async with running.openai() as sdk:
                for _ in range(3):
                    await sdk.chat.completions.create(
                        model="gpt-4o-mini-hurried", messages=[{"role": "user", "content": "x"}]
                    )
            running.process.send_signal(signal.SIGINT)

            async def worker_gone() -> bool:
                return not pid_alive(pids["worker"])

            await until(worker_gone, "the worker stopped: up waits for the store", 60)
            hurried = loop.time()
            running.process.send_signal(signal.SIGINT)

            async def not_waited() -> bool:
                return _said(running, "not waited for: the stop was hurried")

            await until(not_waited, "up hurried", 5, context=lambda: "\n".join(running.output))
        finally:
            os.kill(pids["store"], signal.SIGCONT)
        assert await asyncio.wait_for(running.process.wait(), 60) == 0
        took = loop.time() - hurried
    assert took < 10, f"{took:.1f}s"
    assert _said(running, "SIGINT again: hurrying the stop")
    assert not _said(running, "stopping anyway")


async def test_a_second_ctrl_c_cuts_the_proxy_s_shutdown_delay_short_under_up(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Under `up`, Ctrl-C reaches the ingress as one SIGTERM, and it takes calls for
    shutdown_delay_s more; a second Ctrl-C to `up` did not reach it, as it does an
    `llmtap ingress` run alone (cutting the delay short)."""
    loop = asyncio.get_running_loop()
    env = {"LLMTAP_SHUTDOWN_DELAY_S": "40"}
    async with run_llmtap(tmp_path / "data", upstream, env) as running:
        running.process.send_signal(signal.SIGINT)

        async def unready() -> bool:
            return _said(running, "SIGTERM: /readyz answers 503; calls are taken for 40s more")

        await until(unready, "the ingress in its shutdown delay", 30)
        hurried = loop.time()
        running.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(running.process.wait(), 60) == 0
        took = loop.time() - hurried
    assert took < 20, f"{took:.1f}s"
    assert _said(running, "SIGINT again: hurrying the stop")


async def test_up_killed_outright_has_each_child_stop_once(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """`up` SIGKILLed (the OOM killer): each process it started is told once, by the
    kernel, and stops as on SIGTERM: the ingress takes its shutdown_delay_s."""
    async with run_llmtap(tmp_path / "data", upstream, {"LLMTAP_SHUTDOWN_DELAY_S": "3"}) as running:
        pids = running.child_pids()
        running.process.kill()
        assert await running.process.wait() == -signal.SIGKILL

        async def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids.values())

        await until(all_gone, "every child of up stopped", 60)
    told = [json.loads(line)["process"] for line in running.output if GONE in line]
    assert sorted(told) == ["ingress", "store", "worker"], told
    lines = [json.loads(line) for line in running.output if line.startswith('{"')]
    _stopped_once_after_its_delay([line for line in lines if line["process"] == "ingress"], 3.0)


def test_a_child_whose_up_went_before_it_was_told_is_stopped() -> None:
    """`up` gone between starting a child and the child asking to be told (the kernel
    has already given it another parent, and would never send it the signal): the child
    stops at once, as it would have been told, instead of running on orphaned."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is no parent of the child
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=functools.partial(die_with_parent, PARENT_GONE, gone.pid),
    )
    try:
        assert child.wait(timeout=30) == -PARENT_GONE
    finally:
        child.kill()
    # Its parent alive, as up is: it runs.
    child = subprocess.Popen(
        [sys.executable, "-c", "pass"],
        preexec_fn=functools.partial(die_with_parent, PARENT_GONE, os.getpid()),
    )
    assert child.wait(timeout=30) == 0


def test_a_hangup_told_twice_does_not_hurry_up_s_stop() -> None:
    """A closed terminal or ssh session sends `up` SIGHUP twice (the shell passes its
    hangup on to its jobs, then the kernel sends it to the terminal's foreground group
    as the shell exits; seen under a pty with bash -i, closed): the second was taken as
    a second Ctrl-C, and the stop hurried, the events still unread lost and the proxy's
    shutdown delay cut short, with nobody there to have asked."""
    supervisor = Supervisor(Settings())
    supervisor.ask_stop(signal.SIGHUP)
    supervisor.ask_stop(signal.SIGHUP)
    assert supervisor.stopping.is_set() and supervisor.stopped_by == signal.SIGHUP
    assert not supervisor.hurried.is_set()
    supervisor.ask_stop(signal.SIGINT)  # Ctrl-C or SIGTERM after it: asked, by someone
    assert supervisor.hurried.is_set()
