"""The cache's guarantees (DESIGN.md 1-9) as one suite, run on fakeredis here and on the
real Redis in `tests/integration/test_cache_contract.py` (fakeredis runs Lua through
lupa, so every script must also meet the real server).

A subclass provides two fixtures: `client_factory` (a new client on the same server at
each call, as another process would hold) and `key_ns` (a private key namespace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import orjson
import pytest

from shared.cache import (
    configure,
    get_cache_stats,
    get_job_with_cache,
    invalidate_job_cache,
    invalidate_user_jobs_cache,
    redis_available,
    update_job_progress_with_cache,
)
from shared.cache.backend import RedisBackend
from shared.cache.machine import Busy, Done, Hit, Lease, Stored
from shared.cache.stats import Batch
from shared.schemas import InvalidProgress, JobView, ProgressRegression
from tests.cache_helpers import (
    STATISTICS_KEYS,
    STATS_KEYS,
    STEPS,
    Harness,
    Make,
    RecordingClient,
    db_view,
    make_harness,
    new_job,
    open_db,
    run_threads,
    wait_until,
    write_db_only,
)

ALICE = "alice@example.com"
MALLORY = "mallory@example.com"


class CacheContract:
    """Every guarantee of the cache; each test fails when its guarantee is broken."""

    pytestmark = [pytest.mark.timeout(120)]

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def db(self, sqlite_url: str) -> Iterator[Any]:
        engine, sessions = open_db(sqlite_url)
        yield sessions
        engine.dispose()

    @pytest.fixture
    def make(self, client_factory: Callable[[], Any], key_ns: str, db: Any) -> Make:
        def build(**options: Any) -> Harness:
            return make_harness(client_factory, db, key_ns, **options)

        return build

    @pytest.fixture
    def h(self, make: Make) -> Harness:
        return make()

    @pytest.fixture
    def public(self, h: Harness) -> Iterator[Harness]:
        """`h` installed as the process's cache, for the module-level API."""
        configure(h.cache)
        yield h
        configure(None)

    # -- 1. fresh after write -----------------------------------------------------------------

    def test_fresh_after_write_here_and_in_another_process(self, public: Harness) -> None:
        writer = public
        reader = writer.another()
        job = writer.new_job()
        # Both processes hold v1 in the cache before the writes start.
        assert writer.cache.get(job.job_id).view.version == 1  # type: ignore[union-attr]
        assert reader.cache.get(job.job_id).view.version == 1  # type: ignore[union-attr]
        for expected, step in enumerate(STEPS, start=2):
            assert update_job_progress_with_cache(job.job_id, step) is True
            mine = get_job_with_cache(job.job_id)
            assert mine is not None and mine["version"] >= expected
            theirs = reader.cache.get(job.job_id)
            assert theirs is not None and theirs.view.version >= expected
        assert writer.db_version(job.job_id) == len(STEPS) + 1

    def test_a_write_prewarms_the_new_version(self, h: Harness) -> None:
        job = h.new_job()
        h.cache.get(job.job_id)
        assert h.cache.update_progress(job.job_id, STEPS[0])
        assert h.cached_version(job.job_id) == 2
        loads = h.load.call_count
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 2
        assert h.load.call_count == loads, "the read after a write must be a cache hit"
        assert got.body == h.raw(job.job_id)

    # -- 2. no stale fill ---------------------------------------------------------------------

    def _reader_blocked_after_load(self, h: Harness, job_id: int) -> tuple[Any, ...]:
        """Start a reader that loads the row, then blocks before filling until released."""
        loaded, release = threading.Event(), threading.Event()
        result: dict[str, Any] = {}

        def blocking_load(jid: int) -> JobView | None:
            view = h.real_load(jid)
            loaded.set()
            assert release.wait(30)
            return view

        h.load.side_effect = blocking_load
        thread = threading.Thread(
            target=lambda: result.setdefault("job", h.cache.get(job_id)), daemon=True
        )
        thread.start()
        assert loaded.wait(30), "the reader never reached the database"
        h.load.side_effect = None
        return thread, release, result

    def test_a_reader_with_an_older_row_cannot_overwrite_a_newer_version(self, make: Make) -> None:
        reader = make(lease_ms=10_000)
        writer = reader.another()
        job = reader.new_job()
        thread, release, result = self._reader_blocked_after_load(reader, job.job_id)
        # The reader holds v1 from the DB; the writer commits and pre-warms v2 meanwhile.
        assert writer.cache.update_progress(job.job_id, STEPS[0])
        assert reader.cached_version(job.job_id) == 2
        release.set()
        thread.join(30)
        assert result["job"].view.version == 1  # the reader answers what it read...
        assert reader.cached_version(job.job_id) == 2  # ...but may not store it
        got = writer.cache.get(job.job_id)
        assert got is not None and got.view.version == 2

    def test_a_fill_after_invalidation_with_an_old_lease_is_refused(self, public: Harness) -> None:
        h = public
        job = h.new_job()
        thread, release, result = self._reader_blocked_after_load(h, job.job_id)
        # A write whose pre-warm was lost, then an explicit invalidation: the lease is revoked.
        write_db_only(h.sessions, job.job_id, STEPS[0])
        assert invalidate_job_cache(job.job_id) is True
        release.set()
        thread.join(30)
        assert result["job"].view.version == 1
        assert h.raw(job.job_id) is None, "a fill under a revoked lease must be refused"
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 2
        assert h.cached_version(job.job_id) == 2

    @pytest.mark.parametrize("seed", range(3))
    def test_random_interleavings_never_serve_or_store_an_older_version(
        self, make: Make, monkeypatch: pytest.MonkeyPatch, seed: int
    ) -> None:
        """Model check: cached versions never decrease; nothing older than an acknowledged
        write is ever stored by a fill or served by a read."""
        scenes = 60
        base = make(lease_ms=150)
        job = new_job(base.sessions, ALICE, scenes_total=scenes)
        steps: list[dict[str, Any]] = [
            {"current_stage": "scripting"},
            {"current_stage": "storyboard"},
            *({"current_stage": "rendering", "scenes_completed": n} for n in range(scenes + 1)),
            {"current_stage": "encoding"},
        ]
        acked = [1]  # versions whose update call has returned (the newest is last)
        violations: list[str] = []
        done = threading.Event()
        readers = [base.another() for _ in range(3)]

        for i, r in enumerate([base, *readers]):
            rng = random.Random(seed * 100 + i)
            rng_lock = threading.Lock()

            def jittery(
                jid: int,
                r: Harness = r,
                rng: random.Random = rng,
                rng_lock: threading.Lock = rng_lock,
            ) -> JobView | None:
                view = r.real_load(jid)
                with rng_lock:
                    pause = rng.random() * 0.004
                time.sleep(pause)  # widen the window between the DB read and the fill
                return view

            r.load.side_effect = jittery
            backend = r.cache.backend
            assert backend is not None
            real_fill = backend.fill_job

            def checked_fill(jid: int, token: str, version: int, *rest: Any, f: Any = real_fill):
                floor = acked[-1]
                stored = f(jid, token, version, *rest)
                if stored and version < floor:
                    violations.append(f"fill stored v{version} after v{floor} was acknowledged")
                return stored

            monkeypatch.setattr(backend, "fill_job", checked_fill)

        def write(_: int) -> None:
            rng = random.Random(seed)
            try:
                for version, step in enumerate(steps, start=2):
                    assert base.cache.update_progress(job.job_id, step)
                    acked.append(version)
                    time.sleep(rng.random() * 0.003)
            finally:
                done.set()

        def read(i: int) -> None:
            r = readers[i]
            rng = random.Random(seed * 1000 + i)
            while not done.is_set():
                floor = acked[-1]
                got = r.cache.get(job.job_id)
                assert got is not None
                if got.view.version < floor:
                    violations.append(f"read served v{got.view.version} after v{floor} acked")
                if rng.random() < 0.15:
                    r.cache.invalidate_job(job.job_id)

        def sample(_: int) -> None:
            last = 0
            while not done.is_set():
                version = base.cached_version(job.job_id)
                if version is not None:
                    if version < last:
                        violations.append(f"cached version went back from v{last} to v{version}")
                    last = max(last, version)
                time.sleep(0.0005)

        def role(i: int) -> None:
            if i == 0:
                write(i)
            elif i == 1:
                sample(i)
            else:
                read(i - 2)

        run_threads(2 + len(readers), role, timeout=100)
        assert violations == []
        final = base.db_version(job.job_id)
        assert final == len(steps) + 1
        got = readers[0].cache.get(job.job_id)
        assert got is not None and got.view.version == final

    # -- 3. no stampede -----------------------------------------------------------------------

    def test_fifty_concurrent_misses_cause_one_db_read(
        self, make: Make, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        h = make(lease_ms=20_000)
        job = h.new_job()
        backend = h.cache.backend
        assert backend is not None
        real_read = backend.read_job
        lock = threading.Lock()
        reads = [0]

        def counting_read(*args: Any) -> Any:
            with lock:
                reads[0] += 1
            return real_read(*args)

        monkeypatch.setattr(backend, "read_job", counting_read)

        def slow_load(job_id: int) -> JobView | None:
            # Hold the fill until all fifty readers have missed at least once.
            wait_until(lambda: reads[0] >= 50, 30)
            return h.real_load(job_id)

        h.load.side_effect = slow_load
        results = run_threads(50, lambda _: h.cache.get(job.job_id))
        assert h.load.call_count == 1
        assert all(r is not None and r.view.version == 1 for r in results)
        counts = h.counts()
        assert (counts["misses"], counts["hits"]) == (1, 49)

    def test_a_filler_that_dies_blocks_the_key_no_longer_than_its_lease(self, make: Make) -> None:
        lease = 0.3
        h = make(lease_ms=int(lease * 1000))
        job = h.new_job()
        h.load.side_effect = RuntimeError("the filler crashed after taking the lease")
        with pytest.raises(RuntimeError):
            h.cache.get(job.job_id)
        assert h.client.exists(h.keys.lease(job.job_id)), "the dead filler's lease is left over"
        h.load.side_effect = None
        started = time.monotonic()
        results = run_threads(10, lambda _: (h.cache.get(job.job_id), time.monotonic() - started))
        assert all(job is not None and job.view.version == 1 for job, _ in results)
        assert max(elapsed for _, elapsed in results) < lease + 5.0
        # The lease lapsed by itself, so a reader could fill: the key is not blocked.
        assert wait_until(lambda: h.cached_version(job.job_id) == 1, lease + 5.0)
        loads = h.load.call_count
        assert h.cache.get(job.job_id) is not None
        assert h.load.call_count == loads

    def test_a_stuck_filler_does_not_hold_readers_past_its_lease(self, make: Make) -> None:
        lease = 0.3
        h = make(lease_ms=int(lease * 1000))
        job = h.new_job()
        stuck, release = threading.Event(), threading.Event()

        def stuck_load(job_id: int) -> JobView | None:
            stuck.set()
            release.wait(60)
            return h.real_load(job_id)

        h.load.side_effect = stuck_load
        filler = threading.Thread(target=lambda: h.cache.get(job.job_id), daemon=True)
        filler.start()
        assert stuck.wait(30)
        h.load.side_effect = None
        try:
            started = time.monotonic()
            results = run_threads(
                10, lambda _: (h.cache.get(job.job_id), time.monotonic() - started)
            )
            assert all(job is not None and job.view.version == 1 for job, _ in results)
            assert max(elapsed for _, elapsed in results) < lease + 5.0
            # While the stuck filler still sleeps, someone else filled after its lease lapsed.
            assert wait_until(lambda: h.cached_version(job.job_id) == 1, lease + 5.0)
            assert filler.is_alive()
        finally:
            release.set()
            filler.join(30)
        assert h.cached_version(job.job_id) == 1

    # -- 4. progress never goes backwards -------------------------------------------------------

    REGRESSIONS = [
        pytest.param(
            STEPS[:9],
            {"current_stage": "rendering", "scenes_completed": 5},
            "current_stage",
            id="older-stage",
        ),
        pytest.param(
            STEPS[:6],
            {"current_stage": "rendering", "scenes_completed": 2},
            "scenes_completed",
            id="fewer-scenes",
        ),
        pytest.param(
            STEPS[:1], {"status": "queued", "current_stage": "queued"}, "status", id="status-back"
        ),
        pytest.param(STEPS[:2], {"current_stage": "scripting"}, "current_stage", id="stage-back"),
        pytest.param(
            STEPS, {"status": "failed", "error": "late failure"}, "status", id="finished-job"
        ),
        pytest.param(
            [{"status": "cancelled"}],
            {"current_stage": "rendering", "scenes_completed": 1},
            "status",
            id="cancelled-job",
        ),
    ]

    @pytest.mark.parametrize(("setup", "regress", "field"), REGRESSIONS)
    def test_a_regressing_update_is_refused_and_changes_nothing(
        self, public: Harness, setup: list[dict[str, Any]], regress: dict[str, Any], field: str
    ) -> None:
        h = public
        job = h.new_job()
        for step in setup:
            assert update_job_progress_with_cache(job.job_id, step)
        h.cache.get(job.job_id)
        before_db, before_raw = db_view(h.sessions, job.job_id), h.raw(job.job_id)
        assert before_raw is not None
        with pytest.raises(ProgressRegression) as info:
            update_job_progress_with_cache(job.job_id, regress)
        assert info.value.field == field
        assert isinstance(info.value, ValueError)
        assert db_view(h.sessions, job.job_id) == before_db
        assert h.raw(job.job_id) == before_raw

    def test_a_duplicate_update_is_harmless(self, h: Harness) -> None:
        job = h.new_job()
        for step in STEPS[:5]:
            h.cache.update_progress(job.job_id, step)
        before_db, before_raw = db_view(h.sessions, job.job_id), h.raw(job.job_id)
        invalidations = h.counts()["invalidations"]
        for _ in range(3):  # a redelivered task repeats its last report
            assert h.cache.update_progress(job.job_id, STEPS[4]) is True
        assert db_view(h.sessions, job.job_id) == before_db
        assert h.raw(job.job_id) == before_raw
        assert h.counts()["invalidations"] == invalidations, "a duplicate publishes nothing"

    def test_a_finished_job_accepts_only_a_duplicate_of_its_last_report(self, h: Harness) -> None:
        job = h.new_job()
        for step in STEPS:
            h.cache.update_progress(job.job_id, step)
        final = db_view(h.sessions, job.job_id)
        assert final.status == "succeeded"
        assert h.cache.update_progress(job.job_id, STEPS[-1]) is True
        changes: list[dict[str, Any]] = [
            {"current_stage": "uploading"},
            {"status": "cancelled", "current_stage": "uploading"},
            {"status": "failed", "current_stage": "done"},
            {"error": "x"},
        ]
        for change in changes:
            with pytest.raises(ProgressRegression) as info:
                h.cache.update_progress(job.job_id, change)
            assert info.value.field == "status"
        assert db_view(h.sessions, job.job_id) == final

    @pytest.mark.parametrize(
        ("progress", "field"),
        [
            ({"current_stage": "rendering", "scenes_completed": 6}, "scenes_completed"),
            ({"current_stage": "teleporting"}, "current_stage"),
            ({"percent": 50}, "percent"),
            ({"scenes_total": 9}, "scenes_total"),
            ({}, "progress"),
            ("rendering", "progress"),
        ],
    )
    def test_an_invalid_update_names_the_field_and_writes_nothing(
        self, h: Harness, progress: Any, field: str
    ) -> None:
        job = h.new_job()
        h.cache.get(job.job_id)
        before_raw = h.raw(job.job_id)
        with pytest.raises(InvalidProgress) as info:
            h.cache.update_progress(job.job_id, progress)
        assert info.value.field == field
        assert h.db_version(job.job_id) == 1
        assert h.raw(job.job_id) == before_raw

    def test_an_unknown_job_is_false_and_none(self, public: Harness) -> None:
        assert update_job_progress_with_cache(999_999, STEPS[0]) is False
        assert get_job_with_cache(999_999) is None
        assert public.raw(999_999) == b"", "a tombstone: no such job, cached briefly"

    def test_concurrent_writers_keep_versions_monotonic(self, make: Make) -> None:
        scenes = 30
        base = make()
        writers = [base, *(base.another() for _ in range(3))]
        job = new_job(base.sessions, ALICE, scenes_total=scenes)

        def walk(i: int) -> list[int]:
            # Every writer reports the same path, as racing redeliveries of one task would.
            w, seen = writers[i], []
            for n in range(scenes + 1):
                with contextlib.suppress(ProgressRegression):  # another writer got further
                    w.cache.update_progress(
                        job.job_id, {"current_stage": "rendering", "scenes_completed": n}
                    )
                got = w.cache.get(job.job_id)
                assert got is not None
                seen.append(got.view.version)
            return seen

        for seen in run_threads(len(writers), walk):
            assert seen == sorted(seen), "a process saw a version go backwards"
        final = db_view(base.sessions, job.job_id)
        # Every distinct state was written exactly once: no update was lost or repeated.
        assert final.version == 1 + (scenes + 1)
        assert final.progress.scenes_completed == scenes
        assert base.cached_version(job.job_id) == final.version

    # -- 5. (outages: tests/unit/test_cache_degrade.py and tests/integration) -----------------

    # -- 6. bad cache entries are misses -----------------------------------------------------

    @staticmethod
    def _bad_values(job: JobView, other: JobView) -> dict[str, bytes]:
        body = orjson.loads(job.to_json())
        return {
            "garbage": b"\x80\x81\xfe\xff not json at all",
            "truncated": job.to_json()[:-9],
            "wrong-schema": orjson.dumps({"job_id": job.job_id, "version": 99}),
            "bad-field": orjson.dumps({**body, "status": "exploded"}),
            "extra-key": orjson.dumps({**body, "admin": True}),
            "another-job": other.to_json(),
            "pickle": pickle.dumps(body),
            "json-list": b"[1, 2, 3]",
        }

    @pytest.mark.parametrize(
        "case",
        [
            "garbage",
            "truncated",
            "wrong-schema",
            "bad-field",
            "extra-key",
            "another-job",
            "pickle",
            "json-list",
        ],
    )
    def test_a_bad_entry_is_deleted_counted_and_served_from_the_db(
        self, h: Harness, case: str
    ) -> None:
        job, other = h.new_job(), h.new_job("bob@example.com")
        bad = self._bad_values(job, other)[case]
        h.client.set(h.keys.job(job.job_id), bad)
        before = h.counts()
        got = h.cache.get(job.job_id)
        assert got is not None and got.view == db_view(h.sessions, job.job_id)
        assert h.load.call_count == 1
        after = h.counts()
        assert after["errors"] == before["errors"] + 1
        assert (after["hits"], after["misses"]) == (before["hits"], before["misses"] + 1)
        assert h.raw(job.job_id) == got.body, "the bad value was replaced by the DB's row"

    @pytest.mark.parametrize("kind", ["hash", "list", "set"])
    def test_a_wrong_type_at_the_job_key_is_a_miss(self, h: Harness, kind: str) -> None:
        job = h.new_job()
        key = h.keys.job(job.job_id)
        {"hash": lambda: h.client.hset(key, "version", 5), "list": lambda: h.client.rpush(key, 1),
         "set": lambda: h.client.sadd(key, 1)}[kind]()  # fmt: skip
        before = h.counts()
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 1
        after = h.counts()
        assert after["errors"] == before["errors"] + 1
        assert after["misses"] == before["misses"] + 1
        assert h.client.type(key) in (b"string", "string")

    def test_a_wrong_type_at_the_job_key_does_not_break_a_write(self, h: Harness) -> None:
        job = h.new_job()
        h.client.hset(h.keys.job(job.job_id), "version", 1)
        assert h.cache.update_progress(job.job_id, STEPS[0]) is True
        assert h.db_version(job.job_id) == 2
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 2
        assert h.cached_version(job.job_id) == 2

    def test_a_wrong_type_appearing_before_a_fill_is_a_miss(
        self, h: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job = h.new_job()

        def load_then_corrupt(job_id: int) -> JobView | None:
            h.client.hset(h.keys.job(job_id), "a", "b")  # someone else's value lands first
            return h.real_load(job_id)

        h.load.side_effect = load_then_corrupt
        before = h.counts()
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 1
        assert h.counts()["errors"] == before["errors"] + 1
        h.load.side_effect = None
        assert h.cache.get(job.job_id) is not None
        assert h.cached_version(job.job_id) == 1

    def test_a_wrong_type_at_the_list_key_is_a_miss(self, h: Harness) -> None:
        key = h.keys.jobs(ALICE)
        h.client.set(key, b"not a hash")
        before = h.counts()
        assert h.cache.get_list(ALICE, "p1", lambda: b'["from db"]') == b'["from db"]'
        after = h.counts()
        assert after["errors"] == before["errors"] + 1
        assert after["misses"] == before["misses"] + 1
        assert h.client.type(key) in (b"none", "none", b"hash", "hash")
        assert h.cache.get_list(ALICE, "p1", lambda: b'["again"]') == b'["again"]'
        assert h.cache.get_list(ALICE, "p1", lambda: b'["unused"]') == b'["again"]'

    def test_garbage_in_a_list_page_is_a_miss(self, h: Harness) -> None:
        assert h.cache.get_list(ALICE, "p1", lambda: b"[1]") == b"[1]"
        h.client.hset(h.keys.jobs(ALICE), "p1", b"\xff{not json")
        before = h.counts()
        assert h.cache.get_list(ALICE, "p1", lambda: b"[2]") == b"[2]"
        after = h.counts()
        assert after["errors"] == before["errors"] + 1
        assert (after["hits"], after["misses"]) == (before["hits"], before["misses"] + 1)

    def test_a_wrong_type_at_the_stats_key_does_not_break_statistics(self, h: Harness) -> None:
        h.client.set(h.keys.stats(), b"not a hash")
        stats = h.cache.stats()
        assert set(stats) == STATS_KEYS
        assert h.client.type(h.keys.stats()) not in (b"string", "string")
        job = h.new_job()
        h.cache.get(job.job_id)
        h.cache.get(job.job_id)
        counts = h.counts()
        assert (counts["hits"], counts["misses"]) == (1, 1)

    def test_a_wrong_type_at_the_stats_key_does_not_stall_reads(self, h: Harness) -> None:
        """The scripts count into the stats hash: a foreign value there is the bad entry to
        drop, not the job key (else every read waits out its own lease, never cached)."""
        h.client.set(h.keys.stats(), b"not a hash")
        job = h.new_job()
        for _ in range(3):
            got = h.cache.get(job.job_id)
            assert got is not None and got.view.version == 1
        assert h.load.call_count == 1, "after the bad stats value was dropped, reads hit"
        assert h.cache.get_list(ALICE, "p1", lambda: b"[]") == b"[]"
        h.cache.flush()  # counts are flushed in batches, never inside a read script
        assert h.client.type(h.keys.stats()) in (b"hash", "hash")

    # -- 7. ownership ---------------------------------------------------------------------------

    def test_another_clients_job_is_none_on_a_miss_and_on_a_hit(self, public: Harness) -> None:
        h = public
        job = h.new_job(ALICE)
        assert h.cache.get(job.job_id, client_id=MALLORY) is None  # miss
        assert get_job_with_cache(job.job_id, client_id=MALLORY) is None
        assert h.cache.get(job.job_id, client_id=ALICE) is not None
        assert h.raw(job.job_id) is not None
        loads = h.load.call_count
        assert h.cache.get(job.job_id, client_id=MALLORY) is None  # hit
        assert get_job_with_cache(job.job_id, client_id=MALLORY) is None
        assert h.load.call_count == loads, "the foreign reads above were cache hits"
        mine = get_job_with_cache(job.job_id, client_id=ALICE)
        assert mine is not None and mine["client_id"] == ALICE
        # A foreign job answers exactly like a missing one.
        assert h.cache.get(999_999, client_id=MALLORY) is None

    # -- 8. statistics ----------------------------------------------------------------------------

    def test_statistics_have_exactly_the_design_keys(self, public: Harness) -> None:
        stats = get_cache_stats()
        assert set(stats) == STATS_KEYS
        assert isinstance(stats["statistics"], dict)
        assert set(stats["statistics"]) == STATISTICS_KEYS
        assert stats["cache_enabled"] is True
        assert stats["statistics"]["redis_available"] is True
        assert stats["statistics"]["ttl_seconds"] == 30
        assert stats["message"] == "Cache is working normally"

    def test_statistics_are_global_and_exact_across_caches(self, make: Make) -> None:
        a = make()
        b = a.another()
        jobs = [a.new_job() for _ in range(3)]
        served = 0
        for cache, rounds in ((a, 3), (b, 2)):
            for _ in range(rounds):
                for job in jobs:
                    assert cache.cache.get(job.job_id) is not None
                    served += 1
        assert b.cache.get_list(ALICE, "p1", lambda: b"[]") == b"[]"
        assert a.cache.get_list(ALICE, "p1", lambda: b"[]") == b"[]"
        served += 2
        a.cache.update_progress(jobs[0].job_id, STEPS[0])
        a.cache.invalidate_job(jobs[1].job_id)
        b.cache.invalidate_lists(ALICE)
        for each in (a, b):  # each process's counts land in batches: flush them now
            assert each.cache.flush()
        for view in (a, b):
            counts = view.counts()
            assert counts["hits"] + counts["misses"] == served == counts["total_requests"]
            assert counts["misses"] == 3 + 1  # three job fills and one list fill
            assert counts["invalidations"] == 3
            assert counts["errors"] == 0
            assert counts["hit_rate"] == round(100 * counts["hits"] / served, 2)

    # -- 9. smart TTL ---------------------------------------------------------------------------

    def test_active_jobs_keep_the_short_ttl_and_finished_ones_the_long(self, h: Harness) -> None:
        job = h.new_job()
        key = h.keys.job(job.job_id)
        h.cache.get(job.job_id)  # a fill
        assert 25 <= h.client.ttl(key) <= 30
        h.cache.update_progress(job.job_id, STEPS[0])  # a pre-warm
        assert 25 <= h.client.ttl(key) <= 30
        for step in STEPS[1:]:
            h.cache.update_progress(job.job_id, step)
        assert 3_600 - 60 <= h.client.ttl(key) <= 3_600
        # A finished job filled from the DB is long-lived too.
        assert h.cache.invalidate_job(job.job_id)
        h.cache.get(job.job_id)
        assert 3_600 - 60 <= h.client.ttl(key) <= 3_600
        failed = h.new_job()
        write_db_only(h.sessions, failed.job_id, {"status": "failed", "error": "GPU on fire"})
        h.cache.get(failed.job_id)
        assert 3_600 - 60 <= h.client.ttl(h.keys.job(failed.job_id)) <= 3_600

    def test_list_pages_expire_with_the_short_ttl(self, h: Harness) -> None:
        h.cache.get_list(ALICE, "p1", lambda: b"[]")
        assert 25 <= h.client.ttl(h.keys.jobs(ALICE)) <= 30

    # -- lists ------------------------------------------------------------------------------------

    def test_a_write_is_one_round_trip_when_statistics_are_due(self, make: Make) -> None:
        """The flusher thread (every API and worker process runs one) sends the counts: a
        write that finds them due does not carry them on its own round trip."""
        h = make(recording=True)
        client = h.client
        assert isinstance(client, RecordingClient)
        job = h.new_job()
        steps = iter(STEPS)
        assert h.cache.update_progress(job.job_id, next(steps)) is True  # scripts loaded
        h.cache.flush()

        def write_when_due() -> int:
            h.cache._last_flush = float("-inf")  # the last flush was long ago
            client.reset()
            assert h.cache.update_progress(job.job_id, next(steps)) is True
            return client.round_trips

        # Without a flusher, the counts ride on the next Redis call: two round trips.
        assert write_when_due() == 2
        # A period far away: the flusher thread itself sends nothing during the test.
        h.cache.policy = dataclasses.replace(h.cache.policy, stats_flush_seconds=3_600)
        h.cache.start_flusher()
        try:
            assert write_when_due() == 1
        finally:
            h.cache.close()

    def test_list_invalidation_is_one_del_and_never_scans(self, make: Make) -> None:
        h = make(recording=True)
        client = h.client
        assert isinstance(client, RecordingClient)
        configure(h.cache)
        try:
            for page in range(40):
                h.cache.get_list(ALICE, f"p{page}", lambda: b"[]")
            client.reset()
            assert invalidate_user_jobs_cache(ALICE) is True
        finally:
            configure(None)
        dels = [args for name, args in client.commands if name == "DEL"]
        assert dels == [(h.keys.jobs(ALICE),)]
        assert client.round_trips == 1
        assert not {"KEYS", "SCAN", "SCAN_ITER", "HSCAN"} & set(client.names())
        loads: list[str] = []

        def load() -> bytes:
            loads.append("p7")
            return b"[]"

        h.cache.get_list(ALICE, "p7", load)
        assert loads == ["p7"], "the page was dropped"

    def test_a_write_drops_the_owners_lists_only(self, h: Harness) -> None:
        job = h.new_job(ALICE)
        h.cache.get_list(ALICE, "p1", lambda: b'["old"]')
        h.cache.get_list("bob@example.com", "p1", lambda: b'["bob"]')
        h.cache.update_progress(job.job_id, STEPS[0])
        assert h.cache.get_list(ALICE, "p1", lambda: b'["new"]') == b'["new"]'
        assert h.cache.get_list("bob@example.com", "p1", lambda: b"[]") == b'["bob"]'

    def test_a_list_fill_straddling_an_invalidation_is_refused(self, h: Harness) -> None:
        job = h.new_job(ALICE)
        loading, release = threading.Event(), threading.Event()
        result: dict[str, bytes] = {}

        def slow_load() -> bytes:
            loading.set()
            assert release.wait(30)
            return b'["stale"]'

        thread = threading.Thread(
            target=lambda: result.setdefault("body", h.cache.get_list(ALICE, "p1", slow_load)),
            daemon=True,
        )
        thread.start()
        assert loading.wait(30)
        h.another().cache.update_progress(job.job_id, STEPS[0])  # drops Alice's lists
        release.set()
        thread.join(30)
        assert result["body"] == b'["stale"]'
        assert h.cache.get_list(ALICE, "p1", lambda: b'["fresh"]') == b'["fresh"]'
        assert h.cache.get_list(ALICE, "p1", lambda: b'["unused"]') == b'["fresh"]'

    # -- health and isolation ------------------------------------------------------------------

    def test_redis_available_makes_no_network_call(self, make: Make) -> None:
        h = make(recording=True)
        client = h.client
        assert isinstance(client, RecordingClient)
        configure(h.cache)
        try:
            client.reset()
            assert all(redis_available() for _ in range(100))
            h.cache.breaker.failure(ConnectionError("simulated outage"))
            assert not any(redis_available() for _ in range(100))
            assert not h.cache.available()
        finally:
            configure(None)
        assert client.round_trips == 0

    def test_namespaces_isolate(self, client_factory: Any, key_ns: str, db: Any) -> None:
        a = make_harness(client_factory, db, f"{key_ns}:a")
        b = make_harness(client_factory, db, f"{key_ns}:b")
        job = a.new_job(ALICE)
        a.cache.get(job.job_id)
        a.cache.get(job.job_id)
        assert b.load.call_count == 0
        b.cache.get(job.job_id)
        assert b.load.call_count == 1, "b must not see a's entry"
        a.cache.get_list(ALICE, "p1", lambda: b'["a"]')
        b.cache.get_list(ALICE, "p1", lambda: b'["b"]')
        a.cache.invalidate_lists(ALICE)
        assert b.cache.get_list(ALICE, "p1", lambda: b"[]") == b'["b"]'
        assert (a.counts()["hits"], a.counts()["misses"]) == (1, 2)
        assert (b.counts()["hits"], b.counts()["misses"]) == (1, 2)
        for key in a.client.scan_iter(match=f"{key_ns}:*"):
            name = key.decode() if isinstance(key, bytes) else key
            assert name.startswith((f"{key_ns}:a:", f"{key_ns}:b:"))

    # -- every script, directly -------------------------------------------------------------------

    def test_every_script_on_this_server(self, h: Harness) -> None:
        backend = h.cache.backend
        assert isinstance(backend, RedisBackend)
        jid, inc = 4242, ""

        def value(version: int) -> bytes:
            return orjson.dumps({"job_id": jid, "version": version})

        def fill(token: str, rev: str, version: int) -> bool:
            reply = backend.fill_job(jid, token, rev, version, value(version), 30, inc, 600)
            assert isinstance(reply, Stored)
            return reply.stored

        def write(version: int) -> bool:
            reply = backend.write_job(jid, ALICE, version, value(version), 30, inc, 600)
            assert isinstance(reply, Stored)
            return reply.stored

        assert backend.read_job(jid, "t1", 10_000, inc) == Lease("0")  # miss, lease granted
        busy = backend.read_job(jid, "t2", 10_000, inc)
        assert isinstance(busy, Busy) and 0 < busy.pttl_ms <= 10_000  # someone else fills
        assert fill("t1", "0", 3) is True
        assert not h.client.exists(h.keys.lease(jid)), "a fill releases its lease"
        hit = backend.read_job(jid, "t3", 10_000, inc)
        assert hit == Hit(value(3), sealed=True)
        assert write(2) is False  # older
        assert write(3) is False  # same, and present
        assert write(4) is True
        assert fill("t9", "0", 5) is False, "the writes revoked what was read before them"
        assert backend.drop_job(jid, revoke=False, floor_ttl=600) == Done()
        assert backend.read_job(jid, "t4", 10_000, inc) == Lease("3")
        assert fill("t4", "3", 3) is False, "older than the floor (v4), though the entry is gone"
        assert fill("t4", "3", 4) is True, "equal to the floor with the entry gone"
        assert backend.drop_job(jid, revoke=True, floor_ttl=600) == Done()
        assert backend.read_job(jid, "t5", 10_000, inc) == Lease("4")
        assert fill("t5", "3", 5) is False, "an invalidation revoked the fill"
        assert backend.read_job(jid, "t5", 10_000, inc) == Lease("4")  # re-entrant
        assert backend.fill_missing(jid, "t5", "4", 5, inc) == Stored(False), "the job exists"
        assert backend.fill_missing(4243, "t6", "0", 5, inc) == Stored(True)
        assert backend.read_job(4243, "t7", 10_000, inc) == Hit(b"", sealed=True)
        assert write(6) is True
        other = backend.read_job(jid, "t8", 10_000, "other-db")
        assert isinstance(other, Lease), "an entry of another DB incarnation is a miss"
        assert backend.read_list(ALICE, "p", "e1", 30) == ("e1", None)
        assert backend.read_list(ALICE, "p", "e2", 30) == ("e1", None)  # the epoch stays
        assert backend.fill_list(ALICE, "e2", "p", b"[2]") == Stored(False)
        assert backend.fill_list(ALICE, "e1", "p", b"[1]") == Stored(True)
        assert backend.read_list(ALICE, "p", "e3", 30) == ("e1", Hit(b"[1]", sealed=True))
        batch = Batch("b1", (("hits", 2), ("misses", 4)))
        assert backend.flush_stats([batch, batch]) == [Done(), Done()]
        counters = backend.counters()
        assert isinstance(counters, tuple)
        assert counters[0] == {"hits": 2, "misses": 4}, "a batch counts once"
        assert counters[1] is not None
        backend.reset_counters()
        assert backend.counters() == ({}, None)
        backend.ping()


class TestContractOnFakeRedis(CacheContract):
    """The contract on fakeredis: a fresh server per test."""

    @pytest.fixture
    def client_factory(self) -> Callable[[], Any]:
        server = fakeredis.FakeServer()
        return lambda: fakeredis.FakeRedis(server=server)

    @pytest.fixture
    def key_ns(self) -> str:
        return "unit"
