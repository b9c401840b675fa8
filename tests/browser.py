"""A small Chrome DevTools Protocol client: Debian's headless Chromium, driven over
aiohttp's websocket client (no new dependency).

Enough to load pages as a person's browser does, read the DOM, collect every console
error, uncaught exception and failed load, and take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

CHROMIUM = "chromium"
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0
INSTALL_HINT = (
    "Debian's headless Chromium is needed for the dashboard's browser test and was not "
    "found on PATH: install it with `apt-get install -y chromium` (.ci/run does)."
)


class BrowserError(Exception):
    pass


@dataclass
class Problem:
    """A console error, an uncaught exception or a failed load the page reported."""

    kind: str  # console, exception, log
    text: str


@dataclass
class Page:
    """One page (tab) of the browser, on its own DevTools websocket."""

    ws: aiohttp.ClientWebSocketResponse
    problems: list[Problem] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(BrowserError(json.dumps(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            self._event(data.get("method", ""), data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the browser closed the connection"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.problems.append(Problem("console", text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.problems.append(Problem("exception", text))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.problems.append(Problem("log", f"{entry.get('text')} {entry.get('url', '')}"))
        for waiter in [w for w in self._waiters if w[0] == method]:
            self._waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(params)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, COMMAND_TIMEOUT_S)

    def expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event: ask for it before causing the event."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, future))
        return future

    async def enable(self, width: int, height: int) -> None:
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        loaded = self.expect("Page.loadEventFired")
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"could not load {url}: {result['errorText']}")
        await asyncio.wait_for(loaded, COMMAND_TIMEOUT_S)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools runs it, whatever the
        page's own Content-Security-Policy allows)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def submit(self, expression: str) -> None:
        """Run ``expression`` (one that submits a form or follows a link) and wait for the
        page it leads to."""
        loaded = self.expect("Page.loadEventFired")
        await self.evaluate(expression)
        await asyncio.wait_for(loaded, COMMAND_TIMEOUT_S)

    async def screenshot(self, path: Path) -> Path:
        """The whole page (not only the viewport) as a PNG."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = await self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path


def _open_log(profile: Path) -> BinaryIO:
    profile.mkdir(parents=True, exist_ok=True)
    return (profile / "chromium.log").open("wb")


def _devtools_port(profile: Path) -> int | None:
    """The port Chromium wrote to DevToolsActivePort once it listens, or None yet."""
    try:
        lines = (profile / "DevToolsActivePort").read_text().splitlines()
    except FileNotFoundError:
        return None
    return int(lines[0]) if len(lines) >= 2 else None


def chromium_path() -> str:
    found = shutil.which(CHROMIUM)
    if found is None:
        raise BrowserError(INSTALL_HINT)
    return found


@contextlib.asynccontextmanager
async def chromium(profile: Path, width: int = 1400, height: int = 1000) -> AsyncIterator[Page]:
    """Headless Chromium with a fresh profile under ``profile``, and its first page."""
    log = await asyncio.to_thread(_open_log, profile)
    process = await asyncio.create_subprocess_exec(
        chromium_path(),
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-sandbox",  # root in a container: the sandbox needs user namespaces
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--password-store=basic",
        f"--window-size={width},{height}",
        "about:blank",
        stdout=log,
        stderr=log,
    )
    session = aiohttp.ClientSession()
    page: Page | None = None
    try:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while (port := _devtools_port(profile)) is None:
            if process.returncode is not None:
                raise BrowserError(f"chromium exited with {process.returncode}: see {log.name}")
            if asyncio.get_running_loop().time() > deadline:
                raise BrowserError(f"chromium did not start in {START_TIMEOUT_S}s")
            await asyncio.sleep(0.05)
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        page.start()
        await page.enable(width, height)
        yield page
    finally:
        if page is not None:
            await page.close()
        await session.close()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()
