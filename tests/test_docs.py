"""docs/reliability.md names only tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_reliability_table_names_exists() -> None:
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    named, current = [], None
    for path, name in re.findall(r"(tests/\w+\.py)?::(\w+)", text):
        current = path or current
        named.append((current, name))
    assert len(named) >= 20
    for path, name in named:
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is not a test"
