"""The README's Configuration section says what the code does: every setting, its default."""

from __future__ import annotations

import re

from pydantic import SecretStr

from renderwatch import cli
from shared.settings import REPO_ROOT, Settings

README = (REPO_ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _tables(text: str) -> list[list[list[str]]]:
    """Each markdown table of `text` as rows of cells (header and rule left out)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                continue  # the header
            if not set("".join(cells)) <= set("-: "):
                current.append(cells)
        else:
            current = None
    return tables


def _names(cell: str) -> list[str]:
    return re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)


def _shown(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    text = str(value).replace(str(REPO_ROOT), "<checkout>")
    return text


def _cell_values(cell: str, count: int) -> list[str]:
    parts = [part.strip().strip("`") for part in cell.split(" / ")]
    assert len(parts) == count, f"{cell!r}: one default per variable"
    return ["" if part == "empty" else part for part in parts]


def test_the_configuration_table_lists_every_setting_with_the_codes_default() -> None:
    settings_table, _ = _tables(_section("Configuration"))
    listed: dict[str, str] = {}
    for variable, default, _meaning in settings_table:
        names = _names(variable)
        assert names, f"no variable in {variable!r}"
        listed.update(zip(names, _cell_values(default, len(names)), strict=True))
    fields = {name.upper(): field for name, field in Settings.model_fields.items()}
    assert set(listed) == set(fields), "the table and Settings must list the same settings"
    for name, shown in listed.items():
        assert shown == _shown(fields[name].default), f"{name}: README says {shown!r}"


def test_every_variable_the_compose_file_or_cli_reads_is_documented() -> None:
    documented = {
        name for table in _tables(_section("Configuration")) for row in table
        for name in _names(row[0])
    }  # fmt: skip
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    used |= {cli.API_URL_ENV, cli.API_KEY_ENV, "PROMETHEUS_MULTIPROC_DIR"}
    assert used - documented == set()


def test_the_configuration_comes_before_the_long_tables() -> None:
    headings = re.findall(r"^## (.+)$", README, re.M)
    configuration = headings.index("Configuration")
    for long_one in ("The cache and its guarantees", "Performance", "Reliability"):
        assert configuration < headings.index(long_one)
