"""The CRF head: its likelihood and Viterbi against enumeration, the model that trains it, and
the fine-tuned CRF model through evaluate, export and the runtime, which decodes its entities
as PyTorch does."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_sentences, write_params, write_splits

from bertrt.contract import TRANSITIONS_FILE
from bertrt.decoding import CRF, Decoder, iob2_allowed
from bertrt.manifest import IntegrityError, file_entries
from pipeline.tasks.token_classification.crf import LinearChainCrf, labelled
from pipeline.tasks.token_classification.tagger import TokenTagger, model_decoder

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _random_crf(seed: int) -> LinearChainCrf:
    torch.manual_seed(seed)
    crf = LinearChainCrf(LABELS)
    with torch.no_grad():
        for weight in (crf.transitions, crf.start, crf.end):
            weight.normal_()
    return crf


def _paths(crf: LinearChainCrf, emissions: torch.Tensor, n: int) -> list[tuple[float, tuple]]:
    """(score, path) of every tag sequence of length n over one row's emissions."""
    out = []
    for path in itertools.product(range(len(LABELS)), repeat=n):
        score = crf.start[path[0]] + crf.end[path[-1]]
        score = score + sum(emissions[t, tag] for t, tag in enumerate(path))
        score = score + sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))
        out.append((float(score), path))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_log_partition_and_best_path_match_enumeration(seed: int) -> None:
    crf = _random_crf(seed)
    emissions = torch.randn(3, 4, len(LABELS))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    tags = torch.randint(len(LABELS), (3, 4))
    partition = crf.log_partition(emissions, mask)
    nll = crf.nll(emissions, tags, mask)
    decoded = crf.decode(emissions, mask)
    start, step = iob2_allowed(LABELS)
    for row, n in enumerate(mask.sum(1).tolist()):
        every = _paths(crf, emissions[row], n)
        assert float(partition[row]) == pytest.approx(
            float(np.logaddexp.reduce([s for s, _ in every])), abs=1e-4
        )
        given = tuple(tags[row, :n].tolist())
        gold = next(s for s, path in every if path == given)
        assert float(nll[row]) == pytest.approx(float(partition[row]) - gold, abs=1e-4)
        allowed = [
            (s, p)
            for s, p in every
            if start[p[0]] and all(step[a, b] for a, b in itertools.pairwise(p))
        ]
        assert tuple(decoded[row]) == max(allowed)[1]


def test_a_row_without_labelled_positions_costs_nothing() -> None:
    crf = _random_crf(0)
    emissions = torch.randn(2, 3, len(LABELS))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    nll = crf.nll(emissions, torch.zeros(2, 3, dtype=torch.long), mask)
    assert float(nll[1]) == 0.0 and float(nll[0]) > 0.0
    assert crf.decode(emissions, mask)[1] == []


def test_numpy_decoder_decodes_as_the_torch_crf() -> None:
    """The runtime's Viterbi (on log-softmax of the emissions) against the model's own."""
    crf = _random_crf(3)
    decoder = Decoder(tuple(LABELS), CRF, crf.transitions_table())
    emissions = torch.randn(40, 9, len(LABELS)) * 2
    lengths = torch.randint(1, 10, (40,))
    mask = torch.arange(9)[None, :] < lengths[:, None]
    for row, path in enumerate(crf.decode(emissions, mask)):
        scores = torch.log_softmax(emissions[row, : lengths[row]].double(), -1).numpy()
        assert decoder.decode(scores).tolist() == path


def test_labelled_positions_move_to_the_front_in_order() -> None:
    labels = torch.tensor([[-100, 1, -100, 2, 0, -100], [-100, -100, 3, -100, -100, -100]])
    index, mask = labelled(labels)
    assert index.tolist() == [[1, 3, 4], [2, 0, 1]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def _kwargs() -> dict[str, Any]:
    return {
        "id2label": dict(enumerate(LABELS)),
        "label2id": {label: i for i, label in enumerate(LABELS)},
        "ignore_mismatched_sizes": True,
    }


def test_crf_model_trains_by_likelihood_and_saves_its_transitions_beside_the_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForTokenClassification

    model = TokenTagger.from_pretrained(tiny_model_dir, decoding="viterbi", crf=True, **_kwargs())
    assert float(model.crf.transitions.abs().sum()) == 0.0  # a new CRF starts at zero
    crf = _random_crf(1)
    model.crf.load_state_dict(crf.state_dict())
    ids = torch.tensor([[2, 60, 61, 62, 3, 0], [2, 63, 64, 3, 0, 0]])
    attention = (ids != 0).long()
    labels = torch.tensor([[-100, 1, -100, 0, -100, -100], [-100, 3, 4, -100, -100, -100]])
    model.train()
    out = model(input_ids=ids, attention_mask=attention, labels=labels)
    index, mask = labelled(labels)
    emissions = out.logits.gather(1, index[..., None].expand(-1, -1, len(LABELS)))
    tags = labels.gather(1, index).masked_fill(~mask, 0)
    expected = model.crf.nll(emissions, tags, mask).sum() / 4  # 4 labelled positions
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    out.loss.backward()
    assert model.crf.transitions.grad is not None and model.crf.transitions.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        tagged = model(input_ids=ids, attention_mask=attention, labels=labels).tags
    assert (tagged[labels == -100] == -100).all() and (tagged[labels != -100] >= 0).all()

    model.save_pretrained(tmp_path / "ft")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (config["crf"], config["decoding"]) == (True, "viterbi")
    saved = json.loads((tmp_path / "ft" / TRANSITIONS_FILE).read_text())
    assert saved["labels"] == LABELS
    assert np.allclose(saved["transitions"], crf.transitions.detach().numpy())
    again = TokenTagger.from_pretrained(tmp_path / "ft")
    assert torch.equal(again.crf.transitions, model.crf.transitions)
    assert torch.equal(again.crf.end, model.crf.end)
    decoder = model_decoder(tmp_path / "ft")
    assert decoder.mode == CRF and np.allclose(decoder.crf.start, crf.start.detach().numpy())
    # The folder still loads as transformers' own head (the CRF's weights left aside).
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "ft")
    assert torch.equal(plain.classifier.weight, model.classifier.weight)


NER = {
    "base.task": "token-classification",
    "base.text_column": "tokens",
    "base.label_column": "tags",
    "base.max_length": 64,
    "token-classification.stride": 8,
    "token-classification.decoding": "viterbi",
    "token-classification.crf": True,
    "export.variants": [],
}


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """A CRF tagger fine-tuned a few steps on tiny data the way the finetune stage builds it,
    then the evaluate and export stages on it."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from pipeline import tasks
    from pipeline.core import params
    from pipeline.stages import evaluate_model, export_onnx, tokenize_data, validate

    root = tmp_path_factory.mktemp("crf")
    rows = synthetic_sentences(96, seed=7)
    raw = write_splits(
        root / "raw", {"train": rows[:64], "validation": rows[64:80], "test": rows[80:]}
    )
    params_path = write_params(
        root,
        {
            **NER,
            "base.model": str(tiny_model_dir),
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
            "tracking.experiment": "crf",
        },
    )
    p = params.load(params_path)
    validated, tokenized, model_dir = root / "validated", root / "tokenized", root / "ft"
    validate.run(raw, p, validated, root / "v.json", root / "f.json")
    tokenize_data.run(validated, p, tokenized, root / "t.json")
    labels = json.loads((validated / "labels.json").read_text())
    task = tasks.get("token-classification")
    torch.manual_seed(0)
    model = task.model_class().from_pretrained(
        str(tiny_model_dir),
        ignore_mismatched_sizes=True,
        **task.model_kwargs(labels),
        **task.model_settings(p),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collate = task.collator(tokenizer, p)
    train = load_from_disk(str(tokenized))["train"]
    rows_in = [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        batch = collate(rows_in[(step * 16) % 64 : (step * 16) % 64 + 16])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # transitions that matter, so that decoding with them is tested
        model.crf.transitions.add_(torch.randn_like(model.crf.transitions))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    metrics = evaluate_model.run(
        model_dir, tokenized, validated / "test.parquet", p, root / "eval.json", root / "plots"
    )
    export = export_onnx.run(
        model_dir,
        validated / "test.parquet",
        root / "eval.json",
        p,
        root / "onnx",
        root / "e.json",
    )
    test = pd.read_parquet(validated / "test.parquet")
    return {"root": root, "metrics": metrics, "export": export, "test": test, "model": model}


@pytest.mark.slow
def test_evaluate_reports_every_decoding_of_the_crf_model(crf_run: dict[str, Any]) -> None:
    metrics = crf_run["metrics"]
    assert set(metrics["decoding"]) == {"argmax", "viterbi", "crf"}
    assert metrics["decoding"]["crf"]["shipped"] == 1
    assert metrics["overall"]["f1"] == metrics["decoding"]["crf"]["f1"]
    assert metrics["decoding"]["crf"]["invalid_sequences"] == 0
    assert metrics["decoding"]["viterbi"]["invalid_sequences"] == 0
    assert set(metrics["validation"]) == {"argmax_f1", "viterbi_f1", "crf_f1"}


@pytest.mark.slow
def test_the_crf_travels_in_the_model_folder_and_is_verified(
    crf_run: dict[str, Any], tmp_path: Path
) -> None:
    import bertrt

    folder = crf_run["root"] / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["decoding"] == "crf" and TRANSITIONS_FILE in manifest["files"]
    saved = json.loads((crf_run["root"] / "ft" / TRANSITIONS_FILE).read_text())
    assert json.loads((folder / TRANSITIONS_FILE).read_text()) == saved
    assert bertrt.load(folder, device="cpu").metadata()["decoding"] == "crf"
    copy = tmp_path / "onnx"
    shutil.copytree(folder, copy)
    saved["end"][0] += 1.0
    (copy / TRANSITIONS_FILE).write_text(json.dumps(saved))
    with pytest.raises(IntegrityError, match=r"transitions\.json: .*restore the folder"):
        bertrt.load(copy, device="cpu")
    # Listed with its own digest, but not transitions over the model's labels: refused at load.
    saved["labels"] = saved["labels"][::-1]
    (copy / TRANSITIONS_FILE).write_text(json.dumps(saved))
    listed = json.loads((copy / "manifest.json").read_text())
    listed["files"].update(file_entries(copy, [TRANSITIONS_FILE]))
    (copy / "manifest.json").write_text(json.dumps(listed))
    with pytest.raises(IntegrityError, match="not a usable CRF transitions file"):
        bertrt.load(copy, device="cpu")


def _torch_entities(model: Any, tokenizer: Any, text: str) -> list[tuple[str, int, int]]:
    """(type, start, end) of the entities PyTorch's CRF decodes over the text's words."""
    enc = tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    words = enc.word_ids()
    firsts = [j for j, w in enumerate(words) if w is not None and (j == 0 or words[j - 1] != w)]
    with torch.no_grad():
        logits = model(**enc).logits[0]
    emissions = logits[firsts][None]
    (path,) = model.crf.decode(emissions, torch.ones(1, len(firsts), dtype=torch.bool))
    ends = {w: offsets[j][1] for j, w in enumerate(words) if w is not None}
    entities, current = [], None
    for j, tag in zip(firsts, path, strict=True):
        label = model.config.id2label[tag]
        if label.startswith("I-") and current:
            current[2] = ends[words[j]]
            continue
        if current:
            entities.append(tuple(current))
        current = [label[2:], offsets[j][0], ends[words[j]]] if label != "O" else None
    if current:
        entities.append(tuple(current))
    return entities


@pytest.mark.slow
def test_runtime_entities_equal_pytorchs_crf_decoding(crf_run: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    import bertrt

    model = crf_run["model"].eval()
    tokenizer = AutoTokenizer.from_pretrained(crf_run["root"] / "ft")
    runtime = bertrt.load(crf_run["root"] / "onnx", device="cpu")
    texts = [" ".join(tokens) for tokens in crf_run["test"]["tokens"]]
    texts = [t for t in texts if len(tokenizer(t)["input_ids"]) <= 64]  # one window
    assert len(texts) >= 12
    found = 0
    for text, result in zip(texts, runtime.predict(texts), strict=True):
        got = [(e.type, e.start, e.end) for e in result.entities]
        assert got == _torch_entities(model, tokenizer, text), text
        found += len(got)
    assert found >= 10
    assert crf_run["export"]["parity"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("crf", [False, True])
def test_finetune_records_the_decoding_and_the_crf_survives_every_stage(
    tmp_path: Path, tiny_model_dir: Path, crf: bool
) -> None:
    import bertrt
    from pipeline.core import params
    from pipeline.stages import evaluate_model, export_onnx, finetune, tokenize_data, validate

    rows = synthetic_sentences(96, seed=21)
    raw = write_splits(
        tmp_path / "raw", {"train": rows[:64], "validation": rows[64:80], "test": rows[80:]}
    )
    params_path = write_params(
        tmp_path,
        {
            **NER,
            "token-classification.crf": crf,
            "base.model": str(tiny_model_dir),
            "finetune.epochs": 2,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 3e-3,
            "finetune.warmup_steps": 0,
            "finetune.logging_steps": 1,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment": "crf-stages",
        },
    )
    p = params.load(params_path)
    validated, tokenized, model = tmp_path / "validated", tmp_path / "tokenized", tmp_path / "ft"
    validate.run(raw, p, validated, tmp_path / "v.json", tmp_path / "f.json")
    tokenize_data.run(validated, p, tokenized, tmp_path / "t.json")
    summary = finetune.run(
        tokenized, validated, p, model, tmp_path / "ck", tmp_path / "train.json", tmp_path / "c"
    )
    assert summary["best_validation_f1"] is not None
    config = json.loads((model / "config.json").read_text())
    assert (config["decoding"], config["crf"]) == ("viterbi", crf)
    assert (model / TRANSITIONS_FILE).is_file() == crf
    if crf:  # the file is the best checkpoint's CRF, as the weights hold it
        from safetensors.numpy import load_file

        weights = load_file(model / "model.safetensors")
        saved = json.loads((model / TRANSITIONS_FILE).read_text())
        assert np.allclose(saved["transitions"], weights["crf.transitions"])
        assert np.abs(weights["crf.transitions"]).sum() > 0
    metrics = evaluate_model.run(
        model, tokenized, validated / "test.parquet", p, tmp_path / "eval.json", tmp_path / "pl"
    )
    shipped = "crf" if crf else "viterbi"
    assert metrics["decoding"][shipped]["shipped"] == 1
    export_onnx.run(
        model,
        validated / "test.parquet",
        tmp_path / "eval.json",
        p,
        tmp_path / "onnx",
        tmp_path / "e.json",
    )
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["decoding"] == shipped
    assert (TRANSITIONS_FILE in manifest["files"]) == crf
    runtime = bertrt.load(tmp_path / "onnx", device="cpu")
    (result,) = runtime.predict(["alice went to new york"])
    assert isinstance(result.entities, list)
