"""The package layout the README promises: imports go `api -> shared <- worker`, the
operator's tools (`renderwatch`) may import all three and nothing imports them, and
`worker.app` / `worker.tasks` do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the top-level packages of ours it must never import
FORBIDDEN = {
    "shared": {"api", "worker", "renderwatch"},
    "api": {"worker", "renderwatch"},
    "worker": {"api", "renderwatch"},
}
OURS = {"api", "worker", "shared", "renderwatch"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name that `path` imports (at any depth in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert offenders == []


def test_shared_holds_only_what_api_and_worker_share() -> None:
    """Every module of `shared` is used by `api` or `worker` (directly or through shared)."""
    used: set[str] = set()
    for package in ("api", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            used.update(imported_modules(path))
    frontier = {name for name in used if name.startswith("shared")}
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        module = ROOT / Path(*name.split("."))
        for candidate in (module.with_suffix(".py"), module / "__init__.py"):
            if candidate.exists():
                frontier.update(n for n in imported_modules(candidate) if n.startswith("shared"))
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "shared").rglob("*.py")
    }
    unused = sorted(m for m in modules if m not in seen and m != "shared")
    assert unused == [], f"modules of shared/ that neither api/ nor worker/ use: {unused}"


def test_worker_app_and_tasks_do_not_import_each_other() -> None:
    assert not any(n.startswith("worker.app") for n in imported_modules(ROOT / "worker/tasks.py"))
    assert not any(n.startswith("worker.tasks") for n in imported_modules(ROOT / "worker/app.py"))


def test_the_worker_app_finds_its_tasks_by_name() -> None:
    from shared.queue import RENDER_VIDEO, SNAPSHOT_CACHE_STATS
    from worker.app import app

    app.loader.import_default_modules()
    assert {RENDER_VIDEO, SNAPSHOT_CACHE_STATS} <= set(app.tasks)


def test_the_migrations_ship_inside_the_tools_package() -> None:
    from renderwatch.migrate import MIGRATIONS

    assert MIGRATIONS.is_relative_to(ROOT / "renderwatch")
    assert (MIGRATIONS / "env.py").is_file()
    assert list((MIGRATIONS / "versions").glob("0001_*.py"))
    assert not (ROOT / "migrations").exists()
