"""Markdown tables and sections of docs/benchmarks.md, and the JSON report."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TITLE = "# Benchmarks\n"


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
    render: Callable[[dict[str, Any], str, dict[str, Any]], str],
    data: dict[str, Any],
    machine: dict[str, Any],
    out: Path,
    json_path: Path,
) -> str:
    """Render `data` with the command that made it, write its section of `out` and the JSON
    report (with the machine), print and return the section."""
    command = f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(data, command, machine)
    write_section(out, heading, text)
    write_json(json_path, {"machine": machine, **data})
    print(text)
    return text


def write_json(path: Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
