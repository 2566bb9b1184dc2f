"""One bench run: start everything, measure every section, write the results, stop everything."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench import hotpath, outage, poll, report, scale, slowdb, sse, stampede, writepath
from bench.config import Config
from bench.procs import PYTHON, ProcessGroup, base_env, free_port, wait_port
from bench.services import private_database, start_hung_server, start_redis
from bench.stack import Stack
from bench.wrk import WRK_INSTALL_HINT, wrk_path
from shared.runtime import Runtime

REFERENCE_KEY = "bench:reference:job"
RUN_MARKER = "RW_BENCH_RUN"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def section(stack: Stack, name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; note how often each cache-on API's breaker opened during it.

    Nothing in sections 1-4 and 6 breaks Redis on purpose: an opening there means the
    cache fell back to the database (a timeout on an overloaded machine, or a bug).
    """
    log(name)
    apis = [api for api in stack.apis if api.cache]
    before = {api.name: api.breaker_openings() for api in apis}
    result = measure()
    result["breaker_openings"] = {
        api.name: api.breaker_openings() - before[api.name] for api in apis if api.name in before
    }
    opened = {k: v for k, v in result["breaker_openings"].items() if v}
    if opened:
        log(f"  the cache fell back to the database during this section: {opened}")
    return result


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception, so every `finally` below stops what it started.
    raise SystemExit(128 + signum)


SECTIONS = ("poll", "hotpath", "stampede", "writepath", "outage", "scale", "sse", "slowdb")


def measure(
    cfg: Config, *, pg_admin_url: str, workdir: Path, sections: frozenset[str] | None = None
) -> dict[str, Any]:
    """Every section (or only `sections`), in one run, on services created for it and
    removed after it."""
    results: dict[str, Any] = {"config": cfg.name}

    def wanted(name: str) -> bool:
        return sections is None or name in sections

    with private_database(pg_admin_url) as database_url, ProcessGroup(workdir / "logs") as group:
        log(f"private database {database_url.rsplit('/', 1)[-1]}")
        redis = start_redis(group, workdir / "redis")
        stack = Stack(group=group, workdir=workdir, database_url=database_url, redis=redis)
        try:
            runtime = stack.start_runtime()
            stack.make_clients(cfg.poll_clients)
            log("starting API instances, reference apps and a hung Redis")
            hung = start_hung_server(group)
            api_on = stack.launch_api("api-cache-on", cache=True)
            api_off = stack.launch_api("api-cache-off", cache=False)
            api_hung = stack.launch_api(
                "api-redis-hung", cache=True, redis_url=f"redis://127.0.0.1:{hung.port}/0"
            )
            ref_const = group.start(
                "ref-const",
                [PYTHON, "-m", "bench.refapps", "const", str(port := free_port())],
                port=port,
            )
            ref_redis = group.start(
                "ref-redis",
                [PYTHON, "-m", "bench.refapps", "redis", str(port := free_port())],
                env=base_env(BENCH_REDIS_URL=redis.url, BENCH_REDIS_KEY=REFERENCE_KEY),
                port=port,
            )
            slow_job = stack.make_jobs(1, scenes=5, clients=stack.clients[:1])[0]
            api_slow = slowdb.launch(stack, cfg)
            # Started now, idle until section 6: their start-up overlaps the others'.
            apis = {1: api_on}
            for n in cfg.scale_workers if wanted("scale") else ():
                if n != 1:
                    apis[n] = stack.launch_api(f"api-cache-on-{n}w", cache=True, workers=n)
            stack.wait_ready(*apis.values(), api_off, api_hung)
            ref_evalsha = group.start(
                "ref-evalsha",
                [PYTHON, "-m", "bench.refapps", "evalsha", str(port := free_port())],
                env=base_env(BENCH_REDIS_URL=redis.url, BENCH_REDIS_KEY=REFERENCE_KEY),
                port=port,
            )
            for ref in (ref_const, ref_redis, ref_evalsha):
                assert ref.port is not None
                wait_port(ref, ref.port)
            slowdb.ready(api_slow, slow_job)

            if wanted("poll"):
                results["poll"] = section(
                    stack,
                    f"1. polling scenario ({cfg.poll_rounds} round(s) per column)",
                    lambda: poll.run(stack, cfg, api_off=api_off, api_on=api_on),
                )
            job, targets = hotpath.prepare(
                stack,
                api_on=api_on,
                api_off=api_off,
                ref_const=ref_const,
                ref_redis=ref_redis,
                ref_evalsha=ref_evalsha,
                key=REFERENCE_KEY,
            )
            if wanted("hotpath"):
                results["hotpath"] = section(
                    stack, "2. hot path", lambda: hotpath.run(stack, cfg, targets)
                )
            if wanted("stampede"):
                results["stampede"] = section(
                    stack,
                    "3. stampede",
                    lambda: stampede.run(stack, cfg, api_on=api_on, job=job),
                )
            if wanted("writepath"):
                results["writepath"] = section(
                    stack, "4. write path", lambda: writepath.run(stack, cfg)
                )
            if wanted("outage"):
                refs = stack.make_jobs(8, scenes=5, clients=stack.clients[:1])
                results["outage"] = section(
                    stack,
                    "5. Redis outage (private redis-server paused; hung TCP server)",
                    lambda: outage.run(
                        stack, cfg, api_on=api_on, api_off=api_off, api_hung=api_hung, refs=refs
                    ),
                )
            stack.stop_api(api_hung)
            if wanted("scale"):
                results["scale"] = section(
                    stack,
                    "6. scale",
                    lambda: {
                        "workers": scale.workers_rps(stack, cfg, apis=apis, job=job),
                        "db_line": scale.db_line(stack, cfg, api_on=api_on, api_off=api_off),
                        "interval_s": cfg.scale_interval,
                        "write_rate": cfg.scale_write_rate,
                    },
                )
            for n, api in apis.items():
                if n != 1:
                    stack.stop_api(api)
            if wanted("sse"):
                results["sse"] = section(
                    stack,
                    f"7. live progress: SSE streams {cfg.sse_streams} against polling at 1 s",
                    lambda: sse.run(stack, cfg),
                )
            if wanted("slowdb"):
                results["slowdb"] = section(
                    stack,
                    f"8. slow database (every DB read +{cfg.slowdb_delay_ms} ms)",
                    lambda: slowdb.run(stack, cfg, api=api_slow, job=slow_job),
                )
            stack.stop_api(api_slow)
            tool = results["hotpath"]["tool"] if "hotpath" in results else "none"
            results["machine"] = _machine(stack, runtime, tool=tool)
        finally:
            stack.close()
    return results


def _machine(stack: Stack, runtime: Runtime, *, tool: str) -> dict[str, str]:
    with runtime.sessions() as session:
        postgres = str(session.execute(text("SHOW server_version")).scalar())
    redis_version = str(stack.redis.client().info("server")["redis_version"])
    return report.machine(redis_version=redis_version, postgres_version=postgres, tool=tool)


# Sections that `python -m bench --only NAME` runs alone, on a stack of their own.
ALONE = ("slowdb",)


def measure_alone(cfg: Config, name: str, *, pg_admin_url: str, workdir: Path) -> dict[str, Any]:
    """One section on services created for it (the other sections are not run)."""
    if name not in ALONE:
        raise ValueError(f"--only takes one of {ALONE}, not {name!r}")
    results: dict[str, Any] = {"config": cfg.name}
    with private_database(pg_admin_url) as database_url, ProcessGroup(workdir / "logs") as group:
        log(f"private database {database_url.rsplit('/', 1)[-1]}")
        redis = start_redis(group, workdir / "redis")
        stack = Stack(group=group, workdir=workdir, database_url=database_url, redis=redis)
        try:
            runtime = stack.start_runtime()
            stack.make_clients(1)
            job = stack.make_jobs(1, scenes=5)[0]
            api = slowdb.launch(stack, cfg)
            slowdb.ready(api, job)
            results["slowdb"] = section(
                stack,
                f"8. slow database (every DB read +{cfg.slowdb_delay_ms} ms)",
                lambda: slowdb.run(stack, cfg, api=api, job=job),
            )
            results["machine"] = _machine(stack, runtime, tool="bench.httpload")
        finally:
            stack.close()
    return results


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """A partial run's results without raw latencies."""
    return {
        name: {k: v for k, v in section.items() if k != "latency_ms"}
        if isinstance(section, dict)
        else section
        for name, section in results.items()
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write(results: dict[str, Any], output: Path, *, command: str) -> dict[str, Any]:
    """latest.json, latest.md and latest.png in `output`; returns the JSON document."""
    output.mkdir(parents=True, exist_ok=True)
    figs = report.figures(results)
    checks = report.targets(results, figs)
    document = {
        **figs,
        "targets": checks,
        "machine": results["machine"],
        "config": results["config"],
        "command": command,
        "details": {k: v for k, v in results.items() if k not in ("machine", "config")},
    }
    # The raw latencies feed the chart; the JSON keeps only their summaries.
    document["details"]["poll"] = {k: v for k, v in results["poll"].items() if k != "latency_ms"}
    (output / "latest.json").write_text(json.dumps(_clean(document), indent=2) + "\n")
    text_md = report.markdown(results, figs, checks, results["machine"], command=command)
    (output / "latest.md").write_text(text_md)
    report.chart(results, output / "latest.png")
    print(text_md)
    return document


def write_alone(
    results: dict[str, Any], output: Path, name: str, *, command: str
) -> dict[str, Any]:
    """Merge one section run alone into `output`'s latest.json and latest.md (those of the
    last whole run, whose other figures stay as they were); returns the JSON document."""
    path = output / "latest.json"
    output.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    figs = report.section_figures(name, results)
    document.update(figs)
    # Where these figures come from: not the whole run the other figures are from.
    alone = {"command": command, "machine": results["machine"]}
    document.setdefault("details", {})[name] = {**results[name], "run_alone": alone}
    names = {row["target"] for row in report.section_targets(name, figs)}
    document["targets"] = [
        row for row in document.get("targets", []) if row["target"] not in names
    ] + report.section_targets(name, figs)
    document = _clean(document)
    path.write_text(json.dumps(document, indent=2) + "\n")
    md = output / "latest.md"
    lines = report.section_markdown(name, results[name])
    if md.exists():
        md.write_text(report.splice(md.read_text(), name, results[name], document["targets"]))
    else:
        md.write_text("\n".join(lines).lstrip("\n") + "\n")
    print("\n".join(lines))
    return document


def main(
    cfg: Config,
    *,
    output: Path,
    pg_admin_url: str,
    keep: bool,
    command: str,
    only: str | None = None,
    sections: frozenset[str] | None = None,
) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    if wrk_path() is None:
        log(WRK_INSTALL_HINT)
    workdir = Path(tempfile.mkdtemp(prefix="rw-bench-"))
    # Inherited by every process the bench starts: anyone can check that none outlives it.
    os.environ[RUN_MARKER] = workdir.name
    log(f"run {workdir.name} (marker {RUN_MARKER} in every child's environment)")
    started = time.monotonic()
    ok = False
    try:
        if sections is not None:
            # A developer's partial run: raw figures on stdout, latest.* left alone.
            results = measure(cfg, pg_admin_url=pg_admin_url, workdir=workdir, sections=sections)
            print(json.dumps(_clean(_summary(results)), indent=2))
        elif only is None:
            results = measure(cfg, pg_admin_url=pg_admin_url, workdir=workdir)
            write(results, output, command=command)
        else:
            results = measure_alone(cfg, only, pg_admin_url=pg_admin_url, workdir=workdir)
            write_alone(results, output, only, command=command)
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs and raw records kept in {workdir}")
    log(f"done in {time.monotonic() - started:.0f}s: {output}/latest.md, latest.json, latest.png")
    return 0
