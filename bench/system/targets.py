"""What is measured, started and stopped: the fake upstream, the bare proxy, llmtap
(`llmtap up` with its config, keys and budgets) and LiteLLM's proxy (its config)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from ingress_latency import Fleet, Server, StartupFailed, free_port, http_ok, wait_until

from stream.catalog import load_catalog
from system.mix import (
    CAPPED,
    KEYS,
    MODELS,
    budget_mix,
    fake_usage,
    make_mix,
    price,
    usage_of,
    write_mix,
)
from system.processes import BENCH, cmdline, post_json, process_tree, progress, run_cli

TARGETS = ("direct", "bare", "llmtap", "litellm")
UP_READY_TIMEOUT_S = 180.0
UP_STOP_TIMEOUT_S = 60.0
LITELLM_MASTER_KEY = "sk-bench-litellm-master"
# What each target presents upstream: the fake counts its calls per bearer token.
UPSTREAM_CALLER = {
    "direct": "sk-direct",
    "bare": "sk-bare",
    "llmtap": "sk-llmtap-upstream",
    "litellm": "sk-litellm-upstream",
}


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
    ports = {
        name: free_port()
        for name in ("fake", "bare", "proxy", "api", "worker", "broker", "litellm")
    }
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
    per_call = price(catalog, "gpt-4o-mini", usage_of(list(fake_usage(capped[0].body))))
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
        "worker_metrics_port": ports["worker"],
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
