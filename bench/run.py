"""System benchmark: the whole llmtap system under a realistic mix, side by side with
LiteLLM's proxy and a bare aiohttp pass-through, against one fake upstream.

    python bench/run.py [--upstream-latency-ms 50] [--rate 30] [--rounds 5] \\
        [--duration 60] [--concurrency 128] [--throughput-duration 25] [--smoke]

Starts, each its own process on 127.0.0.1 (ports chosen free):

- the fake upstream (bench/fake_upstream.py) with ``--latency-ms``, usage that depends
  on the request, and per-caller counts (``/stats``);
- llmtap, whole: ``llmtap up`` with a config in a temporary data dir (broker, store
  with the analytics API, stream worker, ingress), virtual keys for several tenants
  made with ``llmtap keys create``, an admin key from ``llmtap keys admin``, the fake
  as the OpenAI (and Anthropic) upstream, and budgets: a hard cap never reached
  (admission runs on every call of that tenant), a soft budget, and a hard cap on a
  tenant of its own sized so that the budget step crosses it;
- the bare aiohttp pass-through (bench/bare_proxy.py);
- LiteLLM's proxy (``litellm --config``, the ``bench`` extra): one worker, no database,
  a fixed master key, every model routed to the fake as an OpenAI-compatible
  ``api_base``, no retries, no cooldowns, no callbacks, errors-only logging.

The load is bench/loadgen.py with a mix (a new process per measurement): several
models, ~30% streaming, a share of upstream 500s and 429s, several tenants and keys,
prompts of several sizes, ``max_tokens`` on some calls, an attribution header on some.

1. Latency at a fixed rate (open loop, no coordinated omission): direct, bare, llmtap
   and LiteLLM in interleaved rounds, the order rotated each round. Added latency =
   target minus direct, per round, at p50 and p99; medians over rounds.
2. Maximum sustained requests/s: closed loop, N concurrent workers, same rounds.
3. llmtap only: freshness (from a call's end to its row being visible through the
   read-only SQL endpoint, by its ``x-request-id``) under the same mixed load; budget
   enforcement (from the call that crosses a hard cap to the first 429); accounting
   (calls and cost in ClickHouse against what the load generator sent and got back,
   and against the usage the fake reported, priced with the catalog).

Progress goes to stderr; the report to bench/results/system.md and system.json.
Issue target: llmtap's added latency at most a tenth of LiteLLM's at p50 and p99, and
its sustained requests/s at least 5x LiteLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from fake_upstream import usage_for
from ingress_latency import (
    Fleet,
    Server,
    StartupFailed,
    free_port,
    http_ok,
    machine_busy_seconds,
    percentile,
    wait_until,
)
from loadgen import Answer, MixEntry, call_mixed

from llmtap.events import Usage
from stream.pricing import Catalog, cost_of, load_catalog

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TARGETS = ("direct", "bare", "llmtap", "litellm")
NAMES = {
    "direct": "direct (no proxy)",
    "bare": "bare aiohttp proxy",
    "llmtap": "llmtap (whole system)",
    "litellm": "LiteLLM proxy",
}
ADDED_RATIO_TARGET = 0.1  # llmtap's added latency <= a tenth of LiteLLM's
RPS_RATIO_TARGET = 5.0  # llmtap's sustained requests/s >= 5x LiteLLM's
UP_READY_TIMEOUT_S = 180.0
UP_STOP_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 90.0
LITELLM_MASTER_KEY = "sk-bench-litellm-master"
# What each target presents upstream: the fake counts its calls per bearer token.
UPSTREAM_CALLER = {
    "direct": "sk-direct",
    "bare": "sk-bare",
    "llmtap": "sk-llmtap-upstream",
    "litellm": "sk-litellm-upstream",
}

# --- the mix ---------------------------------------------------------------------------

MODELS = (("gpt-4o-mini", 45), ("gpt-4.1-nano", 20), ("gpt-4o", 15), ("gpt-4.1-mini", 20))
PROMPT_CHARS = ((60, 50), (400, 35), (3000, 15))  # (characters, weight)
MAX_TOKENS = (None, None, None, None, 16, 64, 128, 256)
FEATURES = ("chat", "search", "summarize")
WORDS = (
    "the quarterly report shows revenue growth across all regions while costs in "
    "logistics rose faster than planned please summarise the main drivers and list "
    "three actions for the next quarter with owners and dates"
).split()


@dataclass(frozen=True)
class KeySpec:
    tenant: str
    team: str
    user: str
    weight: int


KEYS = (
    KeySpec("acme", "search", "", 35),
    KeySpec("acme", "chat", "", 25),
    KeySpec("globex", "", "", 25),
    KeySpec("initech", "", "dev-1", 15),
)
CAPPED = KeySpec("capped", "batch", "", 0)


@dataclass(frozen=True)
class Entry:
    """One request of the mix, with what the report needs to know about it."""

    key: int  # index into KEYS (or -1: the capped tenant)
    body: dict[str, Any]
    headers: dict[str, str]
    model: str
    stream: bool
    upstream_error: int | None  # the status the fake is asked to answer, if any


def prompt(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def make_mix(size: int, stream_share: float, error_share: float, seed: int) -> list[Entry]:
    rng = random.Random(seed)
    entries = []
    for _ in range(size):
        key = rng.choices(range(len(KEYS)), weights=[k.weight for k in KEYS])[0]
        model = rng.choices([m for m, _ in MODELS], weights=[w for _, w in MODELS])[0]
        chars = rng.choices([c for c, _ in PROMPT_CHARS], weights=[w for _, w in PROMPT_CHARS])[0]
        content = prompt(rng, chars)
        error = None
        if rng.random() < error_share:
            error = 500 if rng.random() < 0.6 else 429
            content += f" fake-status:{error}"
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": model, "messages": messages}
        max_tokens = rng.choice(MAX_TOKENS)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        stream = rng.random() < stream_share
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        headers = {"x-llmtap-feature": rng.choice(FEATURES)} if rng.random() < 0.5 else {}
        entries.append(Entry(key, body, headers, model, stream, error))
    return entries


def budget_mix(size: int, seed: int) -> list[Entry]:
    """The capped tenant's calls: one model, no errors, ``max_tokens`` set (so the
    worst case reserved at admission is close to the real cost)."""
    rng = random.Random(seed)
    entries = []
    for _ in range(size):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt(rng, 400)}],
            "max_tokens": 32,
        }
        entries.append(Entry(-1, body, {}, "gpt-4o-mini", False, None))
    return entries


def write_mix(path: Path, entries: list[Entry], keys: list[str], capped_key: str) -> None:
    requests = [
        {"body": e.body, "key": capped_key if e.key < 0 else keys[e.key], "headers": e.headers}
        for e in entries
    ]
    path.write_text(json.dumps({"requests": requests}))


# --- pricing what was sent ---------------------------------------------------------------


def usage_of(tokens: list[int]) -> Usage:
    prompt_tokens, completion, cached, reasoning = tokens
    return Usage(
        input_tokens=prompt_tokens,
        output_tokens=completion,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )


def price(catalog: Catalog, model: str, usage: Usage) -> Decimal:
    entry = catalog.lookup(model, "openai")
    rates = entry[1].at(datetime.now(UTC)) if entry is not None else None
    if rates is None:
        raise SystemExit(f"no price for {model}: the mix must use priced models")
    return cost_of(usage, rates).total


# --- processes ---------------------------------------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(stat.parent.name))
    return children


def process_tree(pid: int) -> list[int]:
    children, tree, todo = _ppid_map(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet_machine(max_load: float, max_wait_s: float) -> list[str]:
    """Wait (polling every 60 s) until the 1-minute load average is at most max_load."""
    notes = []
    deadline = time.monotonic() + max_wait_s
    while (load := loadavg()) > max_load > 0:
        if time.monotonic() >= deadline:
            notes.append(f"load average still {load:.2f} after {max_wait_s / 60:.0f} min: ran")
            break
        progress(f"load average {load:.2f} > {max_load:g}: waiting 60 s for it to drop")
        notes.append(f"waited: load average {load:.2f} at {datetime.now(UTC):%H:%M} UTC")
        time.sleep(60)
    return notes


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_cli(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StartupFailed(f"{' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout


def post_json(url: str, body: dict[str, Any], key: str, timeout: float = 30) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@dataclass
class System:
    """Everything started, and how to reach it."""

    fleet: Fleet
    tmp: Path
    urls: dict[str, str]  # chat completions URL per target
    mixes: dict[str, Path]  # mix file per target
    budget_mix_path: Path
    fake_url: str
    api_url: str  # llmtap's analytics API, .../api/v1
    admin_key: str
    llmtap_keys: list[str]
    capped_key: str
    cap_usd: Decimal
    budgets: list[dict[str, Any]]
    litellm_version: str | None
    litellm_config: dict[str, Any] | None
    litellm_skipped: str | None
    up: Server
    targets: tuple[str, ...]

    def pids(self, target: str) -> list[int]:
        """The processes that serve a target (for direct: the fake)."""
        name = {"direct": "fake", "bare": "bare", "llmtap": "up", "litellm": "litellm"}[target]
        return process_tree(self.fleet.servers[name].process.pid)

    def ingress_pids(self) -> list[int]:
        return [p for p in self.pids("llmtap") if cmdline(p).rstrip().endswith("llmtap ingress")]

    def all_pids(self) -> list[int]:
        pids = [os.getpid()]
        for server in self.fleet.servers.values():
            pids += process_tree(server.process.pid)
        return pids

    def sql(self, query: str, max_rows: int = 10000) -> list[list[Any]]:
        answer = post_json(
            f"{self.api_url}/sql", {"query": query, "max_rows": max_rows}, self.admin_key
        )
        rows: list[list[Any]] = answer["rows"]
        return rows

    def check_alive(self) -> None:
        for server in self.fleet.servers.values():
            if not server.alive():
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")


def litellm_binary() -> str | None:
    beside = Path(sys.executable).with_name("litellm")
    if beside.exists():
        return str(beside)
    return shutil.which("litellm")


def litellm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:  # not installed: the report says so
        return None


def start_system(fleet: Fleet, tmp: Path, args: argparse.Namespace) -> System:
    python = sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    base_env["PYTHONUNBUFFERED"] = "1"
    ports = {name: free_port() for name in ("fake", "bare", "proxy", "api", "broker", "litellm")}
    fake_url = f"http://127.0.0.1:{ports['fake']}"

    progress(f"starting the fake upstream ({args.upstream_latency_ms:g} ms) and the bare proxy")
    fake = fleet.start(
        "fake",
        [
            python,
            str(BENCH / "fake_upstream.py"),
            "--port",
            str(ports["fake"]),
            "--latency-ms",
            str(args.upstream_latency_ms),
            "--varied-usage",
            "--stats",
        ],
    )
    bare = fleet.start(
        "bare",
        [
            python,
            str(BENCH / "bare_proxy.py"),
            "--port",
            str(ports["bare"]),
            "--upstream",
            fake_url,
        ],
    )

    # llmtap: config, keys (with its own CLI), then `llmtap up`.
    data_dir = tmp / "llmtap"
    data_dir.mkdir()
    config_path = tmp / "llmtap.yaml"
    catalog = load_catalog()
    mix = make_mix(args.mix_size, args.stream_share, args.error_share, args.seed)
    capped = budget_mix(args.mix_size, args.seed + 1)
    per_call = price(catalog, "gpt-4o-mini", usage_of(list(_fake_usage(capped[0].body))))
    cap = (per_call * Decimal(str(args.budget_rate * args.budget_cross_after_s))).quantize(
        Decimal("0.000001")
    )
    budgets: list[dict[str, Any]] = [
        # never reached: hard-cap admission runs on every acme call
        {
            "name": "acme-monthly",
            "scope": "tenant",
            "value": "acme",
            "period": "month",
            "limit_usd": "1000",
            "hard_cap": True,
        },
        {
            "name": "globex-daily",
            "scope": "tenant",
            "value": "globex",
            "period": "day",
            "limit_usd": "500",
            "thresholds": [50, 80, 100],
            "hard_cap": False,
        },
        {
            "name": "capped-daily",
            "scope": "tenant",
            "value": CAPPED.tenant,
            "period": "day",
            "limit_usd": str(cap),
            "hard_cap": True,
        },
    ]
    config = {
        "data_dir": str(data_dir),
        "kafka_bootstrap": f"127.0.0.1:{ports['broker']}",
        "proxy_port": ports["proxy"],
        "api_port": ports["api"],
        "openai_base_url": f"{fake_url}/v1",
        "anthropic_base_url": fake_url,
        "log_level": "WARNING",
        "budgets": budgets,
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    # --config after the subcommand (the subcommand's own option wins over the top one),
    # and LLMTAP_CONFIG too: nothing may fall back to the default ./.llmtap or ports.
    base_env["LLMTAP_CONFIG"] = str(config_path)
    llmtap_cli = [python, "-m", "llmtap"]
    keys = []
    for spec in (*KEYS, CAPPED):
        argv = [*llmtap_cli, "keys", "--config", str(config_path), "create"]
        argv += ["--tenant", spec.tenant]
        argv += ["--team", spec.team] if spec.team else []
        argv += ["--user", spec.user] if spec.user else []
        keys.append(run_cli(argv, base_env).splitlines()[0].strip())
    admin_out = run_cli([*llmtap_cli, "keys", "--config", str(config_path), "admin"], base_env)
    admin_key = admin_out.splitlines()[0].strip()
    digest = re.search(r"admin_key_hashes: \[([0-9a-f]{64})\]", admin_out)
    if digest is None:
        raise StartupFailed(f"no digest in `llmtap keys admin` output:\n{admin_out}")
    up_env = {
        **base_env,
        "LLMTAP_ADMIN_KEY_HASHES": json.dumps([digest.group(1)]),
        "OPENAI_API_KEY": UPSTREAM_CALLER["llmtap"],
        "ANTHROPIC_API_KEY": "sk-ant-llmtap-upstream",
    }
    progress("starting llmtap (`llmtap up`: broker, store, stream worker, ingress)")
    up = fleet.start("up", [*llmtap_cli, "up", "--config", str(config_path)], env=up_env)

    # LiteLLM's proxy, when the bench extra is installed.
    litellm_config: dict[str, Any] | None = None
    skipped = None
    binary = litellm_binary()
    version = litellm_version()
    if args.no_litellm:
        skipped = "--no-litellm"
    elif binary is None or version is None:
        skipped = "LiteLLM is not installed (pip install -e '.[bench]')"
    else:
        litellm_config = {
            "model_list": [
                {
                    "model_name": model,
                    "litellm_params": {
                        "model": f"openai/{model}",
                        "api_base": f"{fake_url}/v1",
                        "api_key": UPSTREAM_CALLER["litellm"],
                    },
                }
                for model, _ in MODELS
            ],
            "litellm_settings": {
                "num_retries": 0,
                "request_timeout": 60,
                "callbacks": [],
                "success_callback": [],
                "failure_callback": [],
            },
            "router_settings": {"num_retries": 0, "disable_cooldowns": True},
            "general_settings": {"master_key": LITELLM_MASTER_KEY},
        }
        litellm_path = tmp / "litellm.yaml"
        litellm_path.write_text(yaml.safe_dump(litellm_config, sort_keys=False))
        litellm_env = {
            **base_env,
            "LITELLM_LOG": "ERROR",  # errors only, no access log
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map at start
            "LITELLM_MODE": "PRODUCTION",  # no .env loading
        }
        progress(f"starting LiteLLM {version} proxy (1 worker, no database)")
        fleet.start(
            "litellm",
            [
                binary,
                "--config",
                str(litellm_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["litellm"]),
                "--num_workers",
                "1",
            ],
            env=litellm_env,
        )

    wait_until(fake, "fake upstream", lambda: http_ok(f"{fake_url}/healthz"))
    wait_until(bare, "bare proxy", lambda: http_ok(f"http://127.0.0.1:{ports['bare']}/healthz"))
    deadline = time.monotonic() + UP_READY_TIMEOUT_S
    banner = f"llmtap is up\n  proxy:     http://127.0.0.1:{ports['proxy']}/v1"
    while banner not in up.log.read_text(errors="replace"):
        if not up.alive():
            raise StartupFailed(f"llmtap up exited:\n{up.log_tail()}")
        if time.monotonic() > deadline:
            raise StartupFailed(f"llmtap not up after {UP_READY_TIMEOUT_S:.0f}s")
        time.sleep(0.2)
    if litellm_config is not None:
        litellm = fleet.servers["litellm"]
        wait_until(
            litellm,
            "LiteLLM proxy",
            lambda: http_ok(f"http://127.0.0.1:{ports['litellm']}/health/liveliness"),
        )

    path = "/v1/chat/completions"
    urls = {
        "direct": fake_url + path,
        "bare": f"http://127.0.0.1:{ports['bare']}{path}",
        "llmtap": f"http://127.0.0.1:{ports['proxy']}{path}",
        "litellm": f"http://127.0.0.1:{ports['litellm']}{path}",
    }
    targets = tuple(t for t in TARGETS if t != "litellm" or litellm_config is not None)
    mixes = {}
    for target in targets:
        mixes[target] = tmp / f"mix-{target}.json"
        if target == "llmtap":
            target_keys = keys[: len(KEYS)]
        elif target == "litellm":
            target_keys = [LITELLM_MASTER_KEY] * len(KEYS)
        else:
            target_keys = [UPSTREAM_CALLER[target]] * len(KEYS)
        write_mix(mixes[target], mix, target_keys, keys[-1])
    budget_path = tmp / "mix-budget.json"
    write_mix(budget_path, capped, [], keys[-1])
    return System(
        fleet=fleet,
        tmp=tmp,
        urls=urls,
        mixes=mixes,
        budget_mix_path=budget_path,
        fake_url=fake_url,
        api_url=f"http://127.0.0.1:{ports['api']}/api/v1",
        admin_key=admin_key,
        llmtap_keys=keys[: len(KEYS)],
        capped_key=keys[-1],
        cap_usd=cap,
        budgets=budgets,
        litellm_version=version,
        litellm_config=litellm_config,
        litellm_skipped=skipped,
        up=up,
        targets=targets,
    )


def _fake_usage(body: dict[str, Any]) -> Iterator[int]:
    usage = usage_for(body)
    yield usage["prompt_tokens"]
    yield usage["completion_tokens"]
    yield usage["prompt_tokens_details"]["cached_tokens"]
    yield usage["completion_tokens_details"]["reasoning_tokens"]


def stop_system(fleet: Fleet) -> None:
    """`llmtap up` first, given time to drain and stop its children; then the rest."""
    up = fleet.servers.get("up")
    if up is not None and up.alive():
        up.process.send_signal(signal.SIGTERM)
        try:
            up.process.wait(timeout=UP_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            up.process.kill()
            up.process.wait()
    fleet.stop_all()


# --- measurements ------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every call sent to llmtap, and what came back: the accounting's 'sent' side."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: Entry, record: dict[str, Any]) -> None:
        tenant = CAPPED.tenant if entry.key < 0 else KEYS[entry.key].tenant
        self.rows.append({**record, "tenant": tenant, "model": entry.model})


@dataclass
class Segment:
    """One load generator run against one target."""

    phase: str  # latency | throughput
    target: str
    round: int
    p50_ms: float
    p99_ms: float
    class_ms: dict[str, list[float]]  # stream / non-stream: [p50, p99]
    answers: int
    statuses: dict[str, int]
    errors: int
    error_kinds: dict[str, int]
    rps: float
    sent: int  # warm-up included
    send_lag_p99_ms: float
    proxy_cpu_us: float  # per request: the serving process (llmtap: the ingress)
    system_cpu_us: float  # per request: every process of the target (llmtap: all five)
    loadgen_cpu_us: float
    other_cores: float
    drain_s: float | None  # llmtap: from the end of the load to every row in ClickHouse


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_loadgen(url: str, mix: Path, records: Path, extra: list[str]) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "loadgen.py"), "--url", url, "--mix", str(mix)]
    argv += ["--records", str(records), *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def class_percentiles(records: list[dict[str, Any]], mix: list[Entry]) -> dict[str, list[float]]:
    by_class: dict[str, list[float]] = {"non-stream": [], "stream": []}
    for r in records:
        if not r["warm"] and r["error"] is None and r["status"] is not None:
            by_class["stream" if mix[r["entry"]].stream else "non-stream"].append(r["lat"])
    return {k: [percentile(v, 50), percentile(v, 99)] for k, v in by_class.items()}


@dataclass
class Bench:
    system: System
    mix: list[Entry]
    capped_mix: list[Entry]
    ledger: Ledger = field(default_factory=Ledger)
    counter: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # calls sent per target, all phases

    def records_path(self) -> Path:
        self.counter += 1
        return self.system.tmp / f"records-{self.counter}.jsonl"

    def rows_in_clickhouse(self) -> int:
        return int(self.system.sql("SELECT count() FROM calls")[0][0])

    def drain(self) -> float:
        """Wait until ClickHouse holds a row for every call sent to llmtap so far (or the
        count stops moving for 10 s); the seconds it took."""
        start = time.monotonic()
        expected = len(self.ledger.rows)
        last, last_change = -1, start
        while time.monotonic() - start < DRAIN_TIMEOUT_S:
            rows = self.rows_in_clickhouse()
            if rows >= expected:
                break
            if rows != last:
                last, last_change = rows, time.monotonic()
            elif time.monotonic() - last_change > 10:
                progress(f"    ClickHouse stuck at {rows:,} rows of {expected:,} expected")
                break
            time.sleep(0.1)
        return time.monotonic() - start

    def measure(self, phase: str, target: str, round_: int, extra: list[str]) -> Segment:
        system = self.system
        serving = system.ingress_pids() if target == "llmtap" else system.pids(target)
        every = system.pids(target)
        records_path = self.records_path()
        ours0, busy0, wall0 = cpu_seconds(system.all_pids()), machine_busy_seconds(), time.time()
        proxy0, all0 = cpu_seconds(serving), cpu_seconds(every)
        result = run_loadgen(system.urls[target], system.mixes[target], records_path, extra)
        proxy1 = cpu_seconds(serving)
        records = read_records(records_path)
        self.sent[target] += len(records)
        drain_s = None
        if target == "llmtap":
            for record in records:
                self.ledger.add(self.mix[record["entry"]], record)
            drain_s = self.drain()
        all1, busy1, wall1 = cpu_seconds(every), machine_busy_seconds(), time.time()
        ours = cpu_seconds(system.all_pids()) - ours0 + result["loadgen_cpu_s"]
        sent = max(1, len(records))
        lat = result["latencies_ms"]
        segment = Segment(
            phase=phase,
            target=target,
            round=round_,
            p50_ms=percentile(lat, 50),
            p99_ms=percentile(lat, 99),
            class_ms=class_percentiles(records, self.mix),
            answers=result["ok"],
            statuses=result["statuses"],
            errors=result["errors"],
            error_kinds=result["error_kinds"],
            rps=result["throughput_rps"],
            sent=len(records),
            send_lag_p99_ms=percentile(result["send_lag_ms"], 99),
            proxy_cpu_us=(proxy1 - proxy0) / sent * 1e6,
            system_cpu_us=(all1 - all0) / sent * 1e6,
            loadgen_cpu_us=result["loadgen_cpu_s"] / sent * 1e6,
            other_cores=max(0.0, (busy1 - busy0 - ours) / (wall1 - wall0)),
            drain_s=drain_s,
        )
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(segment.statuses.items()))
        errors = f"  no answer {segment.error_kinds}" if segment.errors else ""
        drained = f"  rows in {drain_s:.1f}s" if drain_s is not None else ""
        progress(
            f"  {phase:10} round {round_ + 1} {target:7} {segment.sent:6,} sent  "
            f"p50 {segment.p50_ms:7.2f} ms  p99 {segment.p99_ms:7.2f} ms  "
            f"{segment.rps:7.0f} req/s  [{statuses}]  CPU {segment.proxy_cpu_us:5.0f} us/req  "
            f"other load {segment.other_cores:.2f}{drained}{errors}"
        )
        system.check_alive()
        return segment

    async def sanity(self) -> dict[str, dict[str, int]]:
        """One call of each kind through every target: the statuses each answers."""
        system = self.system
        kinds = {"ok": None, "500": 500, "429": 429}
        seen: dict[str, dict[str, int]] = {}
        async with aiohttp.ClientSession() as session:
            for target in system.targets:
                mix = json.loads(system.mixes[target].read_text())["requests"]
                seen[target] = {}
                for kind, error in kinds.items():
                    for stream in (False, True):
                        index = next(
                            i
                            for i, e in enumerate(self.mix)
                            if e.upstream_error == error and e.stream == stream
                        )
                        item = mix[index]
                        headers = {
                            "Content-Type": "application/json",
                            "Authorization": f"Bearer {item['key']}",
                            **item["headers"],
                        }
                        entry = MixEntry(json.dumps(item["body"]).encode(), headers, stream)
                        answer = await call_mixed(session, system.urls[target], entry)
                        label = f"{kind}{' stream' if stream else ''}"
                        seen[target][label] = answer.status or 0
                        self.sent[target] += 1
                        if target == "llmtap":
                            self.ledger.add(self.mix[index], as_record(answer))
                        want = 200 if error is None else error
                        if answer.status != want or answer.error is not None:
                            raise RuntimeError(
                                f"{target}: {label} call answered {answer.status} "
                                f"({answer.error}), expected {want}"
                            )
        return seen


def as_record(answer: Answer, end: float | None = None) -> dict[str, Any]:
    return {
        "status": answer.status,
        "error": answer.error,
        "rid": answer.request_id,
        "end": end if end is not None else time.time(),
        "usage": answer.usage,
        "code": answer.code,
        "warm": True,
        "entry": -1,
        "i": -1,
        "lat": 0.0,
    }


def rotations(targets: tuple[str, ...], rounds: int) -> Iterator[tuple[int, tuple[str, ...]]]:
    for r in range(rounds):
        k = r % len(targets)
        yield r, targets[k:] + targets[:k]


# --- llmtap only: freshness, budget, accounting -----------------------------------------


@dataclass
class Freshness:
    sampled: int
    seen: int
    p50_s: float
    p99_s: float
    max_s: float
    poll_interval_s: float
    poll_p50_ms: float  # how long one SQL poll took
    background: dict[str, Any]


async def freshness(bench: Bench, args: argparse.Namespace) -> Freshness:
    """Probe calls (non-stream, gpt-4o-mini) at --probe-rate while the mix runs against
    llmtap at --rate; poll the SQL endpoint for their request ids."""
    system = bench.system
    records_path = bench.records_path()
    argv = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--url",
        system.urls["llmtap"],
        "--mix",
        str(system.mixes["llmtap"]),
        "--records",
        str(records_path),
        "--rate",
        str(args.freshness_rate),
        "--warmup",
        "0",
        "--duration",
        str(args.freshness_duration),
    ]
    background = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    probe_index = next(i for i, e in enumerate(bench.mix) if e.upstream_error is None)
    probe = bench.mix[probe_index]
    body = dict(probe.body, stream=False, model="gpt-4o-mini")
    body.pop("stream_options", None)
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {system.llmtap_keys[probe.key]}",
    }
    entry = MixEntry(json.dumps(body).encode(), headers, False)
    ended: dict[str, float] = {}
    visible: dict[str, float] = {}
    poll_ms: list[float] = []
    stop = asyncio.Event()

    async def prober(session: aiohttp.ClientSession) -> None:
        next_at = time.monotonic()
        until = next_at + args.freshness_duration
        while time.monotonic() < until:
            answer = await call_mixed(session, system.urls["llmtap"], entry)
            end = time.time()
            bench.ledger.add(
                Entry(probe.key, body, {}, "gpt-4o-mini", False, None), as_record(answer, end)
            )
            if answer.status == 200 and answer.request_id:
                ended[str(uuid.UUID(answer.request_id))] = end
            next_at += 1 / args.probe_rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        stop.set()

    async def poller() -> None:
        grace_until: float | None = None
        while True:
            if stop.is_set() and grace_until is None:
                grace_until = time.monotonic() + 30
            pending = [rid for rid in ended if rid not in visible]
            if stop.is_set() and (not pending or time.monotonic() > (grace_until or 0)):
                return
            if pending:
                ids = ", ".join(f"toUUID('{rid}')" for rid in pending)
                query = f"SELECT toString(request_id) FROM calls WHERE request_id IN ({ids})"
                sent = time.monotonic()
                rows = await asyncio.to_thread(system.sql, query)
                poll_ms.append((time.monotonic() - sent) * 1000)
                now = time.time()
                for (rid,) in rows:
                    visible.setdefault(rid, now)
            await asyncio.sleep(args.poll_interval)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(prober(session), poller())
    out, err = await asyncio.wait_for(background.communicate(), args.freshness_duration + 120)
    if background.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{err.decode(errors='replace')}")
    result = json.loads(out)
    for record in read_records(records_path):
        bench.ledger.add(bench.mix[record["entry"]], record)
    delays = [visible[rid] - end for rid, end in ended.items() if rid in visible]
    fresh = Freshness(
        sampled=len(ended),
        seen=len(delays),
        p50_s=percentile(delays, 50),
        p99_s=percentile(delays, 99),
        max_s=max(delays, default=float("nan")),
        poll_interval_s=args.poll_interval,
        poll_p50_ms=percentile(poll_ms, 50),
        background={
            "rate": args.freshness_rate,
            "answers": result["ok"],
            "statuses": result["statuses"],
            "errors": result["errors"],
            "p50_ms": percentile(result["latencies_ms"], 50),
            "p99_ms": percentile(result["latencies_ms"], 99),
        },
    )
    progress(
        f"  freshness: {fresh.seen}/{fresh.sampled} probe calls visible; p50 {fresh.p50_s:.2f} s"
        f"  p99 {fresh.p99_s:.2f} s  max {fresh.max_s:.2f} s  (background "
        f"{result['ok']:,} calls at {args.freshness_rate:g}/s)"
    )
    return fresh


@dataclass
class BudgetResult:
    cap_usd: str
    rate: float
    sent: int
    admitted: int
    refused: int
    other: dict[str, int]
    offered_cross_index: int | None  # the call with which the offered load crosses the cap
    first_refusal_index: int | None
    first_refusal_vs_offered_s: float | None  # negative: refused before the load crossed
    crossing_call_index: int | None  # the admitted call that took real spend over the cap
    lag_ms: float | None  # from that call's end to the first 429's end
    spent_at_first_refusal_pct: float | None
    spent_final_usd: str
    spent_final_pct: float
    admitted_after_first_refusal: int


def budget(bench: Bench, args: argparse.Namespace) -> BudgetResult:
    system = bench.system
    records_path = bench.records_path()
    extra = ["--rate", str(args.budget_rate), "--warmup", "0"]
    extra += ["--duration", str(args.budget_duration)]
    result = run_loadgen(system.urls["llmtap"], system.budget_mix_path, records_path, extra)
    records = sorted(read_records(records_path), key=lambda r: r["i"])
    catalog = load_catalog()
    cap = system.cap_usd
    # The offered load: every call as if admitted, in the order they were due.
    offered = Decimal(0)
    offered_cross = None
    for r in records:
        offered += price(
            catalog, "gpt-4o-mini", usage_of(list(_fake_usage(bench.capped_mix[r["entry"]].body)))
        )
        if offered > cap:
            offered_cross = r["i"]
            break
    refused = [r for r in records if r["status"] == 429 and r["code"] == "budget_exceeded"]
    refused_ids = {r["i"] for r in refused}
    first = min(refused, key=lambda r: r["end"]) if refused else None
    spent = Decimal(0)
    spent_at_first = None
    crossing = None
    admitted = [r for r in records if r["status"] == 200 and r["usage"]]
    for r in sorted(admitted, key=lambda r: r["end"]):
        if first is not None and spent_at_first is None and r["end"] > first["end"]:
            spent_at_first = spent
        spent += price(catalog, "gpt-4o-mini", usage_of(r["usage"]))
        if crossing is None and spent > cap:
            crossing = r
    if first is not None and spent_at_first is None:
        spent_at_first = spent
    for record in records:
        bench.ledger.add(bench.capped_mix[record["entry"]], record)
    other = Counter(
        str(r["status"]) if r["error"] is None else str(r["error"])
        for r in records
        if r["status"] != 200 and r["i"] not in refused_ids
    )
    outcome = BudgetResult(
        cap_usd=str(cap),
        rate=args.budget_rate,
        sent=len(records),
        admitted=len(admitted),
        refused=len(refused),
        other=dict(other),
        offered_cross_index=offered_cross,
        first_refusal_index=first["i"] if first else None,
        first_refusal_vs_offered_s=(
            (first["i"] - offered_cross) / args.budget_rate
            if first is not None and offered_cross is not None
            else None
        ),
        crossing_call_index=crossing["i"] if crossing else None,
        lag_ms=(first["end"] - crossing["end"]) * 1000 if first and crossing else None,
        spent_at_first_refusal_pct=(
            float(spent_at_first / cap * 100) if spent_at_first is not None else None
        ),
        spent_final_usd=str(spent),
        spent_final_pct=float(spent / cap * 100),
        admitted_after_first_refusal=sum(1 for r in admitted if first and r["end"] > first["end"]),
    )
    progress(
        f"  budget: cap ${cap}; {outcome.admitted} admitted, {outcome.refused} refused "
        f"(first at call #{outcome.first_refusal_index}, the offered load crosses at "
        f"#{outcome.offered_cross_index}); spent {outcome.spent_final_pct:.1f}% of the cap; "
        f"lag {'none crossed' if outcome.lag_ms is None else f'{outcome.lag_ms:.0f} ms'}"
        f"  ({result['ok']} answers)"
    )
    return outcome


@dataclass
class Accounting:
    sent: int
    sent_with_id: int
    sent_by_status: dict[str, int]
    rows: int
    distinct_ids: int
    missing: int  # sent (with an id) but not in ClickHouse
    unexpected: int  # in ClickHouse but never sent
    duplicates: int
    ch_by_status: dict[str, int]
    cost_sent_usd: str  # per call: usage the load generator got back x catalog price
    cost_ch_usd: str
    cost_fake_usd: str  # the fake's usage totals for llmtap's calls x catalog price
    fake_calls: int
    fake_expected_calls: int
    tokens_sent: list[int]  # prompt, completion
    tokens_ch: list[int]
    tokens_fake: list[int]
    drain_s: float
    by_tenant: dict[str, dict[str, Any]]


def money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000000001")))


def sent_status(row: dict[str, Any]) -> str:
    status, code = row["status"], row["code"]
    if status == 200 and row["error"] is None:
        return "ok"
    if status == 429 and code == "budget_exceeded":
        return "budget_exceeded"
    if status in (429, 500):
        return "upstream_error"
    return f"other ({row['error'] or status})"


def accounting(bench: Bench) -> Accounting:
    system = bench.system
    drain_s = bench.drain()
    catalog = load_catalog()
    rows = bench.ledger.rows
    ids = {str(uuid.UUID(r["rid"])) for r in rows if r["rid"]}
    in_ch: list[str] = []
    while True:
        page = system.sql(
            "SELECT toString(request_id) FROM calls ORDER BY request_id "
            f"LIMIT 10000 OFFSET {len(in_ch)}"
        )
        in_ch += [r[0] for r in page]
        if len(page) < 10000:
            break
    ch_ids = set(in_ch)
    by_status = {
        str(status): int(n)
        for status, n in system.sql("SELECT status, count() FROM calls GROUP BY status")
    }
    cost_row = system.sql(
        "SELECT toString(sum(cost_total)), sum(input_tokens), sum(output_tokens) FROM calls"
    )[0]
    cost_sent = Decimal(0)
    tokens_sent = [0, 0]
    tenants: dict[str, dict[str, Any]] = defaultdict(lambda: {"sent": 0, "cost_sent": Decimal(0)})
    for r in rows:
        tenants[r["tenant"]]["sent"] += 1
        if sent_status(r) == "ok" and r["usage"]:
            cost = price(catalog, r["model"], usage_of(r["usage"]))
            cost_sent += cost
            tenants[r["tenant"]]["cost_sent"] += cost
            tokens_sent[0] += r["usage"][0]
            tokens_sent[1] += r["usage"][1]
    for tenant, calls, cost in system.sql(
        "SELECT tenant, count(), toString(sum(cost_total)) FROM calls GROUP BY tenant"
    ):
        tenants[tenant]["rows"] = int(calls)
        tenants[tenant]["cost_ch"] = Decimal(cost)
    fake = get_json(f"{system.fake_url}/stats").get(UPSTREAM_CALLER["llmtap"], {})
    cost_fake = Decimal(0)
    tokens_fake = [0, 0]
    for model, t in fake.get("usage", {}).items():
        usage = Usage(
            input_tokens=t["prompt_tokens"],
            output_tokens=t["completion_tokens"],
            cached_input_tokens=t["cached_tokens"],
            reasoning_tokens=t["reasoning_tokens"],
        )
        cost_fake += price(catalog, model, usage)
        tokens_fake[0] += t["prompt_tokens"]
        tokens_fake[1] += t["completion_tokens"]
    sent_by = Counter(sent_status(r) for r in rows)
    result = Accounting(
        sent=len(rows),
        sent_with_id=len(ids),
        sent_by_status=dict(sent_by),
        rows=len(in_ch),
        distinct_ids=len(ch_ids),
        missing=len(ids - ch_ids),
        unexpected=len(ch_ids - ids),
        duplicates=len(in_ch) - len(ch_ids),
        ch_by_status=by_status,
        cost_sent_usd=money(cost_sent),
        cost_ch_usd=money(Decimal(cost_row[0])),
        cost_fake_usd=money(cost_fake),
        fake_calls=int(fake.get("requests", 0)),
        fake_expected_calls=sum(
            n for status, n in sent_by.items() if status in ("ok", "upstream_error")
        ),
        tokens_sent=tokens_sent,
        tokens_ch=[int(cost_row[1]), int(cost_row[2])],
        tokens_fake=tokens_fake,
        drain_s=drain_s,
        by_tenant={
            k: {kk: money(vv) if isinstance(vv, Decimal) else vv for kk, vv in v.items()}
            for k, v in sorted(tenants.items())
        },
    )
    progress(
        f"  accounting: sent {result.sent:,} calls, ClickHouse {result.rows:,} rows "
        f"({result.missing} missing, {result.duplicates} duplicated, {result.unexpected} "
        f"unexpected); cost sent ${result.cost_sent_usd}, in ClickHouse ${result.cost_ch_usd}, "
        f"fake usage x price ${result.cost_fake_usd}"
    )
    return result


# --- report ------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def by(segments: list[Segment], phase: str, target: str) -> list[Segment]:
    return sorted(
        (s for s in segments if s.phase == phase and s.target == target), key=lambda s: s.round
    )


def added(segments: list[Segment], target: str, pick: str, cls: str | None = None) -> float:
    """Median over rounds of (target - direct) at one percentile, measured per round."""

    def value(s: Segment) -> float:
        if cls is None:
            return float(getattr(s, pick))
        return s.class_ms[cls][0 if pick == "p50_ms" else 1]

    direct = {s.round: value(s) for s in by(segments, "latency", "direct")}
    return median(
        [value(s) - direct[s.round] for s in by(segments, "latency", target) if s.round in direct]
    )


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summary(segments: list[Segment], targets: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in targets:
        lat = by(segments, "latency", target)
        thr = by(segments, "throughput", target)
        out[target] = {
            "p50_ms": median([s.p50_ms for s in lat]),
            "p99_ms": median([s.p99_ms for s in lat]),
            "added_p50_ms": added(segments, target, "p50_ms") if target != "direct" else 0.0,
            "added_p99_ms": added(segments, target, "p99_ms") if target != "direct" else 0.0,
            "added_by_class_ms": {
                cls: [added(segments, target, p, cls) for p in ("p50_ms", "p99_ms")]
                for cls in ("non-stream", "stream")
            }
            if target != "direct"
            else {},
            "max_rps": median([s.rps for s in thr]),
            "p50_at_max_ms": median([s.p50_ms for s in thr]),
            "proxy_cpu_us": median([s.proxy_cpu_us for s in thr]),
            "system_cpu_us": median([s.system_cpu_us for s in thr]),
            "latency_statuses": dict(sum((Counter(s.statuses) for s in lat), Counter())),
            "no_answer": sum(s.errors for s in lat + thr),
        }
    if "litellm" in out:
        lt, ll = out["llmtap"], out["litellm"]
        out["ratios"] = {
            "added_p50": ratio(lt["added_p50_ms"], ll["added_p50_ms"]),
            "added_p99": ratio(lt["added_p99_ms"], ll["added_p99_ms"]),
            "max_rps": ratio(lt["max_rps"], ll["max_rps"]),
        }
    return out


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def verdict_added(r: float) -> str:
    if r != r:
        return "n/a"
    if r <= ADDED_RATIO_TARGET:
        return "met"
    return f"missed ({r / ADDED_RATIO_TARGET:.1f}x the allowed share)"


def verdict_rps(r: float) -> str:
    if r != r:
        return "n/a"
    if r >= RPS_RATIO_TARGET:
        return "met"
    return f"missed ({r:.2f}x, short by {(1 - r / RPS_RATIO_TARGET) * 100:.0f}%)"


def headline(s: dict[str, Any], targets: tuple[str, ...]) -> list[str]:
    cols = [t for t in ("bare", "llmtap", "litellm") if t in targets]
    head = " | ".join(NAMES[t] for t in cols)
    lines = [
        f"| measure | {head} | llmtap / LiteLLM | target |",
        "|---|" + "---:|" * len(cols) + "---:|---|",
    ]
    r = s.get("ratios", {})
    rows = (
        ("added latency p50 (ms)", "added_p50_ms", "added_p50", 2),
        ("added latency p99 (ms)", "added_p99_ms", "added_p99", 2),
        ("max sustained req/s", "max_rps", "max_rps", 0),
    )
    for label, key, rkey, digits in rows:
        cells = " | ".join(fmt(s[t][key], digits) for t in cols)
        if "litellm" in s:
            value = r[rkey]
            goal = (
                f"<= {ADDED_RATIO_TARGET:g}x: {verdict_added(value)}"
                if rkey != "max_rps"
                else f">= {RPS_RATIO_TARGET:g}x: {verdict_rps(value)}"
            )
            lines.append(f"| {label} | {cells} | {fmt(value, 3)}x | {goal} |")
        else:
            lines.append(f"| {label} | {cells} | n/a | n/a |")
    return lines


def render(report: dict[str, Any], segments: list[Segment]) -> str:
    a = report["args"]
    s = report["summary"]
    targets = tuple(report["targets"])
    fresh = report.get("freshness")
    bud = report.get("budget")
    acc = report.get("accounting")
    env = report["environment"]
    other = [seg.other_cores for seg in segments]
    lines = [
        "# System benchmark: llmtap, LiteLLM and a bare proxy, side by side",
        "",
        f"- date: {report['started']} UTC, took {report['took_s'] / 60:.1f} min; machine: "
        f"{env['cores']} cores, {env['system']}, Python {env['python']}, aiohttp "
        f"{env['aiohttp']}, LiteLLM {report['litellm']['version'] or 'not installed'}",
        f"- load average (1 min) at start {env['load_start']:.2f}, at end {env['load_end']:.2f}"
        + "".join(f"; {note}" for note in env["notes"])
        + f"; other processes (not started by the benchmark) used a median of "
        f"{median(other):.2f} cores (max {max(other, default=0):.2f}) during the measurements "
        "('other load' per round below)",
        f"- fake upstream: {a['upstream_latency_ms']:g} ms before every answer; usage from the "
        "request (8 + characters/4 prompt tokens, a quarter cached; max_tokens or 5 completion "
        "tokens)",
        f"- mix ({a['mix_size']} requests, cycled; the same sequence for every target): models "
        + ", ".join(f"{m} {w}%" for m, w in MODELS)
        + f"; {a['stream_share'] * 100:.0f}% streaming; {a['error_share'] * 100:.0f}% upstream "
        "errors (60% 500, 40% 429); prompts of 60/400/3000 characters (50/35/15%); "
        "max_tokens on half; 4 keys over 3 tenants (llmtap virtual keys; LiteLLM its master "
        "key); an attribution header on half",
        f"- latency: open loop at {a['rate']:g} requests/s, {a['rounds']} interleaved rounds "
        f"(order rotated), each {a['duration'] / a['rounds']:.1f} s measured after "
        f"{a['warmup'] / a['rounds']:.1f} s warm-up; latency from the scheduled send time to the "
        "last byte, every HTTP answer counted (the upstream errors are part of the mix)",
        f"- throughput: closed loop, {a['concurrency']} concurrent workers, {a['rounds']} rounds "
        f"of {a['throughput_duration'] / a['rounds']:.1f} s after 2 s warm-up; before both, "
        f"{a['target_warmup']:g} s of the mix at the fixed rate through each target, not counted",
        "- llmtap is the whole system (`llmtap up`: Tansu broker, store with chDB and the "
        "analytics API, Faust worker, ingress); after each llmtap measurement the next waits "
        "until ClickHouse holds every call's row, so its pipeline's catch-up does not land on "
        "the next target",
        "- all processes share this machine's 2 cores (with other engineers' work): absolute "
        "numbers are this machine's; the ratios, measured side by side, carry over",
        "",
        "## Results",
        "",
        *headline(s, targets),
        "",
    ]
    if fresh and bud and acc:
        lines += [
            "| llmtap only | value |",
            "|---|---|",
            f"| freshness p50 / p99 (call end -> row visible via SQL) | {fmt(fresh['p50_s'])} s / "
            f"{fmt(fresh['p99_s'])} s ({fresh['seen']}/{fresh['sampled']} probes seen) |",
            f"| budget enforcement lag (call crossing the cap -> first 429) | "
            f"{budget_lag_text(bud)} |",
            f"| accounting: calls | sent {acc['sent']:,}, in ClickHouse {acc['rows']:,} "
            f"({acc['missing']} missing, {acc['duplicates']} duplicated, "
            f"{acc['unexpected']} unexpected) |",
            f"| accounting: cost | sent ${acc['cost_sent_usd']}, ClickHouse "
            f"${acc['cost_ch_usd']}, fake usage x price ${acc['cost_fake_usd']} |",
            "",
        ]
    if report["litellm"]["skipped"]:
        lines += [f"LiteLLM was not measured: {report['litellm']['skipped']}.", ""]
    lines += [
        "## Latency at a fixed rate (medians over rounds)",
        "",
        "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | added p50 / p99, "
        "non-stream | added p50 / p99, stream | answers by status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        x = s[t]
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(x["latency_statuses"].items()))
        if t == "direct":
            cells = "- | - | - | -"
        else:
            ns, st = x["added_by_class_ms"]["non-stream"], x["added_by_class_ms"]["stream"]
            cells = (
                f"{fmt(x['added_p50_ms'])} | {fmt(x['added_p99_ms'])} | "
                f"{fmt(ns[0])} / {fmt(ns[1])} | {fmt(st[0])} / {fmt(st[1])}"
            )
        lines.append(
            f"| {NAMES[t]} | {fmt(x['p50_ms'])} | {fmt(x['p99_ms'])} | {cells} | {statuses} |"
        )
    lines += [
        "",
        f"## Maximum sustained throughput (closed loop, {a['concurrency']} workers)",
        "",
        "| target | req/s (median of rounds) | p50 ms at max | serving process CPU us/req | "
        "all its processes, CPU us/req | calls without an answer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        x = s[t]
        lines.append(
            f"| {NAMES[t]} | {fmt(x['max_rps'], 0)} | {fmt(x['p50_at_max_ms'], 1)} | "
            f"{fmt(x['proxy_cpu_us'], 0)} | {fmt(x['system_cpu_us'], 0)} | {x['no_answer']} |"
        )
    if fresh:
        bg = fresh["background"]
        lines += [
            "",
            "## llmtap: freshness",
            "",
            f"{fresh['sampled']} probe calls (non-stream, {a['probe_rate']:g}/s) over "
            f"{a['freshness_duration']:g} s while the mix ran against llmtap at {bg['rate']:g}/s "
            f"({bg['answers']:,} answers, p50 {fmt(bg['p50_ms'])} ms, p99 {fmt(bg['p99_ms'])} ms). "
            f"The SQL endpoint was polled every {fresh['poll_interval_s']:g} s for the request ids "
            f"not yet seen (one poll took {fmt(fresh['poll_p50_ms'], 0)} ms at the median); a "
            "call's freshness runs from the last byte of its answer to the end of the first poll "
            "that returned its row (an upper bound, by at most one poll).",
            "",
            "| probes | seen | p50 s | p99 s | max s |",
            "|---:|---:|---:|---:|---:|",
            f"| {fresh['sampled']} | {fresh['seen']} | {fmt(fresh['p50_s'])} | "
            f"{fmt(fresh['p99_s'])} | {fmt(fresh['max_s'])} |",
        ]
    if bud:
        crossing = "no" if bud["crossing_call_index"] is None else f"#{bud['crossing_call_index']}"
        lines += [
            "",
            "## llmtap: budget enforcement",
            "",
            f"Tenant `{CAPPED.tenant}` (its own key), hard cap ${bud['cap_usd']} per day, sized "
            f"so the offered load ({bud['rate']:g} calls/s of gpt-4o-mini, 400-character prompt, "
            f"max_tokens 32) crosses it after {a['budget_cross_after_s']:g} s; "
            f"{a['budget_duration']:g} s of load.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| calls sent / admitted / refused with `budget_exceeded` | {bud['sent']} / "
            f"{bud['admitted']} / {bud['refused']} |",
            f"| the offered load crosses the cap at call | #{bud['offered_cross_index']} |",
            f"| first 429 at call | #{bud['first_refusal_index']} "
            f"({fmt_signed_s(bud['first_refusal_vs_offered_s'])} relative to the crossing) |",
            f"| an admitted call took real spend over the cap | {crossing} |",
            f"| enforcement lag (that call's end -> first 429) | {budget_lag_text(bud)} |",
            f"| spend when the first 429 came | {fmt(bud['spent_at_first_refusal_pct'], 1)}% of "
            "the cap |",
            f"| spend at the end | ${bud['spent_final_usd']} ({bud['spent_final_pct']:.1f}% of "
            "the cap) |",
            f"| calls admitted after the first 429 (what was left fit them) | "
            f"{bud['admitted_after_first_refusal']} |",
        ]
    if acc:
        lines += [
            "",
            "## llmtap: accounting",
            "",
            "Every call the load generators and probes sent to llmtap in this run, against the "
            "`calls` table (read through the SQL endpoint with the admin key) once the pipeline "
            f"had caught up ({acc['drain_s']:.1f} s after the last call), and against what the "
            "fake upstream counted for llmtap's provider key.",
            "",
            "| measure | sent / expected | ClickHouse | fake upstream |",
            "|---|---:|---:|---:|",
            f"| calls | {acc['sent']:,} ({acc['sent_with_id']:,} with a request id) | "
            f"{acc['rows']:,} rows, {acc['distinct_ids']:,} distinct ids | - |",
            f"| calls that reached the provider | {acc['fake_expected_calls']:,} | "
            f"{acc['ch_by_status'].get('ok', 0) + acc['ch_by_status'].get('upstream_error', 0):,}"
            f" | {acc['fake_calls']:,} |",
            f"| missing / duplicated / unexpected rows | - | {acc['missing']} / "
            f"{acc['duplicates']} / {acc['unexpected']} | - |",
            f"| cost (USD) | {acc['cost_sent_usd']} | {acc['cost_ch_usd']} | "
            f"{acc['cost_fake_usd']} |",
            f"| prompt / completion tokens | {acc['tokens_sent'][0]:,} / "
            f"{acc['tokens_sent'][1]:,} | {acc['tokens_ch'][0]:,} / {acc['tokens_ch'][1]:,} | "
            f"{acc['tokens_fake'][0]:,} / {acc['tokens_fake'][1]:,} |",
            "",
            "By status, sent: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(acc["sent_by_status"].items()))
            + "; in ClickHouse: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(acc["ch_by_status"].items()))
            + ". 'Sent' cost prices each answered call's usage (as the answer reported it) "
            "with the catalog, rounded per call as llmtap does; the fake's column prices its "
            "token totals per model, rounded once (so it may differ by rounding, under a "
            "nano-dollar per call).",
        ]
    lines += [
        "",
        "## Every round",
        "",
        "| phase | round | target | sent | p50 ms | p99 ms | req/s | statuses | no answer | "
        "send lag p99 ms | proxy CPU us/req | all CPU us/req | load gen CPU us/req | "
        "other load (cores) | rows in ClickHouse after (s) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seg in segments:
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(seg.statuses.items()))
        drain = "-" if seg.drain_s is None else f"{seg.drain_s:.1f}"
        lag = "-" if seg.phase == "throughput" else fmt(seg.send_lag_p99_ms)
        lines.append(
            f"| {seg.phase} | {seg.round + 1} | {seg.target} | {seg.sent:,} | {fmt(seg.p50_ms)} | "
            f"{fmt(seg.p99_ms)} | {fmt(seg.rps, 0)} | {statuses} | {seg.errors} | {lag} | "
            f"{fmt(seg.proxy_cpu_us, 0)} | {fmt(seg.system_cpu_us, 0)} | "
            f"{fmt(seg.loadgen_cpu_us, 0)} | {seg.other_cores:.2f} | {drain} |"
        )
    upstream = report.get("upstream_calls", {})
    if upstream:
        lines += [
            "",
            "Upstream calls per client call (the fake's count for each target's credential, "
            "over the client calls that reach the provider): "
            + ", ".join(f"{t} {fmt(v, 3)}" for t, v in upstream.items())
            + " (1.000: no retries, nothing dropped).",
        ]
    if report["litellm"]["config"]:
        lines += [
            "",
            "## LiteLLM configuration used",
            "",
            f"`litellm --config litellm.yaml --host 127.0.0.1 --port N --num_workers 1` "
            f"(LiteLLM {report['litellm']['version']}), environment `LITELLM_LOG=ERROR`, "
            "`LITELLM_LOCAL_MODEL_COST_MAP=True`, `LITELLM_MODE=PRODUCTION`; no database, so no "
            "virtual keys, spend tracking or budgets on its side:",
            "",
            "```yaml",
            yaml.safe_dump(report["litellm"]["config"], sort_keys=False).rstrip(),
            "```",
        ]
    lines += [
        "",
        "Added latency = target minus direct, computed in each round from that round's p50 "
        "(or p99), then the median over rounds. Proxy CPU us/req = CPU time of the serving "
        "process (llmtap: the ingress; LiteLLM: its process tree) over the measurement divided "
        "by the calls sent; 'all' adds every process of the target (llmtap: supervisor, broker, "
        "store, stream worker and ingress, until the rows were written). Targets (issue #7): "
        f"llmtap's added latency <= {ADDED_RATIO_TARGET:g}x LiteLLM's at p50 and p99; llmtap's "
        f"sustained requests/s >= {RPS_RATIO_TARGET:g}x LiteLLM's.",
        "",
    ]
    return "\n".join(lines)


def fmt_signed_s(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f} s"


def budget_lag_text(bud: dict[str, Any]) -> str:
    if bud["lag_ms"] is not None:
        return f"{bud['lag_ms']:.0f} ms"
    if bud["first_refusal_index"] is None:
        return "no 429 came (the cap was not reached)"
    return (
        "none: no call took spend over the cap; the first 429 came at "
        f"{fmt(bud['spent_at_first_refusal_pct'], 1)}% of it, "
        f"{fmt_signed_s(bud['first_refusal_vs_offered_s'])} from where the offered load crosses"
    )


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--upstream-latency-ms", type=float, default=50.0, help="the fake's delay per answer")
    add("--rate", type=float, default=30.0, help="open loop requests/s (a rate LiteLLM sustains)")
    add("--duration", type=float, default=60.0, help="latency: seconds measured per target")
    add("--warmup", type=float, default=10.0, help="latency: warm-up seconds per target")
    add("--rounds", type=int, default=5, help="interleaved rounds")
    add("--concurrency", type=int, default=128, help="closed loop workers")
    add("--target-warmup", type=float, default=5.0, help="seconds of load per target first")
    add("--throughput-duration", type=float, default=25.0, help="seconds per target")
    add("--stream-share", type=float, default=0.3, help="share of streaming calls")
    add("--error-share", type=float, default=0.05, help="share of upstream 500/429s")
    add("--mix-size", type=int, default=500, help="distinct requests in the mix")
    add("--seed", type=int, default=7)
    add("--freshness-duration", type=float, default=30.0, help="seconds of probes")
    add("--freshness-rate", type=float, default=100.0, help="mixed load on llmtap meanwhile")
    add("--probe-rate", type=float, default=5.0, help="freshness probe calls/s")
    add("--poll-interval", type=float, default=0.1, help="freshness: seconds between polls")
    add("--budget-rate", type=float, default=100.0, help="capped tenant's calls/s")
    add("--budget-duration", type=float, default=12.0, help="seconds of the budget step")
    add("--budget-cross-after-s", type=float, default=5.0, help="when the load crosses the cap")
    add("--max-load", type=float, default=2.0, help="wait until the load average is <= this")
    add("--max-wait-min", type=float, default=20.0, help="...for at most this long")
    add("--no-litellm", action="store_true", help="leave LiteLLM out")
    add("--smoke", action="store_true", help="short run to check that everything works")
    add("--out", type=Path, help="default results/system.md (--smoke: in the temp dir)")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.rounds = 4.0, 2.0, 2
        args.throughput_duration, args.freshness_duration = 4.0, 5.0
        args.target_warmup = 2.0
        args.budget_duration, args.budget_cross_after_s = 6.0, 2.0
        args.max_load = 0.0
    if args.out is None:
        smoke = Path(tempfile.gettempdir()) / "llmtap-system-smoke.md"
        args.out = smoke if args.smoke else BENCH / "results" / "system.md"
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    notes = wait_for_quiet_machine(args.max_load, args.max_wait_min * 60)
    started, t0, load_start = datetime.now(UTC), time.monotonic(), loadavg()
    segments: list[Segment] = []
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmtap-system-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fleet = Fleet(tmp)
        try:
            system = start_system(fleet, tmp, args)
            mix = make_mix(args.mix_size, args.stream_share, args.error_share, args.seed)
            bench = Bench(system, mix, budget_mix(args.mix_size, args.seed + 1))
            progress(f"up: {', '.join(system.targets)}; checking one call of each kind")
            sanity = asyncio.run(bench.sanity())
            progress(f"warm-up: {args.target_warmup:g} s of the mix at {args.rate:g}/s per target")
            for target in system.targets:
                extra = ["--rate", str(args.rate), "--warmup", "0"]
                extra += ["--duration", str(args.target_warmup)]
                bench.measure("warm-up", target, 0, extra)
            per = ["--duration", str(args.duration / args.rounds)]
            per += ["--warmup", str(args.warmup / args.rounds)]
            progress(f"latency: open loop at {args.rate:g}/s, {args.rounds} rounds")
            for r, order in rotations(system.targets, args.rounds):
                for target in order:
                    extra = ["--rate", str(args.rate), *per]
                    segments.append(bench.measure("latency", target, r, extra))
            progress(f"throughput: closed loop, {args.concurrency} workers, {args.rounds} rounds")
            closed = ["--closed", str(args.concurrency), "--warmup", "2"]
            closed += ["--duration", str(args.throughput_duration / args.rounds)]
            for r, order in rotations(system.targets, args.rounds):
                for target in order:
                    segments.append(bench.measure("throughput", target, r, closed))
            progress("llmtap freshness (probes under the mixed load)")
            fresh = asyncio.run(freshness(bench, args))
            progress("llmtap budget enforcement")
            bud = budget(bench, args)
            progress("llmtap accounting")
            acc = accounting(bench)
            stats = get_json(f"{system.fake_url}/stats")
            upstream_calls = {}
            for target in system.targets:
                if target == "llmtap":
                    expected = acc.fake_expected_calls
                else:
                    expected = bench.sent[target]
                got = stats.get(UPSTREAM_CALLER[target], {}).get("requests", 0)
                upstream_calls[target] = got / expected if expected else float("nan")
            report = {
                "started": f"{started:%Y-%m-%d %H:%M}",
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "targets": list(system.targets),
                "environment": {
                    "cores": os.cpu_count(),
                    "system": f"{platform.system()} {platform.release()}",
                    "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__,
                    "load_start": load_start,
                    "notes": notes,
                },
                "litellm": {
                    "version": system.litellm_version,
                    "config": system.litellm_config,
                    "skipped": system.litellm_skipped,
                },
                "budgets": system.budgets,
                "sanity": sanity,
                "summary": summary(segments, system.targets),
                "freshness": asdict(fresh),
                "budget": asdict(bud),
                "accounting": asdict(acc),
                "upstream_calls": upstream_calls,
                "segments": [asdict(s) for s in segments],
            }
        except StartupFailed as exc:
            progress(f"startup failed: {exc}")
            return 1
        except KeyboardInterrupt:
            progress("interrupted: stopping every process started")
            return 130
        except Exception:
            for server in fleet.servers.values():
                progress(f"--- {server.name} log tail:\n{server.log_tail(15)}")
            raise
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                progress("stopping everything")
                stop_system(fleet)
    report["took_s"] = time.monotonic() - t0
    report["environment"]["load_end"] = loadavg()
    text = render(report, segments)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
