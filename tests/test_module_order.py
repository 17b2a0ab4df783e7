"""The suite's own scheduling: long modules first, and the second worker not left waiting."""

from __future__ import annotations

from dataclasses import dataclass, field

import module_order


@dataclass
class Item:
    nodeid: str
    fixturenames: list[str] = field(default_factory=list)


def modules(items: list[Item]) -> list[str]:
    return list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))


def test_modules_run_longest_first_keeping_their_own_order(monkeypatch) -> None:
    seconds = {"a.py": 5.0, "b.py": 50.0, "c.py": 20.0}
    monkeypatch.setattr(module_order, "known_seconds", lambda config: seconds)
    items = [
        Item("a.py::t1"),
        Item("b.py::t2"),
        Item("b.py::t1"),
        Item("c.py::t"),
        Item("d.py::t"),
    ]
    module_order.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["b.py::t2", "b.py::t1", "c.py::t", "a.py::t1", "d.py::t"]


def test_the_second_module_does_not_wait_for_the_first_ones_build(monkeypatch) -> None:
    seconds = {"release.py": 200.0, "e2e.py": 150.0, "train.py": 100.0, "unit.py": 1.0}
    monkeypatch.setattr(module_order, "known_seconds", lambda config: seconds)
    built = ["reproduced_repo"]
    items = [
        Item("unit.py::t"),
        Item("train.py::t"),
        Item("e2e.py::t", built),
        Item("release.py::t", built),
    ]
    module_order.pytest_collection_modifyitems(None, items)
    assert modules(items) == ["release.py", "train.py", "e2e.py", "unit.py"]
