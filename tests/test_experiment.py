"""The config runner: a config file becomes `dvc exp run -S` overrides, checked against params."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from pipeline.core import params
from pipeline.ops.experiment import overrides


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_params(config: Path, tmp_path: Path) -> None:
    import yaml

    sets = overrides(config)
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for item in sets:
        dotted, _, value = item.partition("=")
        section, key = dotted.split(".")
        data[section][key] = yaml.safe_load(value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = params.load(path)
    assert loaded.base.task in ("token-classification", "fill-mask")
    files = [loaded.ingest.source, loaded.ingest.probes, loaded.fill_mask.user_words]
    for value in files:  # the repo's own corpora, probes and word lists are where configs say
        assert not value or value.startswith("package:") or (REPO / value).is_file(), value
    assert loaded.ingest.drop_labels == []  # no config is a sentiment task


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("finetune:\n  epoch: 3\n", "unknown key finetune.epoch"),
        ("train:\n  epochs: 3\n", "'train' is not a section"),
        ("- a\n- b\n", "must be a mapping"),
        ("base: [1\n", "cannot be read"),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(params.ParamsError, match=message):
        overrides(path)


def test_set_overrides_a_config_value_and_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("base:\n  task: fill-mask\n", encoding="utf-8")
    sets = overrides(config, ["finetune.epochs=2", "base.task=token-classification"])
    assert "finetune.epochs=2" in sets and 'base.task="token-classification"' in sets
    with pytest.raises(params.ParamsError, match="unknown key finetune.epoch"):
        overrides(config, ["finetune.epoch=2"])
    with pytest.raises(params.ParamsError, match="write section.key=value"):
        overrides(config, ["epochs"])
