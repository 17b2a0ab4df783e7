"""How a re-run of a tag is judged: equal on the machine that made it, the documented tolerance
elsewhere, and the first stage outside it named."""

from __future__ import annotations

from pathlib import Path

from pipeline.ops.reproduce import compare, untrainable_here

TAGGED = {
    "ingest": {"data/raw": "a1"},
    "validate": {"data/validated": "b1"},
    "tokenize": {"data/tokenized": "c1"},
    "finetune": {"models/finetuned": "d1"},
    "export": {"models/onnx": "e1"},
}
METRICS = {"accuracy": 0.8259, "macro_f1": 0.8223}


def rerun(**changed: str) -> dict[str, dict[str, str]]:
    out = {stage: dict(outs) for stage, outs in TAGGED.items()}
    for stage, md5 in changed.items():
        path = next(iter(out[stage]))
        out[stage][path] = md5
    return out


def test_everything_equal_reproduces_on_any_machine() -> None:
    for same in (True, False):
        rows, first = compare(TAGGED, rerun(), same, 1e-4, (METRICS, dict(METRICS)))
        assert first is None and all(row[-1] == "equal" for row in rows)


def test_on_the_same_machine_any_difference_names_its_stage() -> None:
    _, first = compare(TAGGED, rerun(finetune="d2", export="e2"), True, 1e-4, (METRICS, METRICS))
    assert first == "finetune"
    moved = {**METRICS, "accuracy": 0.8260}
    _, first = compare(TAGGED, rerun(), True, 1e-4, (METRICS, moved))
    assert first == "evaluate"


def test_elsewhere_weights_may_differ_but_data_and_metrics_may_not() -> None:
    within = {**METRICS, "accuracy": METRICS["accuracy"] + 5e-5}
    rows, first = compare(
        TAGGED, rerun(finetune="d2", export="e2"), False, 1e-4, (METRICS, within)
    )
    assert first is None
    assert any("allowed" in row[-1] for row in rows)
    assert any(row[-1] == "within tolerance" for row in rows)
    _, first = compare(
        TAGGED, rerun(tokenize="c2", finetune="d2"), False, 1e-4, (METRICS, METRICS)
    )
    assert first == "tokenize"
    outside = {**METRICS, "macro_f1": METRICS["macro_f1"] + 1e-3}
    _, first = compare(TAGGED, rerun(finetune="d2"), False, 1e-4, (METRICS, outside))
    assert first == "evaluate"


def test_nested_metric_groups_are_compared_key_by_key() -> None:
    nested = {**METRICS, "calibration": {"ece_after": 0.03}, "validation": {"macro_f1": 0.80}}
    rows, first = compare(TAGGED, rerun(), True, 1e-4, (nested, nested))
    assert first is None
    assert ["metrics", "calibration.ece_after", "0.03", "0.03", "equal"] in rows
    moved = {**nested, "validation": {"macro_f1": 0.81}}
    rows, first = compare(TAGGED, rerun(), True, 1e-4, (nested, moved))
    assert first == "evaluate"
    assert ["metrics", "validation.macro_f1", "0.8", "0.81", "DIFFERS"] in rows


def test_a_run_trained_in_another_precision_is_named_as_not_repeatable_here() -> None:
    assert untrainable_here("v1", "bf16", "bf16") is None
    assert untrainable_here("v1", None, "fp32") is None  # a tag from before it was recorded
    why = untrainable_here("v1", "bf16", "fp32")
    assert why is not None
    assert "v1 trained in bf16 and this machine trains its params in fp32" in why
    assert "finetune.precision: fp32" in why


def test_only_resumption_state_is_left_out_of_a_stale_lock() -> None:
    """The project's dvc.yaml declares the checkpoints as resumption state; a change there
    alone (what `dvc exp apply` leaves) does not make the lock stale, any other change does."""
    from pipeline.core import lineage

    dvc_yaml = Path(__file__).resolve().parents[1] / "dvc.yaml"
    assert lineage.resumption_state(dvc_yaml) == {"models/checkpoints"}
    checkpoints = {"changed outs": {"models/checkpoints": "modified"}}
    assert lineage.stale_stages({"finetune": [checkpoints]}, dvc_yaml) == {}
    both = {"changed outs": {"models/checkpoints": "modified", "models/finetuned": "deleted"}}
    params = {"changed deps": {"params.yaml": {"finetune.learning_rate": 0.002}}}
    stale = lineage.stale_stages(
        {"finetune": [both, params], "export": ["changed command"]}, dvc_yaml
    )
    assert stale == {
        "finetune": [{"changed outs": {"models/finetuned": "deleted"}}, params],
        "export": ["changed command"],
    }
