"""The report: medians over rounds, added latency against direct, the llmtap / LiteLLM
ratios and their verdicts, the markdown."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import yaml

from system.measure import Segment
from system.mix import CAPPED, MODELS

NAMES = {
    "direct": "direct (no proxy)",
    "bare": "bare aiohttp proxy",
    "llmtap": "llmtap (whole system)",
    "litellm": "LiteLLM proxy",
}
ADDED_RATIO_TARGET = 0.1  # llmtap's added latency <= a tenth of LiteLLM's
RPS_RATIO_TARGET = 5.0  # llmtap's sustained requests/s >= 5x LiteLLM's


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
