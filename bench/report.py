"""The bench's output: figures under fixed JSON keys, Markdown tables, a PNG chart.

`figures()` maps the sections' results to the keys of issue 5; `targets()` checks
them against the issue's targets; `markdown()` renders everything with the machine
and versions; `chart()` draws latency cache on/off and req/s against the references.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.hotpath import LABELS
from bench.procs import REPO_ROOT
from bench.stats import percentile

KEYS = (
    "poll_db_reads_per_job",
    "poll_hit_rate",
    "rps_const",
    "rps_redis_passthrough",
    "rps_cached_poll",
    "rps_uncached_poll",
    "rps_304",
    "p99_ms_redis_passthrough",
    "p99_ms_cached_poll",
    "stampede_db_reads",
    "write_ratio_vs_db",
    "write_redis_round_trips",
    "outage_errors",
    "outage_p99_delta_ms",
    "recovery_seconds",
    "slowdb_db_reads",
    "slowdb_next_wave_hit_rate",
    "rps_raw_asgi_evalsha",
    "poll_batch_mean",
    "p50_ms_cached_poll_1client",
    "cpu_us_cached_poll",
)


def figures(results: dict[str, Any]) -> dict[str, float]:
    """The headline figures under the keys of issue 5."""
    poll, hot = results["poll"], results["hotpath"]["table"]
    return {
        "poll_db_reads_per_job": poll["table"]["on"]["db_queries_per_job"],
        "poll_hit_rate": poll["table"]["on"]["hit_rate"],
        "rps_const": hot["const"]["rps"],
        "rps_redis_passthrough": hot["redis_passthrough"]["rps"],
        "rps_cached_poll": hot["cached_poll"]["rps"],
        "rps_uncached_poll": hot["uncached_poll"]["rps"],
        "rps_304": hot["conditional_304"]["rps"],
        "p99_ms_redis_passthrough": hot["redis_passthrough"]["p99_ms"],
        "p99_ms_cached_poll": hot["cached_poll"]["p99_ms"],
        "stampede_db_reads": results["stampede"]["db_reads"],
        "write_ratio_vs_db": results["writepath"]["ratio"],
        "write_redis_round_trips": results["writepath"]["redis_round_trips"],
        "outage_errors": results["outage"]["errors"],
        "outage_p99_delta_ms": results["outage"]["p99_delta_ms"],
        "recovery_seconds": results["outage"]["recovery_seconds"],
        **sse_figures(results),
        **section_figures("slowdb", results),
        "rps_raw_asgi_evalsha": hot["raw_asgi_evalsha"]["rps"],
        "poll_batch_mean": results["hotpath"]["batches"]["mean"],
        "p50_ms_cached_poll_1client": results["hotpath"]["concurrency"]["cached_poll"]["1"][
            "p50_ms"
        ],
        "cpu_us_cached_poll": hot["cached_poll"]["server_cpu_us"],
    }


def sse_figures(results: dict[str, Any]) -> dict[str, float]:
    """Section 7's headline figures (NaN when the section did not run)."""
    live = results.get("sse")
    if live is None:
        nan = float("nan")
        keys = ("sse_max_streams", "sse_p99_ms_at_2000", "sse_kib_per_stream")
        return dict.fromkeys((*keys, "sse_cpu_ratio_vs_poll"), nan)
    return {
        "sse_max_streams": live["max_streams"],
        "sse_p99_ms_at_2000": live["p99_ms_at_2000"],
        "sse_kib_per_stream": live["kib_per_stream"],
        "sse_cpu_ratio_vs_poll": live["cpu_ratio_vs_poll"],
    }


SSE_COLUMNS = ["clients", "connected", "events", "p50 ms", "p99 ms", "KiB/stream",
               "API CPU s", "CPU ms/event", "DB reads/s"]  # fmt: skip


def sse_markdown(results: dict[str, Any]) -> list[str]:
    """Section 7 of latest.md."""
    live = results.get("sse")
    if live is None:
        return []
    rows: list[list[Any]] = []
    fields = ("p50_ms", "p99_ms", "kib_per_stream", "api_cpu_s", "api_cpu_ms_per_event",
              "db_reads_per_s")  # fmt: skip
    for n, row in live["streams"].items():
        rows.append(
            [f"SSE, {n} streams", row["connected"], row["events"]]
            + [_sse_fmt(row[name]) for name in fields]
        )
    poll = live["polling"]
    label = f"polling at 1 s, {poll['clients']} clients"
    cpu, reads = _sse_fmt(poll["api_cpu_s"]), _sse_fmt(poll["db_reads_per_s"])
    rows.append([label, poll["connected"], f"{poll['requests']} polls", "-", "-", "-", cpu, "-",
                 reads])  # fmt: skip
    return [
        "## 7. Live progress: SSE against polling",
        "",
        f"One API process; a writer updates 100 jobs at {live['write_rate']:g} versions/s in "
        f"total for {live['seconds']:g} s per row. Latency: from the version's `updated_at` "
        "(just before its commit) to the client reading the event. Memory: the API's RSS with "
        "the streams open, minus before, per stream. CPU: the API's process group over the "
        "window.",
        "",
        *_table(SSE_COLUMNS, rows),
        "",
        f"Push costs {_sse_fmt(live['cpu_ratio_vs_poll'])}x the API CPU of polling at 1 s for the "
        f"same {live['compare_clients']} clients; most streams held: {live['max_streams']}.",
        "",
    ]


def _sse_fmt(value: Any) -> str:
    return "-" if value is None else _fmt(value)


def section_figures(name: str, results: dict[str, Any]) -> dict[str, float]:
    """The headline figures of a section that can run alone (`python -m bench --only`)."""
    assert name == "slowdb", name
    return {
        "slowdb_db_reads": results["slowdb"]["db_reads"],
        "slowdb_next_wave_hit_rate": results["slowdb"]["next_wave_hit_rate"],
    }


def section_targets(name: str, figs: dict[str, float]) -> list[dict[str, Any]]:
    """The target rows of a section that can run alone."""
    assert name == "slowdb", name
    rows = [
        (
            "slow DB (+600 ms): DB reads for 200 cold polls",
            figs["slowdb_db_reads"],
            "≤ 2",
            lambda v: v <= 2,
        ),
        (
            "slow DB (+600 ms): hit rate of the next 200 polls (%)",
            figs["slowdb_next_wave_hit_rate"],
            "= 100",
            lambda v: v == 100,
        ),
    ]
    return _checks(rows)


def _checks(rows: list[tuple[str, float, str, Callable[[float], bool]]]) -> list[dict[str, Any]]:
    return [
        {
            "target": name,
            "value": value,
            "goal": goal,
            "met": bool(not math.isnan(value) and ok(value)),
        }
        for name, value, goal, ok in rows
    ]


def targets(results: dict[str, Any], figs: dict[str, float]) -> list[dict[str, Any]]:
    """Each target of issue 5: what was measured, and whether it is met."""
    ratios = results["hotpath"]["ratios"]
    rows: list[tuple[str, float, str, Callable[[float], bool]]] = [
        (
            "DB reads per job over its 40 polls",
            figs["poll_db_reads_per_job"],
            "≤ 1",
            lambda v: v <= 1,
        ),
        ("hit rate while polling (%)", figs["poll_hit_rate"], "≥ 97", lambda v: v >= 97),
        ("req/s (c) / (b)", ratios["cached_vs_redis_passthrough"], "≥ 0.8", lambda v: v >= 0.8),
        ("req/s (c) / (d)", ratios["cached_vs_uncached"], "≥ 5", lambda v: v >= 5),
        ("p99 (c) / p99 (b)", ratios["p99_cached_vs_redis_passthrough"], "≤ 2", lambda v: v <= 2),
        (
            "stampede: DB reads for 200 cold requests",
            figs["stampede_db_reads"],
            "= 1",
            lambda v: v == 1,
        ),
        ("write: cached / bare DB update", figs["write_ratio_vs_db"], "≤ 1.5", lambda v: v <= 1.5),
        (
            "write: Redis round trips per update",
            figs["write_redis_round_trips"],
            "= 1",
            lambda v: v == 1,
        ),
        ("outage: errors", figs["outage_errors"], "= 0", lambda v: v == 0),
        (
            "outage: p99 - cache-off p99 (ms)",
            figs["outage_p99_delta_ms"],
            "≤ +10",
            lambda v: v <= 10,
        ),
        (
            "outage: seconds until caching resumes",
            figs["recovery_seconds"],
            "≤ 5",
            lambda v: v <= 5,
        ),
        ("SSE: p99 ms at 2,000 streams", figs["sse_p99_ms_at_2000"], "≤ 50", lambda v: v <= 50),
        ("SSE: KiB per open stream", figs["sse_kib_per_stream"], "≤ 50", lambda v: v <= 50),
        (
            "SSE: API CPU, push / polling at 1 s",
            figs["sse_cpu_ratio_vs_poll"],
            "≤ 0.2",
            lambda v: v <= 0.2,
        ),
    ]
    # Issue 12's goals for the hot poll (same run, same worker count, 64 clients).
    rows += [
        (
            "hot poll: req/s (c) / (b) (issue 12 goal)",
            ratios["cached_vs_redis_passthrough"],
            "≥ 2.5",
            lambda v: v >= 2.5,
        ),
        (
            "hot poll: p99 (c) / p99 (b) (issue 12 goal)",
            ratios["p99_cached_vs_redis_passthrough"],
            "≤ 1",
            lambda v: v <= 1,
        ),
    ]
    return _checks(rows) + section_targets("slowdb", figs)


# -- machine ----------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(*argv: str) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False, cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).strip()


def machine(*, redis_version: str, postgres_version: str, tool: str) -> dict[str, str]:
    """The machine and the versions a run measured."""
    commit = _run("git", "rev-parse", "--short", "HEAD")
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no", "--", "api", "shared")
    wrk = _run("wrk", "-v").splitlines()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (api/ or shared/ modified)" if dirty else ""),
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "postgres": postgres_version,
        "fastapi": _version("fastapi"),
        "starlette": _version("starlette"),
        "uvicorn": _version("uvicorn"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "sqlalchemy": _version("sqlalchemy"),
        "psycopg": _version("psycopg"),
        "load_generator": (wrk[0].split(" [")[0] if wrk and tool == "wrk" else tool),
    }


# -- markdown ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == int(value) and abs(value) >= 100:
            return f"{int(value):,}"
        return f"{value:,.{digits}f}"
    return str(value)


def _fallbacks(result: dict[str, Any]) -> list[str]:
    """A note when a cache-on API fell back to the database during a section."""
    opened = {k: v for k, v in result.get("breaker_openings", {}).items() if v}
    if not opened:
        return []
    which = ", ".join(f"{name}: {count} times" for name, count in sorted(opened.items()))
    return [
        "",
        f"**Note:** the cache's breaker opened during this section ({which}): some "
        "requests were served from the database although Redis was never broken on purpose.",
    ]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(
    results: dict[str, Any],
    figs: dict[str, float],
    checks: list[dict[str, Any]],
    mach: dict[str, str],
    *,
    command: str,
) -> str:
    poll, hot = results["poll"], results["hotpath"]
    p = poll["params"]
    out = [
        "# renderwatch benchmark",
        "",
        f"`{command}` — {mach['date']}, commit {mach['commit']}, run `{results['config']}`.",
        "Every figure is the median of repeated rounds taken in this one run; ratios are",
        "taken round by round. Absolute times drift between runs on this shared VM: compare",
        "the columns, not the numbers across runs.",
        "",
        "## Targets (issue 5)",
        "",
        *_table(
            ["target", "measured", "goal", "met"],
            [[c["target"], c["value"], c["goal"], c["met"]] for c in checks],
        ),
        "",
        "## 1. The original table: polling",
        "",
        f"{p['rounds']} round(s) per column of {p['jobs_per_round']} jobs "
        f"for {p['clients']} clients; "
        f"each job polled {p['polls_per_job']} times every {p['interval_s'] * 1000:.0f} ms "
        f"(3 s compressed), ~{p['concurrent_jobs']} jobs at once, while a writer process walks "
        f"each job through its render ({p['scenes']} scenes, "
        f"{p['scenes'] + 6} updates) with `update_job_progress_with_cache`. Real API process "
        "(1 worker), PostgreSQL, Redis. Jobs are inserted straight into the DB, so each one's "
        "first poll is a miss (through POST it would be pre-warmed). DB queries: the API's "
        "`renderwatch_db_queries_total` (API keys resolved before the round).",
        "",
    ]
    off, on = poll["table"]["off"], poll["table"]["on"]
    rows = [
        ("total requests", "total_requests"),
        ("errors", "errors"),
        ("DB queries", "db_queries"),
        ("DB queries per job (40 polls)", "db_queries_per_job"),
        ("cache hits", "cache_hits"),
        ("hit rate (%)", "hit_rate"),
        ("mean response (ms)", "mean_ms"),
        ("p50 response (ms)", "p50_ms"),
        ("p99 response (ms)", "p99_ms"),
    ]
    out += _table(
        ["", "cache off", "cache on", "original promise"],
        [[label, off[k], on[k], _ORIGINAL.get(k, "")] for label, k in rows],
    )
    out += _fallbacks(poll)
    t = hot["table"]
    r = hot["ratios"]
    hp = hot["params"]
    out += [
        "",
        "## 2. Hot path: req/s, 1 API worker",
        "",
        f"{mach['load_generator']} -t{hp['threads']} -c{hp['connections']}, "
        f"{hp['seconds']:.0f} s per endpoint, {hp['rounds']} round(s), endpoints in turn.",
        "",
        *_table(
            ["endpoint", "req/s", "p50 (ms)", "p99 (ms)", "server CPU per request (µs)", "errors"],
            [
                [
                    LABELS[name],
                    row["rps"],
                    row["p50_ms"],
                    row["p99_ms"],
                    row["server_cpu_us"],
                    row["errors"],
                ]
                for name, row in t.items()
            ],
        ),
        "",
        *_table(
            ["ratio", "measured", "goal"],
            [
                ["req/s (c) / (b)", r["cached_vs_redis_passthrough"], "≥ 0.8"],
                ["req/s (c) / (d)", r["cached_vs_uncached"], "≥ 5"],
                ["p99 (c) / p99 (b)", r["p99_cached_vs_redis_passthrough"], "≤ 2"],
                ["req/s (b) / (a)", r["redis_passthrough_vs_const"], ""],
                ["req/s (e) / (c)", r["304_vs_cached"], ""],
                ["server CPU per request (c) / (b)", r["cpu_cached_vs_redis_passthrough"], ""],
                ["req/s (c) / (r)", r["cached_vs_raw_asgi_evalsha"], ""],
                ["server CPU per request (c) / (r)", r["cpu_cached_vs_raw_asgi_evalsha"], ""],
            ],
        ),
        "",
        "By concurrent clients (one run each, same section):",
        "",
        *_table(
            ["endpoint", "clients", "req/s", "p50 (ms)", "p99 (ms)", "server CPU (µs)"],
            [
                [
                    LABELS[name],
                    int(n),
                    row["rps"],
                    row["p50_ms"],
                    row["p99_ms"],
                    row["server_cpu_us"],
                ]
                for name, by_n in hot["concurrency"].items()
                for n, row in by_n.items()
            ],
        ),
        "",
        f"Batched cache reads of (c) over the section: mean {hot['batches']['mean']:.1f} reads "
        "per Redis call; calls by batch size (power-of-two buckets): "
        + ", ".join(f"{k}: {v:.0f}" for k, v in hot["batches"]["calls_by_size"].items() if v)
        + f". DB statements of (c)'s API over the section (hedged or failed reads; the job "
        f"stays cached): {_fmt(hot.get('db_queries_cached_api', float('nan')), 0)}.",
    ]
    out += _fallbacks(hot)
    s = results["stampede"]
    out += [
        "",
        "## 3. Stampede",
        "",
        *_table(
            ["", "value"],
            [
                ["concurrent cold requests for one job", s["params"]["requests"]],
                ["rounds", s["params"]["rounds"]],
                ["DB reads (median)", s["db_reads"]],
                ["DB reads (worst round)", s["db_reads_max"]],
                ["p50 (ms)", s["p50_ms"]],
                ["p99 (ms)", s["p99_ms"]],
                ["errors", s["errors"]],
                [
                    "first burst, not counted (the API opens Redis connections for it): "
                    "DB reads / errors / p99 ms",
                    f"{s['first_burst']['db_reads']} / {s['first_burst']['errors']} / "
                    f"{s['first_burst']['p99_ms']:.1f}",
                ],
            ],
        ),
    ]
    out += _fallbacks(s)
    w = results["writepath"]
    cmds = ", ".join(
        f"{name} {count:.2f}" for name, count in sorted(w["redis_commands_per_update"].items())
    )
    out += [
        "",
        "## 4. Write path (PostgreSQL)",
        "",
        *_table(
            ["", "value"],
            [
                ["bare DB update, median (ms)", w["bare_ms"]],
                ["update_job_progress_with_cache, median (ms)", w["cached_ms"]],
                ["ratio (per round, median)", w["ratio"]],
                ["Redis round trips per update", w["redis_round_trips"]],
                ["Redis commands per update (INFO commandstats, Lua's own included)", cmds],
            ],
        ),
    ]
    o = results["outage"]
    out += [
        "",
        "## 5. Redis outage",
        "",
        f"{o['params'].get('rounds', 1)} round(s), medians of the rounds (counts summed); "
        f"{o['params']['connections']} connections, one poll each every "
        f"{o['params']['interval_s'] * 1000:.0f} ms; Redis paused (CLIENT PAUSE ALL, private "
        f"server) for {o['params']['pause_s']:.0f} s mid-run; then an instance whose Redis is a "
        f"TCP server that never answers, for {o['params']['hung_s']:.0f} s.",
        "",
        *_table(
            [
                "run",
                "requests",
                "errors",
                f"≥ {o['params']['slow_ms']:.0f} ms",
                "p50 (ms)",
                "p99 (ms)",
                "p99 - cache off (ms)",
            ],
            [
                [
                    "cache off (reference)",
                    o["cache_off"]["requests"],
                    o["cache_off"]["errors"],
                    o["cache_off"]["slow"],
                    o["cache_off"]["p50_ms"],
                    o["cache_off"]["p99_ms"],
                    "",
                ],
                [
                    "Redis paused (requests sent during the pause)",
                    o["paused"]["requests_during_pause"],
                    o["paused"]["errors"],
                    o["paused"]["slow"],
                    o["paused"]["p50_ms_during_pause"],
                    o["paused"]["p99_ms_during_pause"],
                    o["p99_delta_ms_paused"],
                ],
                [
                    "Redis hung",
                    o["hung"]["requests"],
                    o["hung"]["errors"],
                    o["hung"]["slow"],
                    o["hung"]["p50_ms"],
                    o["hung"]["p99_ms"],
                    o["p99_delta_ms_hung"],
                ],
            ],
        ),
        "",
        f"Caching resumed within {_fmt(o['recovery_seconds'])} s after the pause ended (end of "
        "the first 200 ms window in which the global hits counter covers half the answers).",
    ]
    sc = results["scale"]
    out += [
        "",
        "## 6. Scale",
        "",
        *_table(
            ["API workers", "(c) req/s", "p99 (ms)", "server CPU per request (µs)"],
            [
                [n, row["rps"], row["p99_ms"], row["server_cpu_us"]]
                for n, row in sc["workers"].items()
            ],
        ),
        "",
        f"Pollers: one job each, polled every {sc['interval_s']:.1f} s, while a writer advances "
        f"the jobs at {sc['write_rate']:.0f} updates/s.",
        "",
        *_table(
            [
                "pollers",
                "req/s cache on",
                "DB reads/s cache on",
                "req/s cache off",
                "DB reads/s cache off",
            ],
            [
                [
                    pt["pollers"],
                    pt["rps_on"],
                    pt["db_reads_per_s_on"],
                    pt["rps_off"],
                    pt["db_reads_per_s_off"],
                ]
                for pt in sc["db_line"]
            ],
        ),
        *_fallbacks(sc),
        "",
        *sse_markdown(results),
        *section_markdown("slowdb", results["slowdb"]),
        "",
        "## Machine",
        "",
        *_table(["", ""], [[k, v] for k, v in mach.items()]),
        "",
        "![latency and throughput](latest.png)",
        "",
    ]
    return "\n".join(out)


def section_markdown(name: str, s: dict[str, Any]) -> list[str]:
    """The Markdown lines of a section that can run alone."""
    assert name == "slowdb", name
    p = s["params"]
    return [
        "",
        "## 8. Slow database",
        "",
        f"An API instance whose every DB read takes {p['delay_ms']} ms more (`pg_sleep` in "
        f"PostgreSQL before each SELECT, `bench.slowapi`). Each round: the job's entry "
        f"dropped, {p['requests']} cold polls at once, then {p['requests']} more at once "
        f"when they are answered; {p['rounds']} round(s).",
        "",
        *_table(
            ["", "value"],
            [
                ["DB reads of the cold wave (median)", s["db_reads"]],
                ["DB reads of the cold wave (worst round)", s["db_reads_max"]],
                ["hit rate of the next wave (%, median)", s["next_wave_hit_rate"]],
                ["hit rate of the next wave (%, worst round)", s["next_wave_hit_rate_min"]],
                ["DB reads of the next wave (worst round)", s["next_wave_db_reads_max"]],
                ["cold wave p50 (ms)", s["p50_ms"]],
                ["cold wave p99 (ms)", s["p99_ms"]],
                ["errors (both waves)", s["errors"]],
            ],
        ),
        *_fallbacks(s),
    ]


def splice(text_md: str, name: str, section: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    """`text_md` (a whole run's latest.md) with the targets table and one section's block
    replaced by (or given) the figures of a run of that section alone."""
    table = "\n".join(
        _table(
            ["target", "measured", "goal", "met"],
            [[c["target"], c["value"], c["goal"], c["met"]] for c in checks],
        )
    )
    text_md = re.sub(
        r"(## Targets[^\n]*\n\n)(\|.*?\n)(?=\n)",
        lambda m: m.group(1) + table + "\n",
        text_md,
        count=1,
        flags=re.S,
    )
    block = "\n".join(section_markdown(name, section)).lstrip("\n") + "\n\n"
    text_md = re.sub(r"## 8\. .*?(?=## Machine)", "", text_md, count=1, flags=re.S)
    return text_md.replace("## Machine", block + "## Machine", 1)


_ORIGINAL = {
    "db_queries_per_job": "4-6 (vs 40)",
    "hit_rate": "90+",
    "mean_ms": "1-3 (vs 15-25)",
}


# -- chart --------------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    """Latency distribution cache on/off, req/s against the references, DB reads vs pollers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    lat = results["poll"]["latency_ms"]
    ax = axes[0]
    for label, color in (("off", "tab:red"), ("on", "tab:green")):
        values = sorted(v for v in lat[label] if v > 0)
        if not values:
            continue
        ys = [100.0 * (i + 1) / len(values) for i in range(len(values))]
        ax.plot(
            values, ys, color=color, label=f"cache {label} (p99 {percentile(values, 99):.1f} ms)"
        )
    ax.set_xscale("log")
    ax.set_xlabel("response time (ms, log)")
    ax.set_ylabel("requests answered within (%)")
    ax.set_title("Polling scenario: latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()

    ax = axes[1]
    hot = results["hotpath"]["table"]
    names = ["const", "redis_passthrough", "cached_poll", "conditional_304", "uncached_poll"]
    short = ["(a) const", "(b) redis GET", "(c) cached poll", "(e) 304", "(d) cache off"]
    colors = ["tab:gray", "tab:gray", "tab:green", "tab:olive", "tab:red"]
    workers = results["scale"]["workers"]
    for n in sorted(workers, key=int):
        if n != "1":
            names.append(f"w{n}")
            short.append(f"(c) {n} workers")
            colors.append("tab:cyan")
    values = [hot[n]["rps"] if n in hot else workers[n[1:]]["rps"] for n in names]
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(values)), short, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("req/s (median of rounds)")
    ax.set_title("Hot path against the references (1 worker unless noted)")

    ax = axes[2]
    line = results["scale"]["db_line"]
    xs = [pt["pollers"] for pt in line]
    ax.plot(
        xs,
        [pt["db_reads_per_s_off"] for pt in line],
        "o-",
        color="tab:red",
        label="DB reads/s, cache off",
    )
    ax.plot(
        xs,
        [pt["db_reads_per_s_on"] for pt in line],
        "o-",
        color="tab:green",
        label="DB reads/s, cache on",
    )
    ax.plot(
        xs, [pt["rps_on"] for pt in line], "--", color="tab:gray", label="req/s answered (cache on)"
    )
    ax.set_xscale("log")
    ax.set_xlabel("pollers (jobs polled at once)")
    ax.set_ylabel("per second")
    ax.set_title("DB reads as pollers grow")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
