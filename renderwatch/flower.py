"""`python -m renderwatch.flower [FLOWER OPTIONS]`: Flower, but never open by accident.

Flower serves its UI to anyone who reaches the port unless it is given credentials,
and its API (which can revoke tasks and shut workers down) when
`FLOWER_UNAUTHENTICATED_API` is true. This wrapper refuses to start Flower with no
authentication at all unless `FLOWER_UNAUTHENTICATED_API` is set to a true value on
purpose; then it replaces itself with `celery -A worker.app flower ...` (same PID,
so signals and the container's init reach Flower directly). See the README's
"Flower" section.

Empty `FLOWER_*` variables (compose's `${VAR:-}`) are removed first: Flower would read
an empty `FLOWER_BASIC_AUTH` as one empty credential, not as "no auth".
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence

AUTH_VARIABLES = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")
OPT_OUT = "FLOWER_UNAUTHENTICATED_API"
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})

REFUSAL = (
    "renderwatch flower: refusing to start Flower without authentication. "
    "Set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH for OAuth), or set "
    "FLOWER_UNAUTHENTICATED_API=true on purpose to let anyone who reaches the port "
    "use Flower and its API."
)


def flower_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without empty FLOWER_* variables."""
    return {k: v for k, v in env.items() if not (k.startswith("FLOWER_") and not v.strip())}


def refusal(env: Mapping[str, str]) -> str | None:
    """Why Flower must not start with `env`, or None when it may."""
    if any(env.get(name, "").strip() for name in AUTH_VARIABLES):
        return None
    if env.get(OPT_OUT, "").strip().lower() in _TRUE:
        return None
    return REFUSAL


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = flower_environment(os.environ)
    reason = refusal(env)
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    celery = shutil.which("celery") or os.path.join(os.path.dirname(sys.executable), "celery")
    # exec, not a child: Flower keeps this PID, so signals and the init reach it directly.
    os.execve(celery, [celery, "-A", "worker.app", "flower", *args], env)  # noqa: S606
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    raise SystemExit(main())
