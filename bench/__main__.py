"""`python -m bench [--quick] [--output DIR]`: measure and write latest.md/.json/.png."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.config import FULL, QUICK
from bench.run import ALONE, SECTIONS, main
from bench.services import DEFAULT_PG_ADMIN_URL

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI smoke variant (~1 minute)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where latest.* go")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_ADMIN_URL),
        help="PostgreSQL admin URL; the bench creates and drops its own database",
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and raw records")
    parser.add_argument(
        "--only",
        choices=ALONE,
        help="run this one section alone and merge its figures into --output's latest.*",
    )
    parser.add_argument(
        "--sections",
        type=lambda text: frozenset(text.split(",")),
        help=f"developers: only these sections ({','.join(SECTIONS)}), comma-separated; "
        "prints their raw figures and leaves latest.* alone",
    )
    args = parser.parse_args(argv)
    if args.sections is not None and not args.sections <= set(SECTIONS):
        parser.error(f"--sections takes names among {', '.join(SECTIONS)}")
    return args


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    command = "python -m bench" + (" --quick" if args.quick else "")
    command += f" --only {args.only}" if args.only else ""
    sys.exit(
        main(
            QUICK if args.quick else FULL,
            output=args.output,
            pg_admin_url=args.pg_url,
            keep=args.keep,
            command=command,
            only=args.only,
            sections=args.sections,
        )
    )
