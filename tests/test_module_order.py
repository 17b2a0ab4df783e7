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
    seconds = {"a.py::t1": 5.0, "b.py::t1": 30.0, "b.py::t2": 20.0, "c.py::t": 20.0}
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
    seconds = {"release.py::t": 200.0, "e2e.py::t": 150.0, "train.py::t": 100.0, "unit.py::t": 1}
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


def test_a_module_weighs_only_the_tests_selected_from_it(monkeypatch) -> None:
    """`-m "not slow"`: a module whose long tests are deselected no longer goes first."""
    seconds = {"train.py::slow": 100.0, "train.py::quick": 1.0, "export.py::t": 20.0}
    monkeypatch.setattr(module_order, "known_seconds", lambda config: seconds)
    items = [Item("train.py::quick"), Item("export.py::t")]
    module_order.pytest_collection_modifyitems(None, items)
    assert modules(items) == ["export.py", "train.py"]
    items = [Item("train.py::quick"), Item("train.py::slow"), Item("export.py::t")]
    module_order.pytest_collection_modifyitems(None, items)
    assert modules(items) == ["train.py", "export.py"]


def test_seconds_are_kept_per_test_and_written_by_node_id(tmp_path, monkeypatch) -> None:
    class Report:
        def __init__(self, nodeid: str, duration: float) -> None:
            self.nodeid, self.duration = nodeid, duration

    monkeypatch.setattr(module_order, "_seconds", module_order.defaultdict(float))
    for _when in ("setup", "call", "teardown"):
        module_order.pytest_runtest_logreport(Report("m.py::t[1]", 0.5))
    module_order.pytest_runtest_logreport(Report("m.py::u", 2.0))
    assert dict(module_order._seconds) == {"m.py::t[1]": 1.5, "m.py::u": 2.0}


def test_the_committed_seconds_drop_tests_that_moved_or_went(tmp_path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_kept(x):\n    pass\n")
    measured = {
        "tests/test_a.py::test_kept[1]": 1.0,
        "tests/test_a.py::test_moved": 2.0,
        "tests/test_gone.py::test_kept": 3.0,
    }
    assert module_order.still_there(measured, tmp_path) == {"tests/test_a.py::test_kept[1]": 1.0}
