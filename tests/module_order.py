"""Longest modules first: under `-n auto --dist loadscope` a module is one unit of work, and
xdist's own order (most tests first) starts the few long end-to-end modules last, so one worker
finishes them alone. Sorted by measured seconds, longest first, both workers end together.

Seconds are measured per test (setup, call and teardown), and a module weighs what its selected
tests took, so `make test-fast`, `-k` or `-m` order by the part of each module they run. They
come from this checkout's last runs (pytest's cache, `.pytest_cache`), else from
`tests/test_seconds.json` (committed, for a clean clone). Refresh that file after a full run:
`python tests/module_order.py`. A test in neither counts a tenth of a second. Order changes
nothing but when a module starts.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

COMMITTED = Path(__file__).with_name("test_seconds.json")
CACHE_KEY = "bert-pipeline/test_seconds"
UNKNOWN_PER_TEST = 0.1
# Session fixtures that take most of a minute to build (tests/conftest.py's `shared`).
BUILT_ONCE = {"reproduced_repo"}

_seconds: defaultdict[str, float] = defaultdict(float)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def known_seconds(config: pytest.Config | None) -> dict[str, float]:
    """Seconds per test node id: the committed measurement, overridden by this checkout's."""
    seconds = json.loads(COMMITTED.read_text(encoding="utf-8")) if COMMITTED.is_file() else {}
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        seconds.update(cache.get(CACHE_KEY, {}))
    return seconds


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = known_seconds(config)
    per_module: defaultdict[str, float] = defaultdict(float)
    for item in items:
        per_module[_module(item.nodeid)] += seconds.get(item.nodeid, UNKNOWN_PER_TEST)
    items.sort(key=lambda item: per_module[_module(item.nodeid)], reverse=True)  # stable
    second_worker_starts_free(items)


def second_worker_starts_free(items: list[pytest.Item]) -> None:
    """The first two modules go to the two workers at once: if both need a long run-wide build
    (BUILT_ONCE), the second worker would wait for the first to build it. The longest module
    that needs none moves up to second place."""
    modules = list(dict.fromkeys(_module(item.nodeid) for item in items))
    needs = {module: False for module in modules}
    for item in items:
        if BUILT_ONCE & set(getattr(item, "fixturenames", ())):
            needs[_module(item.nodeid)] = True
    if len(modules) < 3 or not (needs[modules[0]] and needs[modules[1]]):
        return
    free = next((m for m in modules[2:] if not needs[m]), None)
    if free is None:
        return
    rank = {m: i for i, m in enumerate(modules)}
    rank[free] = 0.5
    items.sort(key=lambda item: rank[_module(item.nodeid)])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On the controller (or a run without xdist): this run's seconds into the cache."""
    config = session.config
    cache = getattr(config, "cache", None)
    if hasattr(config, "workerinput") or cache is None or not _seconds:
        return
    stored = cache.get(CACHE_KEY, {})
    stored.update({nodeid: round(value, 2) for nodeid, value in _seconds.items()})
    cache.set(CACHE_KEY, stored)


def still_there(seconds: dict[str, float], root: Path) -> dict[str, float]:
    """The measured tests that the suite still has: the cache keeps every test it ever timed,
    including those since moved or removed, whose module or function is gone."""
    texts: dict[str, str] = {}
    kept = {}
    for nodeid, value in seconds.items():
        module = _module(nodeid)
        if module not in texts:
            path = root / module
            texts[module] = path.read_text(encoding="utf-8") if path.is_file() else ""
        name = nodeid.split("::")[-1].split("[", 1)[0]
        if re.search(rf"^\s*(async )?def {re.escape(name)}\(", texts[module], re.MULTILINE):
            kept[nodeid] = value
    return kept


def main() -> int:
    """Write the cached seconds of this checkout into the committed file."""
    root = Path(__file__).resolve().parents[1]
    cached = root / ".pytest_cache" / "v" / CACHE_KEY
    if not cached.is_file():
        print(f"{cached}: no measured run yet; run `make test` first", file=sys.stderr)
        return 1
    seconds = still_there(json.loads(cached.read_text(encoding="utf-8")), root)
    ordered = dict(sorted(seconds.items(), key=lambda kv: -kv[1]))
    COMMITTED.write_text(json.dumps(ordered, indent=1) + "\n", encoding="utf-8")
    modules = {_module(nodeid) for nodeid in ordered}
    print(
        f"{COMMITTED}: {len(ordered)} tests in {len(modules)} modules, "
        f"{sum(ordered.values()):.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
