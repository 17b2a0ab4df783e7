"""Layer-wise learning-rate decay: which parameters learn at which rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.train import optim


def test_depth_counts_layers_down_from_the_head() -> None:
    assert optim.depth_of("classifier.weight", 6) == 0
    assert optim.depth_of("bert.pooler.dense.weight", 6) == 0
    assert optim.depth_of("bert.encoder.layer.5.output.dense.weight", 6) == 1
    assert optim.depth_of("bert.encoder.layer.0.attention.self.query.bias", 6) == 6
    assert optim.depth_of("distilbert.transformer.layer.2.ffn.lin1.weight", 6) == 4
    assert optim.depth_of("bert.embeddings.word_embeddings.weight", 6) == 7


def test_groups_scale_the_rate_by_depth_and_skip_decay_on_norms(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    groups = optim.parameter_groups(model, 1e-3, 0.5, 0.01)
    rate = {}
    for group in groups:
        for param in group["params"]:
            rate[id(param)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    layers = 1 + max(int(n.split(".layer.")[1].split(".")[0]) for n in named if ".layer." in n)
    head = next(n for n in named if n.startswith("classifier") and n.endswith("weight"))
    top = next(n for n in named if f".layer.{layers - 1}." in n and n.endswith("dense.weight"))
    embed = next(n for n in named if "word_embeddings" in n)
    norm = next(n for n in named if "LayerNorm.weight" in n)
    assert rate[id(named[head])] == (1e-3, 0.01)
    assert rate[id(named[top])][0] == pytest.approx(1e-3 * 0.5)
    assert rate[id(named[embed])][0] == pytest.approx(1e-3 * 0.5 ** (layers + 1))
    assert rate[id(named[norm])][1] == 0.0
    assert optim.optimizer(model, 1e-3, 0.5, 0.01).param_groups[0]["lr"] == groups[0]["lr"]


def test_a_prefix_with_its_own_rate_skips_the_depth_decay(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    plain = optim.parameter_groups(model, 1e-3, 0.5, 0.01)
    groups = optim.parameter_groups(model, 1e-3, 0.5, 0.01, {"classifier.": 0.05})
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    was = {id(p): (g["lr"], g["weight_decay"]) for g in plain for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    for name, param in named.items():
        if name.startswith("classifier."):
            decays = 0.0 if name.endswith("bias") else 0.01
            assert rate[id(param)] == (0.05, decays), name
        else:
            assert rate[id(param)] == was[id(param)], name


def test_the_crf_head_asks_for_its_own_rate_only_when_there_is_one(tmp_path: Path) -> None:
    from conftest import write_params

    from pipeline.core import params
    from pipeline.tasks import get

    task = get("token-classification")
    on = {"base.task": "token-classification", "token-classification.crf": True}
    p = params.load(write_params(tmp_path, {**on, "token-classification.crf_learning_rate": 0.02}))
    assert task.learning_rates(p) == {"crf.": 0.02}
    off = params.load(write_params(tmp_path, {"base.task": "token-classification"}))
    assert task.learning_rates(off) == {}
    assert get("text-classification").learning_rates(off) == {}
