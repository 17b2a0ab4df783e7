"""The sections of docs/benchmarks.md against the JSON reports they were rendered from.

Every measured section of the page is written by `benchmarks.report.publish` from one JSON
report in `reports/` (its data, module, command, date, machine and versions). This module
re-renders each section from its report and compares, so a number edited by hand, a report
re-measured without its page (or the other way round), or a section with no report fails:

    python -m benchmarks.docs_tables            # check; exit 1 and name each difference
    python -m benchmarks.docs_tables --write    # re-render every section from its report
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path
from typing import Any

from benchmarks import report

DOC = Path("docs/benchmarks.md")
REPORTS = Path("reports")
# Sections that hold no measurement yet, only how to take it; they must not hold a table.
UNMEASURED = frozenset({"GPU"})
# Sections measured before every report recorded its command, machine and versions: the page
# marks them, and the next `make bench` replaces each with one rendered from its report (then
# it leaves this set: the tests fail while a section here has a complete report).
SECTION = re.compile(r"^## (?P<heading>.+?)[ \t]*\n(?P<body>.*?)(?=^## |\Z)", re.M | re.S)


def sections(doc: str) -> dict[str, str]:
    """`## heading` -> the section's text, stripped."""
    return {m["heading"]: m["body"].strip() for m in SECTION.finditer(doc)}


def records(folder: Path = REPORTS) -> dict[str, tuple[Path, dict[str, Any]]]:
    """heading -> (path, report) for every JSON report in `folder` that `publish` wrote."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "heading" not in data or "module" not in data:
            continue  # a pipeline report, not a benchmark's
        if data["heading"] in found:
            raise ValueError(
                f"{path} and {found[data['heading']][0]} both render section "
                f"{data['heading']!r}; give one of them its own --section"
            )
        found[data["heading"]] = (path, data)
    return found


def problems(doc_path: Path = DOC, folder: Path = REPORTS) -> list[str]:
    """What differs between the page and its reports, one message each; [] when they agree."""
    shown = sections(Path(doc_path).read_text(encoding="utf-8"))
    found = records(folder)
    out = []
    for heading, body in shown.items():
        if heading in found:
            path, data = found[heading]
            missing = [key for key in report.RECORD_KEYS if not data.get(key)]
            if missing:
                out.append(f"{path}: no {', '.join(missing)}; re-run `{data['command']}`")
                continue
            expected = report.render(data).strip()
            if body != expected:
                diff = "\n".join(
                    difflib.unified_diff(
                        expected.splitlines(), body.splitlines(), str(path), str(doc_path), n=0
                    )
                )
                out.append(
                    f"{doc_path} section {heading!r} is not what {path} renders "
                    f"(`python -m benchmarks.docs_tables --write` re-renders it):\n{diff}"
                )
        elif heading not in UNMEASURED:
            out.append(
                f"{doc_path} section {heading!r} has no JSON report in {folder}/; "
                "write it with its benchmark (`make bench` and the commands in the section)"
            )
        elif "\n|" in f"\n{body}":
            out.append(f"{doc_path} section {heading!r} is marked unmeasured but holds a table")
    for heading, (path, _) in found.items():
        if heading not in shown:
            out.append(f"{path} renders section {heading!r}, which {doc_path} does not have")
    return out


def write(doc_path: Path = DOC, folder: Path = REPORTS) -> list[str]:
    """Re-render every section that has a report; the headings written."""
    written = []
    for heading, (_, data) in records(folder).items():
        report.write_section(doc_path, heading, report.render(data))
        written.append(heading)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--reports", type=Path, default=REPORTS)
    parser.add_argument("--write", action="store_true", help="re-render the sections")
    args = parser.parse_args(argv)
    if args.write:
        for heading in write(args.doc, args.reports):
            print(f"rendered: {heading}")
    found = problems(args.doc, args.reports)
    for message in found:
        print(message)
    if not found:
        print(f"{args.doc}: every section agrees with its report in {args.reports}/")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
