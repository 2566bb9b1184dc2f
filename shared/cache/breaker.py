"""In-process circuit breaker for Redis: no network round trip to know the state.

closed ──failures>=threshold──▶ open ──reset_seconds──▶ half-open (one probe)
  ▲                                                        │ probe ok
  └────────────────────────────────────────────────────────┘ probe failed → open

While open, callers go straight to the database. The transition to open is logged
once per outage at WARNING; recovery at INFO.

Late outcomes: every state change starts a new generation, and a `Ticket` carries the
generation it was issued in. An outcome reported with a ticket of an older generation
is ignored: a call permitted before the breaker opened cannot close it without a probe
when it succeeds late, and cannot re-open it when it fails late during a probe.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Permit(enum.Enum):
    NORMAL = "normal"
    PROBE = "probe"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A permit to call Redis, tagged with the breaker generation that issued it."""

    permit: Permit
    generation: int

    @property
    def probe(self) -> bool:
        return self.permit is Permit.PROBE


class CircuitBreaker:
    """Counts consecutive failures; opens at `threshold`, probes after `reset_seconds`."""

    def __init__(
        self,
        *,
        threshold: int = 1,
        reset_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "redis",
    ) -> None:
        self._threshold = threshold
        self._reset = reset_seconds
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._generation = 0
        self.outages = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def available(self) -> bool:
        """False while open: callers should not wait on Redis."""
        return self._state is not State.OPEN

    @property
    def generation(self) -> int:
        return self._generation

    def acquire(self) -> Permit | None:
        """A permit to call Redis, a PROBE permit when half-open, or None (go to the DB)."""
        ticket = self.ticket()
        return ticket.permit if ticket is not None else None

    def ticket(self) -> Ticket | None:
        """Like `acquire`, tagged with the generation (report outcomes with it)."""
        if self._state is State.CLOSED:
            return Ticket(Permit.NORMAL, self._generation)
        with self._lock:
            state = self._state
            if state is State.CLOSED:  # type: ignore[comparison-overlap]  # closed meanwhile
                return Ticket(Permit.NORMAL, self._generation)
            if state is State.OPEN and self._clock() - self._opened_at >= self._reset:
                self._state = State.HALF_OPEN
                self._generation += 1
                return Ticket(Permit.PROBE, self._generation)
        return None

    def _stale(self, ticket: Ticket | None) -> bool:
        return ticket is not None and ticket.generation != self._generation

    def success(self, ticket: Ticket | None = None) -> None:
        """A call succeeded; with its ticket, ignored when issued before the last change."""
        if self._state is State.CLOSED and self._failures == 0 and not self._stale(ticket):
            return
        with self._lock:
            if self._stale(ticket):
                return
            recovered = self._state is not State.CLOSED
            self._state = State.CLOSED
            self._failures = 0
            if recovered:
                self._generation += 1
        if recovered:
            logger.info("%s is back: caching resumed", self._name)

    def failure(self, exc: BaseException, ticket: Ticket | None = None) -> None:
        """A call failed; with its ticket, ignored when issued before the last change."""
        with self._lock:
            if self._stale(ticket):
                return
            self._failures += 1
            was = self._state
            if was is State.HALF_OPEN or self._failures >= self._threshold:
                self._state = State.OPEN
                self._opened_at = self._clock()
                if was is not State.OPEN:
                    self._generation += 1
            newly_open = was is State.CLOSED and self._state is State.OPEN
            if newly_open:
                self.outages += 1
        if newly_open:
            # No exception text and no traceback, at any level: Redis client messages
            # name the host and port, and DESIGN allows no connection detail in logs.
            # The exception chain's types and errno say what happened.
            logger.warning(
                "%s unavailable (%s): serving from the database, retrying every %.1fs",
                self._name,
                describe(exc),
                self._reset,
            )


def describe(exc: BaseException) -> str:
    """A log-safe account of a failure: exception types and errno names, never messages."""
    chain: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        label = type(current).__name__
        if (
            isinstance(current, OSError)
            and current.errno is not None
            and current.errno in errno.errorcode
        ):
            label += f" {errno.errorcode[current.errno]}"
        chain.append(label)
        current = current.__cause__ or current.__context__
    return " <- ".join(chain)
