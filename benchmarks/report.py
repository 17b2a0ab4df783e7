"""Markdown tables and sections of docs/benchmarks.md, and the JSON report."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TITLE = "# Benchmarks\n"
# What every JSON report written by `publish` holds besides its data.
RECORD_KEYS = ("module", "heading", "command", "date", "machine", "versions")


def table(rows: Sequence[dict[str, Any]], columns: dict[str, str]) -> str:
    """A markdown table of `rows`; `columns` maps a row key to its header."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_section(doc: str, heading: str, body: str) -> str:
    """`doc` with the `## heading` section replaced by `body` (appended when absent)."""
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: section + "\n", doc, count=1).rstrip() + "\n"
    doc = doc.rstrip() or TITLE.strip()
    return f"{doc}\n\n{section}"


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace one section of the markdown file, keeping the others."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8") if path.is_file() else TITLE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(doc, heading, body), encoding="utf-8")


def publish(
    module: str,
    argv: list[str] | None,
    heading: str,
    data: dict[str, Any],
    machine: dict[str, Any],
    out: Path,
    json_path: Path,
) -> str:
    """Write the JSON report of one measurement (its data, and what a reader needs to trust it:
    the module, its command, the date, the machine and the versions) and the `## heading`
    section of `out` rendered from that report alone; print and return the section.

    `docs/benchmarks.md` is only ever written from such reports (`benchmarks.docs_tables`
    re-renders every section from its JSON, and a test fails where the two disagree)."""
    from benchmarks import measure

    record = {
        **data,
        "module": module,
        "heading": heading,
        "command": shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]),
        "date": data.get("date") or datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": data.get("versions") or measure.versions(),
    }
    return save(record, out, json_path)


def save(record: dict[str, Any], out: Path, json_path: Path) -> str:
    """Write a complete report (`RECORD_KEYS` and its data) and its section; print the section.
    The section is rendered from the report as written (its keys sorted, as JSON reports keep
    them), so that it is what `benchmarks.docs_tables` renders from the file."""
    write_json(json_path, record)
    text = render(json.loads(Path(json_path).read_text(encoding="utf-8")))
    write_section(out, record["heading"], text)
    print(text)
    return text


def versions_line(record: dict[str, Any]) -> str:
    """The report's package versions in a fixed order (JSON reports keep their keys sorted)."""
    from benchmarks import measure

    found = record["versions"]
    return ", ".join(f"{name} {found[name]}" for name in measure.PACKAGES if name in found)


def render(record: dict[str, Any]) -> str:
    """The markdown section of a JSON report that `publish` wrote: its module's `markdown`."""
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"not a benchmark report: no {', '.join(missing)}")
    return importlib.import_module(record["module"]).markdown(record).strip() + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
