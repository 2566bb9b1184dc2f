"""`python -m bench --only slowdb` merges one section into a whole run's latest.*:
its keys, its target rows and its Markdown block replace the old ones, the rest stays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.run import write_alone

WHOLE_MD = """# renderwatch benchmark

## Targets (issue 5)

| target | measured | goal | met |
|---|---|---|---|
| stampede: DB reads for 200 cold requests | 1.00 | = 1 | yes |

## 6. Scale

table

## Machine

| a | b |
"""


def section(db_reads: float, hit_rate: float) -> dict[str, Any]:
    return {
        "slowdb": {
            "db_reads": db_reads,
            "db_reads_max": db_reads,
            "next_wave_hit_rate": hit_rate,
            "next_wave_hit_rate_min": hit_rate,
            "next_wave_db_reads_max": 0,
            "p50_ms": 700.0,
            "p99_ms": 800.0,
            "errors": 0,
            "rounds": [],
            "breaker_openings": {},
            "params": {"requests": 200, "rounds": 1, "delay_ms": 600},
        },
        "machine": {"date": "today"},
        "config": "full",
    }


def test_a_section_run_alone_replaces_its_figures_and_keeps_the_others(tmp_path: Path) -> None:
    stampede = {
        "target": "stampede: DB reads for 200 cold requests",
        "value": 1.0,
        "goal": "= 1",
        "met": True,
    }
    (tmp_path / "latest.json").write_text(
        json.dumps({"stampede_db_reads": 1.0, "targets": [stampede], "details": {}})
    )
    (tmp_path / "latest.md").write_text(WHOLE_MD)

    write_alone(section(201.0, 40.5), tmp_path, "slowdb", command="c")
    write_alone(section(1.0, 100.0), tmp_path, "slowdb", command="c")

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["stampede_db_reads"] == 1.0
    assert document["slowdb_db_reads"] == 1.0
    assert document["slowdb_next_wave_hit_rate"] == 100.0
    assert [row["target"][:5] for row in document["targets"]] == ["stamp", "slow ", "slow "]
    assert [row["met"] for row in document["targets"][1:]] == [True, True]
    md = (tmp_path / "latest.md").read_text()
    assert md.count("## 8. Slow database") == 1
    assert md.index("## 6. Scale") < md.index("## 8.") < md.index("## Machine")
    assert "201" not in md and "| slow DB (+600 ms): DB reads for 200 cold polls | 1.00 |" in md
    assert "| stampede: DB reads for 200 cold requests | 1.00 | = 1 | yes |" in md
