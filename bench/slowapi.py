"""`python -m bench.slowapi`: the real API (`python -m api`) on a slow database.

Every SELECT the API's engine sends is preceded, on the same PostgreSQL connection, by
`SELECT pg_sleep(BENCH_DB_DELAY_MS / 1000)`: the delay happens in the database server and
holds a connection of the pool, as a struggling database would. The sleep is sent on the
driver's cursor, outside SQLAlchemy's events, so the API's `renderwatch_db_queries_total`
still counts only the API's own statements. Only one worker: the listener is installed in
this process, before uvicorn builds the app in it.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

DELAY_ENV = "BENCH_DB_DELAY_MS"


def slow_reads(delay_ms: int, target: Engine | type[Engine] = Engine) -> None:
    """Delay every SELECT of `target` (default: every engine of this process) by
    `delay_ms`, in PostgreSQL."""
    seconds = delay_ms / 1000

    def before(
        _conn: Any, cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip()[:6].upper() == "SELECT":
            cursor.execute("SELECT pg_sleep(%s)", (seconds,))

    event.listen(target, "before_cursor_execute", before)


if __name__ == "__main__":
    from api.__main__ import main

    slow_reads(int(os.environ[DELAY_ENV]))
    main()
