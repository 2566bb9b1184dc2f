"""The `renderwatch` command line: keys, migrations, jobs, stats, and the local stack.

Exit codes (README "The command line"):
    0    success
    1    the job failed or was cancelled (watch, submit --watch)
    2    usage error
    3    transport error: the API could not be reached, or the stream stayed broken
         after the reconnect attempts
    4    the API or the database refused (bad key, unknown job, finished job, 4xx/5xx,
         database error)
    130  interrupted
Errors go to stderr. The API key is read from `--key` or
RENDERWATCH_API_KEY and is never printed, except by `create-key`, which prints a new
key as the last line of its output so scripts can take it with `tail -n 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from renderwatch.client import (
    ApiError,
    ApiUnreachable,
    ClientError,
    NotFound,
    Poll,
    RenderwatchClient,
    Unauthorized,
)
from shared.schemas import MAX_SCENES, JobStatus, JobView
from shared.settings import Settings, redact_url

PROG = "renderwatch"
API_URL_ENV = "RENDERWATCH_API_URL"
API_KEY_ENV = "RENDERWATCH_API_KEY"
# These hand the rest of the command line to their own parser (their own --help).
DELEGATED = ("up", "demo")


class UsageError(Exception):
    """A command line that cannot work (exit 2)."""


class Failure(Exception):
    """The command ran and was refused (exit 4)."""


class JobDidNotSucceed(Exception):
    """The job followed ended failed or cancelled (exit 1)."""


EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_TRANSPORT = 3
EXIT_REFUSED = 4
# watch: reconnects after a broken stream (API restart), waiting these seconds between.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0)


@dataclass(frozen=True)
class Context:
    """What commands need besides their arguments (tests swap the transport)."""

    environ: Mapping[str, str]
    transport: httpx.BaseTransport | None = None
    sleep: Callable[[float], None] = time.sleep


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Track video-generation jobs: manage API keys, submit and watch jobs, "
        "inspect the cache, run the local stack or the demo.",
        epilog=f"API commands read the API URL from --api-url or {API_URL_ENV} and the key "
        f"from --key or {API_KEY_ENV} (prefer the variable: arguments show up in `ps`).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (machine-readable)")

    http = argparse.ArgumentParser(add_help=False)
    http.add_argument(
        "--api-url",
        metavar="URL",
        help=f"the API's base URL (default: ${API_URL_ENV}, else http://127.0.0.1:$API_PORT)",
    )
    http.add_argument("--key", metavar="KEY", help=f"API key (default: ${API_KEY_ENV})")

    sub.add_parser(
        "migrate",
        help="bring the database (DATABASE_URL) to the newest schema",
        description="Apply the Alembic migrations to DATABASE_URL.",
    )
    sub.add_parser(
        "new-incarnation",
        help="give a restored database a new incarnation (run after every restore)",
        description="Give the database (DATABASE_URL) a new incarnation id. A restored dump "
        "keeps the id of the database it was taken from, so Redis could still hold entries "
        "of that database's history; with a new id the cache starts afresh (a new default "
        "key namespace). Restart every api and worker process afterwards.",
    )
    create = sub.add_parser(
        "create-key",
        help="create an API key for a client; the key is the last line of output",
        description="Create an API key for CLIENT_ID. The key is shown once, as the last "
        "line of output; only its hash is stored.",
    )
    create.add_argument("client_id", metavar="CLIENT_ID", help="who the key belongs to")
    revoke = sub.add_parser(
        "revoke-key",
        help="revoke an API key",
        description="Revoke an API key; the API refuses it within API_KEY_CACHE_SECONDS.",
    )
    revoke.add_argument("key", metavar="KEY", help="the key to revoke")

    submit = sub.add_parser(
        "submit",
        parents=[http, as_json],
        help="submit a video job",
        description="Submit a job; prints its id and status URL.",
    )
    submit.add_argument("--prompt", required=True, help="what the video should show")
    submit.add_argument(
        "--scenes", required=True, type=_scenes, metavar="N", help=f"scenes (1-{MAX_SCENES})"
    )
    submit.add_argument("--watch", action="store_true", help="then follow it like `watch`")
    _interval_option(submit)

    watch = sub.add_parser(
        "watch",
        parents=[http, as_json],
        help="follow a job until it ends (live stream, polling as a fallback)",
        description="Follow a job's event stream with a progress bar and ETA (plain lines "
        "when not on a terminal, NDJSON with --json) until it ends. Reconnects with "
        "Last-Event-ID when the stream breaks (API restart), a few times with backoff; "
        "polls at the server's X-Poll-Interval when the stream is refused. Exit 0 when "
        "the job succeeded, 1 when it failed or was cancelled, 3 when the API stayed "
        "unreachable.",
    )
    watch.add_argument("job_id", type=_job_id, metavar="JOB_ID")
    _interval_option(watch)

    listing = sub.add_parser(
        "list",
        parents=[http, as_json],
        help="list your jobs, newest first",
        description="List the caller's jobs, newest first.",
    )
    listing.add_argument("--limit", type=_limit, default=20, metavar="N", help="jobs (1-100)")
    status = sub.add_parser(
        "status",
        parents=[http, as_json],
        help="show one job",
        description="Show one job's status, progress and ETA.",
    )
    status.add_argument("job_id", type=_job_id, metavar="JOB_ID")
    cancel = sub.add_parser(
        "cancel",
        parents=[http, as_json],
        help="cancel a job",
        description="Cancel a job: a queued job at once, a running one at its next scene.",
    )
    cancel.add_argument("job_id", type=_job_id, metavar="JOB_ID")

    sub.add_parser(
        "stats",
        parents=[http, as_json],
        help="show the cache statistics",
        description="Show GET /api/v2/cache/stats as a table.",
    )

    sub.add_parser("up", help="run the whole stack in the foreground (see `up --help`)")
    health = sub.add_parser(
        "healthcheck",
        help="check one service's health (for container health checks)",
        description="Exit 0 when the named service is healthy, 1 otherwise.",
    )
    health.add_argument("name", metavar="NAME", help="service name, e.g. api, worker, beat")
    sub.add_parser("demo", help="measure the cache: the stack with it on and off (see --help)")
    return parser


def _interval_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between polls when polling and the server gives no X-Poll-Interval "
        "(default: 1)",
    )


def _limit(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("must be between 1 and 100")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("renderwatch")
    except PackageNotFoundError:
        return "unknown"


def _scenes(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= MAX_SCENES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_SCENES}")
    return value


def _job_id(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3_600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


# -- entry point ---------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run one command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return _delegate(args_list[0], args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 after --help
        return exc.code if isinstance(exc.code, int) else 2
    ctx = Context(
        environ=os.environ if environ is None else environ, transport=transport, sleep=sleep
    )
    command = COMMANDS[args.command]
    try:
        return command(args, ctx)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _error(str(exc))
        return EXIT_USAGE
    except JobDidNotSucceed:
        return EXIT_JOB_FAILED
    except Failure as exc:
        _error(str(exc))
        return EXIT_REFUSED
    except Unauthorized:
        _error(f"the API refused the key (check --key or ${API_KEY_ENV})")
        return EXIT_REFUSED
    except ApiUnreachable as exc:
        _error(str(exc))
        return EXIT_TRANSPORT
    except ClientError as exc:
        _error(str(exc))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _delegate(command: str, rest: list[str]) -> int:
    if command == "up":
        from renderwatch.compose import up as run
    else:
        from renderwatch.demo import main as run
    try:
        return run(rest)
    except SystemExit as exc:  # their own argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- database commands ---------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, ctx: Context) -> int:
    """Apply the migrations to DATABASE_URL."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from renderwatch.migrate import upgrade

    url = _settings().database_url
    print(f"Migrating {redact_url(url)} ...")
    try:
        upgrade(url)
    except (SQLAlchemyError, CommandError, OSError) as exc:
        raise Failure(f"migration failed: {_db_reason(exc)}") from exc
    print(f"Done: {redact_url(url)} is at the newest schema.")
    return 0


def cmd_new_incarnation(args: argparse.Namespace, ctx: Context) -> int:
    """Replace the database's incarnation (after a restore)."""
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import build_engine
    from shared.meta import IncarnationMissing, new_incarnation

    settings = _settings()
    engine = build_engine(settings.database_url, pool_size=1)
    try:
        fresh = new_incarnation(engine)
    except IncarnationMissing as exc:
        raise Failure(str(exc)) from None
    except SQLAlchemyError as exc:
        raise Failure(f"database error: {_db_reason(exc)}") from exc
    finally:
        engine.dispose()
    print(f"{redact_url(settings.database_url)} has a new incarnation: {fresh}.")
    print("Restart every api and worker process: each reads the incarnation at start.")
    return 0


def cmd_create_key(args: argparse.Namespace, ctx: Context) -> int:
    """Create a key; it is the last line of stdout."""
    from shared.apikeys import create_api_key

    settings = _settings()
    client_id = args.client_id.strip()
    try:
        key = _with_session(settings, lambda session: create_api_key(client_id, session=session))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"Created an API key for client {client_id!r} in {redact_url(settings.database_url)}.")
    print("It is shown only this once (only its hash is stored). Use it as")
    print(f"`Authorization: Bearer <key>` or export {API_KEY_ENV}=<key>. The key:")
    print(key)
    return 0


def cmd_revoke_key(args: argparse.Namespace, ctx: Context) -> int:
    """Revoke a key (never echoed back)."""
    from shared.apikeys import revoke_api_key

    settings = _settings()
    done = _with_session(settings, lambda session: revoke_api_key(args.key, session=session))
    if not done:
        raise Failure("no active key matches (unknown or already revoked)")
    print(
        "Revoked. The API refuses the key within API_KEY_CACHE_SECONDS "
        f"({settings.api_key_cache_seconds:g} s)."
    )
    return 0


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]).upper()
        raise UsageError(f"bad setting {field}: {first['msg']}") from None


def _with_session(settings: Settings, work: Callable[[Any], Any]) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import build_engine, build_session_factory

    engine = build_engine(settings.database_url, pool_size=1)
    try:
        with build_session_factory(engine)() as session:
            return work(session)
    except SQLAlchemyError as exc:
        raise Failure(
            f"database error: {_db_reason(exc)} (is it migrated? run `{PROG} migrate`)"
        ) from exc
    finally:
        engine.dispose()


def _db_reason(exc: BaseException) -> str:
    """The driver's first line: no SQL parameters, no URL (it may carry a password)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else 'no detail'}"


# -- API commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace, ctx: Context) -> RenderwatchClient:
    key = args.key or ctx.environ.get(API_KEY_ENV, "")
    if not key:
        raise UsageError(
            f"no API key: pass --key or set {API_KEY_ENV} (create one with "
            f"`{PROG} create-key CLIENT_ID`)"
        )
    url = args.api_url or ctx.environ.get(API_URL_ENV) or _default_api_url()
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"the API URL must start with http:// or https://, not {url!r}")
    return RenderwatchClient(url, key, transport=ctx.transport)


def _default_api_url() -> str:
    return f"http://127.0.0.1:{_settings().api_port}"


def cmd_submit(args: argparse.Namespace, ctx: Context) -> int:
    """Submit a job, optionally follow it."""
    with _client(args, ctx) as client:
        job = client.submit(args.prompt, args.scenes)
        if args.json:
            answer = {"job_id": job.job_id, "status": job.status, "status_url": job.status_url}
            print(json.dumps(answer))
        else:
            print(f"Submitted job {job.job_id} ({job.status}).")
            print(f"Status URL: {job.status_url}")
        if not args.watch:
            return 0
        return _watch(client, job.job_id, args, ctx)


def cmd_watch(args: argparse.Namespace, ctx: Context) -> int:
    """Follow a job until it ends."""
    with _client(args, ctx) as client:
        return _watch(client, args.job_id, args, ctx)


def follow(
    client: RenderwatchClient,
    job_id: int,
    *,
    interval: float,
    on_change: Callable[[JobView], None],
    sleep: Callable[[float], None] = time.sleep,
    stream: bool = True,
) -> JobView:
    """Follow the job until it ends; `on_change` sees every new version once, in order.

    The event stream first. A broken stream (API restart, network) is reopened with
    Last-Event-ID after RECONNECT_DELAYS; once they are spent, `ApiUnreachable`. A stream
    the server refuses (503 when it has too many, or an API without it) falls back to
    polling with If-None-Match, at the server's X-Poll-Interval (else `interval`).
    """
    last: JobView | None = None

    def seen(view: JobView) -> None:
        nonlocal last
        if last is None or view.version > last.version:
            last = view
            on_change(view)

    failures = 0
    first_poll: Poll | None = None
    while stream:
        try:
            for view in client.events(job_id, last_event_id=last.version if last else None):
                failures = 0
                seen(view)
            assert last is not None
            return last
        except NotFound:
            # The job's 404 -- or an API without the stream: the poll tells them apart.
            first_poll = client.get_job(job_id)
            break
        except ApiUnreachable:
            if failures >= len(RECONNECT_DELAYS):
                raise
            sleep(RECONNECT_DELAYS[failures])
            failures += 1
        except ApiError:
            break  # refused (e.g. 503, too many streams): poll instead
    return _poll(client, job_id, interval, seen, sleep, first_poll, lambda: last)


def _poll(
    client: RenderwatchClient,
    job_id: int,
    interval: float,
    seen: Callable[[JobView], None],
    sleep: Callable[[float], None],
    poll: Poll | None,
    latest: Callable[[], JobView | None],
) -> JobView:
    etag: str | None = None
    failures = 0
    while True:
        if poll is None:
            try:
                poll = client.get_job(job_id, etag=etag)
                failures = 0
            except ApiUnreachable:
                if failures >= len(RECONNECT_DELAYS):
                    raise
                sleep(RECONNECT_DELAYS[failures])
                failures += 1
                continue
        if poll.view is not None:
            etag = poll.etag
            seen(poll.view)
        pace = poll.poll_interval or interval
        poll = None
        view = latest()
        if view is not None and view.finished:
            return view
        sleep(pace)


def format_eta(seconds: float | None) -> str:
    """`41 s`, `3 min 05 s`, or empty when there is no estimate."""
    if seconds is None:
        return ""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(view: JobView) -> str:
    """One plain line of progress (with the ETA once the worker has one)."""
    p = view.progress
    line = (
        f"job {view.job_id}: {view.status.value:<9} stage={p.current_stage.value:<10} "
        f"scenes {p.scenes_completed}/{p.scenes_total}  {p.percent:5.1f}%"
    )
    if p.eta_seconds is not None and not view.finished:
        line += f"  ETA {format_eta(p.eta_seconds)}"
    return line


def final_line(view: JobView) -> str:
    """The status line printed when a job has ended."""
    p = view.progress
    where = f"at {p.current_stage.value}, {p.scenes_completed}/{p.scenes_total} scenes"
    if view.status is JobStatus.SUCCEEDED:
        result = f" -> {view.result_url}" if view.result_url else ""
        return f"job {view.job_id} succeeded: {p.scenes_total} scenes, 100%{result}"
    if view.status is JobStatus.FAILED:
        return f"job {view.job_id} failed {where}: {view.error or 'no error message'}"
    return f"job {view.job_id} {view.status.value} {where}"


def _watch(client: RenderwatchClient, job_id: int, args: argparse.Namespace, ctx: Context) -> int:
    from rich.console import Console

    interval: float = args.interval
    console = Console(file=sys.stdout)
    try:
        if args.json:
            view = follow(
                client,
                job_id,
                interval=interval,
                sleep=ctx.sleep,
                on_change=lambda v: print(v.model_dump_json(), flush=True),
            )
        elif console.is_terminal:
            view = _watch_bar(client, job_id, interval, ctx, console)
        else:
            view = follow(
                client,
                job_id,
                interval=interval,
                sleep=ctx.sleep,
                on_change=lambda v: print(progress_line(v), flush=True),
            )
    except NotFound:
        raise _not_found(job_id) from None
    if not args.json:
        print(final_line(view))
    return EXIT_OK if view.status is JobStatus.SUCCEEDED else EXIT_JOB_FAILED


def _watch_bar(
    client: RenderwatchClient, job_id: int, interval: float, ctx: Context, console: Any
) -> JobView:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("job {task.fields[job]}"),
        TextColumn("{task.fields[status]:<9} {task.fields[stage]:<10}"),
        BarColumn(),
        TextColumn("scenes {task.fields[scenes]}"),
        TaskProgressColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("", total=100, job=job_id, status="", stage="", scenes="?", eta="-")

        def show(view: JobView) -> None:
            p = view.progress
            bar.update(
                task,
                completed=p.percent,
                status=view.status.value,
                stage=p.current_stage.value,
                scenes=f"{p.scenes_completed}/{p.scenes_total}",
                eta=format_eta(p.eta_seconds) or "-",
            )

        return follow(client, job_id, interval=interval, on_change=show, sleep=ctx.sleep)


def cmd_stats(args: argparse.Namespace, ctx: Context) -> int:
    """Show the cache statistics."""
    with _client(args, ctx) as client:
        stats = client.cache_stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(stats_table(stats))
    return 0


def _not_found(job_id: int) -> Failure:
    return Failure(f"job {job_id} not found (or it belongs to another client)")


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    """The caller's jobs, newest first."""
    with _client(args, ctx) as client:
        page = client.list_jobs(limit=args.limit)
    items = page.get("items") or []
    if args.json:
        print(json.dumps(page))
        return 0
    if not items:
        print("No jobs.")
        return 0
    rows = [("JOB", "STATUS", "STAGE", "SCENES", "PERCENT", "ETA", "CREATED")]
    for item in items:
        p = item.get("progress", {})
        rows.append(
            (
                str(item.get("job_id")),
                str(item.get("status")),
                str(p.get("current_stage")),
                f"{p.get('scenes_completed')}/{p.get('scenes_total')}",
                f"{float(p.get('percent', 0)):.1f}%",
                format_eta(p.get("eta_seconds")) or "-",
                str(item.get("created_at", ""))[:19].replace("T", " "),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
    return 0


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    """One job, once."""
    with _client(args, ctx) as client:
        try:
            view = client.get_job(args.job_id).view
        except NotFound:
            raise _not_found(args.job_id) from None
    assert view is not None
    if args.json:
        print(view.model_dump_json())
    elif view.finished:
        print(final_line(view))
    else:
        print(progress_line(view))
    return 0


def cmd_cancel(args: argparse.Namespace, ctx: Context) -> int:
    """Ask for a job to stop."""
    with _client(args, ctx) as client:
        try:
            answer = client.cancel(args.job_id)
        except NotFound:
            raise _not_found(args.job_id) from None
        except ApiError as exc:
            if exc.status_code == 409:
                raise Failure(exc.detail) from None
            raise
    if args.json:
        print(json.dumps(answer))
    elif answer.get("status") == JobStatus.CANCELLED.value:
        print(f"job {args.job_id} cancelled.")
    else:
        print(f"job {args.job_id}: cancel requested; it stops at its next scene.")
    return 0


def stats_table(stats: Mapping[str, Any]) -> str:
    """The statistics object as an aligned two-column table, then its message."""
    values = stats.get("statistics")
    rows: list[tuple[str, str]] = [("cache enabled", _yes_no(stats.get("cache_enabled")))]
    if isinstance(values, Mapping):
        for name, value in values.items():
            shown = _yes_no(value) if isinstance(value, bool) else str(value)
            if name == "hit_rate":
                shown = f"{value}%"
            elif name == "ttl_seconds":
                shown = f"{value} s"
            rows.append((name.replace("_", " "), shown))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
    if stats.get("message"):
        lines += ["", str(stats["message"])]
    return "\n".join(lines)


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


# -- delegated commands --------------------------------------------------------------------


def cmd_healthcheck(args: argparse.Namespace, ctx: Context) -> int:
    """Delegate to renderwatch.health."""
    from renderwatch.health import main as health_main

    return health_main(args.name)


def _never(args: argparse.Namespace, ctx: Context) -> int:
    # `up` and `demo` are dispatched before parsing; parsing only lists them in --help.
    return _delegate(args.command, [])


COMMANDS: dict[str, Callable[[argparse.Namespace, Context], int]] = {
    "migrate": cmd_migrate,
    "new-incarnation": cmd_new_incarnation,
    "create-key": cmd_create_key,
    "revoke-key": cmd_revoke_key,
    "submit": cmd_submit,
    "watch": cmd_watch,
    "list": cmd_list,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "stats": cmd_stats,
    "healthcheck": cmd_healthcheck,
    "up": _never,
    "demo": _never,
}


if __name__ == "__main__":
    sys.exit(main())
