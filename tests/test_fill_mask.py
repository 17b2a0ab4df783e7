"""The fill-mask predictor through the Python API, the CLI and the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bertrt
from bertrt.cli import main
from bertrt.predictors.fill_mask import FillMask, join_cjk, log_softmax, runs


@pytest.fixture(scope="module")
def model(fill_dir: Path) -> FillMask:
    return bertrt.load(fill_dir, device="cpu")


def scores_at(model: FillMask, ids: list[int], position: int) -> np.ndarray:
    """Log-probabilities at `position` of one input, straight from the ONNX session."""
    arr = np.asarray([ids], dtype=np.int64)
    feeds = {"input_ids": arr, "attention_mask": np.ones_like(arr), "token_type_ids": 0 * arr}
    feeds = {k: v for k, v in feeds.items() if k in model.engine.input_names}
    return log_softmax(model.engine.session.run(None, feeds)[0][0, position])


def test_one_mask_gives_the_top_k_tokens_with_probabilities(model: FillMask) -> None:
    (result,) = model.predict(["the film was [MASK]"], top_k=3)
    enc = model.engine.encode(["the film was [MASK]"])[0][0]
    expected = scores_at(model, enc.ids, enc.ids.index(model.mask_id))
    best = np.argsort(-expected)[:3]
    assert [c.score for c in result.masks[0]] == pytest.approx(np.exp(expected[best]).tolist())
    assert [c.token for c in result.masks[0]] == [
        model.engine.tokenizer.id_to_token(int(i)) for i in best
    ]
    (fill,) = result.fills
    assert fill.masks == 1 and fill.candidates == result.masks[0]
    assert result.sequence == f"the film was {result.masks[0][0].token}"
    assert "the film was [MASK]"[fill.start : fill.end] == "[MASK]"


def test_greedy_fills_consecutive_masks_left_to_right(model: FillMask) -> None:
    text = "the [MASK] [MASK] was good"
    (result,) = model.predict([text], strategy="greedy")
    enc = model.engine.encode([text])[0][0]
    ids = list(enc.ids)
    first, second = [i for i, t in enumerate(ids) if t == model.mask_id]
    a = scores_at(model, ids, first)
    ids[first] = int(a.argmax())
    b = scores_at(model, ids, second)
    (fill,) = result.fills
    assert fill.masks == 2 and len(fill.candidates) == 1
    assert fill.candidates[0].score == pytest.approx(float(np.exp(a.max() + b.max())))
    words = [model.engine.tokenizer.id_to_token(i) for i in (int(a.argmax()), int(b.argmax()))]
    assert fill.candidates[0].token == " ".join(words).replace(" ##", "")
    assert text[fill.start : fill.end] == "[MASK] [MASK]"
    assert len(result.masks) == 2  # each mask's own top tokens from the first pass


def test_beam_search_is_never_worse_than_greedy_and_ranks_its_fills(model: FillMask) -> None:
    texts = ["the [MASK] [MASK] [MASK] was good", "a [MASK] [MASK] plot and a [MASK] cast"]
    greedy = model.predict(texts, strategy="greedy")
    beam = model.predict(texts, strategy="beam", beam_size=6, top_k=4)
    for g, b in zip(greedy, beam, strict=True):
        assert [f.masks for f in b.fills] == [f.masks for f in g.fills]
        for gf, bf in zip(g.fills, b.fills, strict=True):
            scores = [c.score for c in bf.candidates]
            assert scores == sorted(scores, reverse=True)
            assert scores[0] >= gf.candidates[0].score * (1 - 1e-9)
    assert [f.masks for f in beam[1].fills] == [2, 1]
    same = model.predict(texts, strategy="beam", beam_size=1)
    assert [r.as_dict() for r in same] == [r.as_dict() for r in greedy]


def test_evaluation_fills_probes_as_the_runtime_does(model: FillMask, fill_dir: Path) -> None:
    """The evaluate stage's probe fills (PyTorch) are the runtime's fills (ONNX) for each
    strategy, runs of masks and single masks alike, so the probe accuracy it reports is the one
    a user of the runtime gets."""
    import pandas as pd
    from transformers import AutoTokenizer, BertForMaskedLM

    from pipeline.tasks.masked_lm.scoring import probe_fills

    texts = [
        "the [MASK] [MASK] [MASK] was good",
        "a [MASK] [MASK] plot and a [MASK] cast",
        "[MASK] film",
    ]
    torch_model = BertForMaskedLM.from_pretrained(fill_dir.parent / "ft")
    tokenizer = AutoTokenizer.from_pretrained(fill_dir.parent / "ft")
    probes = pd.DataFrame({"text": texts, "answer": ["x y z", "x y z", "x"]})
    fills = probe_fills(torch_model, tokenizer, probes)
    for strategy, key in (("independent", "fill"), ("greedy", "greedy"), ("beam", "beam")):
        served = model.predict(texts, strategy=strategy)
        for mine, theirs in zip(fills, served, strict=True):
            assert mine[key] == " ".join(f.candidates[0].token for f in theirs.fills)


def test_bad_requests_are_value_errors(model: FillMask) -> None:
    with pytest.raises(ValueError, match=r"text 1 has no \[MASK\]; put one \[MASK\]"):
        model.predict(["the [MASK]", "no mask here"])
    with pytest.raises(ValueError, match="strategy must be one of"):
        model.predict(["the [MASK]"], strategy="sample")
    with pytest.raises(ValueError, match="beam_size must be between"):
        model.predict(["the [MASK]"], beam_size=0)
    with pytest.raises(ValueError, match="within the first max_length tokens"):
        model.predict(["good " * 40 + "[MASK]"])
    assert model.predict([]) == []


def test_helpers() -> None:
    assert runs([3, 4, 5, 9, 11, 12]) == [[3, 4, 5], [9], [11, 12]]
    assert join_cjk("诸 葛 涛 and 诸 葛") == "诸葛涛 and 诸葛"
    assert join_cjk(" 诸   葛   涛 ") == "诸葛涛"


def test_cli_prints_fills_and_refuses_other_tasks_options(
    fill_dir: Path, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "--model", str(fill_dir), "--top-k", "2", "--strategy", "greedy"]
    assert main([*argv, "the [MASK] [MASK] was good", "a [MASK] plot"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["fills"]) for r in lines] == [1, 1]
    assert [len(m) for m in lines[1]["masks"]] == [2]
    assert main(["predict", "--model", str(fill_dir), "--aggregation", "max", "[MASK]"]) == 1
    assert "--aggregation does not apply to this fill-mask model" in capsys.readouterr().err
    assert main(["predict", "--model", str(onnx_model_dir), "--strategy", "beam", "good"]) == 1
    assert "--strategy does not apply to this text-classification model" in (
        capsys.readouterr().err
    )
    assert main(["predict", "--model", str(fill_dir), "no mask"]) == 1
    assert "text 0 has no [MASK]" in capsys.readouterr().err


def test_server_fills_and_documents_its_schema(fill_dir: Path, model: FillMask) -> None:
    from fastapi.testclient import TestClient

    from bertrt.server import create_app

    app = create_app(model)
    with TestClient(app) as client:
        body = {"texts": ["the [MASK] [MASK] was good"], "top_k": 3, "beam_size": 3}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        expected = model.predict(body["texts"], top_k=3, beam_size=3)[0].as_dict()
        assert prediction["sequence"] == expected["sequence"]
        assert len(prediction["fills"][0]["candidates"]) == 3
        assert client.post("/predict", json=["no mask"]).status_code == 422
        bad = client.post("/predict", json={"texts": ["[MASK]"], "strategy": "sample"})
        assert bad.status_code == 422
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"FillRequest", "FillResponse", "FillOut"} <= set(schema)


def test_independent_fills_rank_products_of_one_pass(model: FillMask) -> None:
    text = "the [MASK] [MASK] was good"
    (result,) = model.predict([text], strategy="independent", beam_size=8, top_k=3)
    enc = model.engine.encode([text])[0][0]
    ids = list(enc.ids)
    first, second = [i for i, t in enumerate(ids) if t == model.mask_id]
    a, b = scores_at(model, ids, first), scores_at(model, ids, second)
    joint = np.add.outer(a, b)
    best = np.sort(joint.ravel())[::-1][:3]
    (fill,) = result.fills
    assert [c.score for c in fill.candidates] == pytest.approx(np.exp(best).tolist())
