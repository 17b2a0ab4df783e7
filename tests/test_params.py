"""Code tests for pipeline/core/params.py: every bad params file is refused with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params

from pipeline.core import params


def test_the_shipped_params_load_and_flatten() -> None:
    p = params.load(REPO / "params.yaml")
    assert p.base.task == "text-classification"
    assert isinstance(p.finetune.learning_rate, float)
    flat = p.flat()
    assert flat["finetune.learning_rate"] == p.finetune.learning_rate
    assert len(p.digest()) == 64


def test_only_the_named_sections_are_loaded() -> None:
    p = params.load(REPO / "params.yaml", "base", "ingest")
    assert set(p.sections) == {"base", "ingest"}
    with pytest.raises(AttributeError, match="finetune"):
        _ = p.finetune


def test_digest_changes_with_a_value(tmp_path: Path) -> None:
    a = params.load(write_params(tmp_path)).digest()
    b = params.load(write_params(tmp_path, {"finetune.learning_rate": 1e-4})).digest()
    assert a != b


BAD = [
    ({"finetune.learnin_rate": 1e-4}, "unknown key(s) finetune.learnin_rate"),
    ({"finetune.learning_rate": "fast"}, "finetune.learning_rate must be float, got str 'fast'"),
    ({"finetune.learning_rate": 3.0}, "finetune.learning_rate: 3.0 must be in (0, 1)"),
    ({"finetune.batch_size": 0}, "finetune.batch_size: 0 must be > 0"),
    ({"finetune.batch_size": True}, "finetune.batch_size must be int, got bool"),
    ({"base.task": "translation"}, "base.task: 'translation' is not one of"),
    ({"base.max_length": 4}, "base.max_length: 4 must be between 8 and 8192"),
    ({"ingest.test_fraction": 0.7}, "ingest.test_fraction: 0.7 must be in (0, 0.5)"),
    ({"ingest.drop_labels": "plot"}, "ingest.drop_labels must be a list"),
    ({"validate.labels": ["a", "a"]}, "lists a label twice"),
    ({"export.variants": ["fp8"]}, "export.variants: ['fp8'] not among"),
    ({"export.parity_atol": 0.5}, "export.parity_atol: 0.5 must be in (0, 0.01]"),
    ({"tracking.experiment": " "}, "tracking.experiment must not be empty"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_params_name_the_key(tmp_path: Path, overrides: dict, message: str) -> None:
    path = write_params(tmp_path, overrides)
    with pytest.raises(params.ParamsError) as caught:
        params.load(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["finetune"]["epochs"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(params.ParamsError, match=r"missing key\(s\) finetune\.epochs"):
        params.load(path)


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["trian"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(params.ParamsError, match=r"unknown section\(s\) trian"):
        params.load(path)
    with pytest.raises(params.ParamsError, match="params file not found"):
        params.load(tmp_path / "nope.yaml")
    path.write_text("base: [unclosed")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(path)


def test_a_float_written_without_a_dot_is_read_as_a_float(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    path.write_text(path.read_text().replace("learning_rate: 5.0e-05", "learning_rate: 5e-05"))
    assert "learning_rate: 5e-05" in path.read_text()
    assert params.load(path).finetune.learning_rate == 5e-05
