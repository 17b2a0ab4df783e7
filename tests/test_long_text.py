"""How a classifier reads a text longer than its limit: window cuts and logit aggregation on
hand-made token ids ([CLS]=101, [SEP]=102, content 1..n)."""

from __future__ import annotations

import numpy as np
import pytest

from bertrt import long_text
from bertrt.long_text import Reading, aggregate, split

CLS, SEP = 101, 102


def text(n: int) -> tuple[list[int], list[int]]:
    """A text of n content tokens, framed as a BERT tokenizer frames it."""
    return [CLS, *range(1, n + 1), SEP], [1] + [0] * n + [1]


@pytest.mark.parametrize("strategy", long_text.STRATEGIES)
def test_a_text_of_exactly_the_limit_is_one_whole_window(strategy: str) -> None:
    ids, special = text(8)  # 8 content + 2 special = max_length 10
    assert split(ids, special, 10, Reading(strategy, stride=2)) == [ids]


@pytest.mark.parametrize("strategy", long_text.STRATEGIES)
def test_an_empty_text_is_its_special_tokens(strategy: str) -> None:
    assert split([CLS, SEP], [1, 1], 10, Reading(strategy, stride=2)) == [[CLS, SEP]]


def test_truncate_keeps_the_first_tokens_and_the_frame() -> None:
    ids, special = text(20)
    assert split(ids, special, 10, Reading("truncate")) == [[CLS, *range(1, 9), SEP]]


def test_head_and_tail_take_their_shares_of_the_room() -> None:
    ids, special = text(20)
    (window,) = split(ids, special, 10, Reading("head+tail", head_fraction=0.25))
    assert window == [CLS, 1, 2, *range(15, 21), SEP]  # room 8: 2 from the head, 6 tail
    (tail_only,) = split(ids, special, 10, Reading("head+tail", head_fraction=0.0))
    assert tail_only == [CLS, *range(13, 21), SEP]


def test_windows_share_the_stride_and_end_at_the_last_token() -> None:
    ids, special = text(20)  # room 8, stride 2: starts at 0, 6, 12 (12 + 8 = 20: the end)
    windows = split(ids, special, 10, Reading("windows", stride=2))
    assert windows == [
        [CLS, *range(1, 9), SEP],
        [CLS, *range(7, 15), SEP],
        [CLS, *range(13, 21), SEP],
    ]
    # One token more than the room: a second window, repeating the stride's tokens.
    ids, special = text(9)
    assert split(ids, special, 10, Reading("windows", stride=2)) == [
        [CLS, *range(1, 9), SEP],
        [CLS, 7, 8, 9, SEP],
    ]
    # No stride: windows side by side, every token read once.
    ids, special = text(16)
    flat = [t for w in split(ids, special, 10, Reading("windows")) for t in w[1:-1]]
    assert flat == list(range(1, 17))


def test_windows_cover_every_token_for_many_lengths() -> None:
    for n in range(0, 60):
        ids, special = text(n)
        windows = split(ids, special, 12, Reading("windows", stride=3))
        seen = {t for w in windows for t in w[1:-1]}
        assert seen == set(range(1, n + 1))
        assert all(len(w) <= 12 and w[0] == CLS and w[-1] == SEP for w in windows)
        assert len(windows) == max(1, -(-(n - 3) // 7)) if n > 10 else len(windows) == 1


def test_roberta_frames_and_stride_that_leaves_no_room_are_handled() -> None:
    ids, special = [0, 5, 6, 7, 8, 9, 2], [1, 0, 0, 0, 0, 0, 1]
    assert split(ids, special, 4, Reading("windows", stride=1)) == [
        [0, 5, 6, 2],
        [0, 6, 7, 2],
        [0, 7, 8, 2],
        [0, 8, 9, 2],
    ]
    with pytest.raises(ValueError, match="no room to move"):
        split(ids, special, 4, Reading("windows", stride=2))


def test_aggregate_by_mean_and_max_per_text() -> None:
    outputs = np.array([[1.0, 0.0], [3.0, 4.0], [5.0, -2.0], [0.5, 0.5]])
    assert aggregate(outputs, [1, 2, 1], "mean").tolist() == [[1, 0], [4, 1], [0.5, 0.5]]
    assert aggregate(outputs, [1, 2, 1], "max").tolist() == [[1, 0], [5, 4], [0.5, 0.5]]
    assert aggregate(outputs, [1, 1, 1, 1], "max").tolist() == outputs.tolist()
    with pytest.raises(ValueError, match="add up to 3"):
        aggregate(outputs, [1, 2], "mean")
    with pytest.raises(ValueError, match="not one of"):
        aggregate(outputs, [2, 2], "median")


def test_readings_name_their_problems() -> None:
    assert Reading("windows", stride=6).problems(10) == [
        "stride 6 must be in [0, 5] (max_length / 2)"
    ]
    assert "strategy 'middle'" in Reading("middle").problems(10)[0]
    assert Reading.from_dict({}) == Reading()
    assert Reading.from_dict(Reading("windows", 4).as_dict()) == Reading("windows", 4)


@pytest.mark.parametrize(
    ("strategy", "how"),
    [("truncate", "mean"), ("head+tail", "mean"), ("windows", "mean"), ("windows", "max")],
)
def test_pytorch_evaluation_and_the_runtime_read_long_texts_alike(
    tmp_path, tiny_model_dir, strategy: str, how: str
) -> None:
    import pandas as pd
    from datasets import Dataset
    from transformers import AutoTokenizer

    import bertrt
    from pipeline.core import params
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions
    from pipeline.tasks.text_classification.task import TextClassification, per_text
    from tests.conftest import synthetic_reviews, write_params

    reviews = synthetic_reviews(60, seed=3)
    # Pseudo-reviews of 1 to 6 snippets: from under the limit to several windows long.
    texts = [" . ".join(r["text"] for r in reviews[i : i + 1 + i % 6]) for i in range(0, 60, 3)]
    test = pd.DataFrame(
        {"text": texts, "label": [reviews[i]["category"] for i in range(0, 60, 3)]}
    )
    overrides = {
        "base.max_length": 16,
        "text-classification.strategy": strategy,
        "text-classification.aggregate": how,
    }
    p = params.load(write_params(tmp_path, {**overrides, "text-classification.stride": 4}))
    task = TextClassification()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    labels = ["fresh", "rotten"]
    data, stats = task.tokenize(Dataset.from_pandas(test), tokenizer, labels, p, "f" * 16, "test")
    assert stats["truncation_rate"] >= 0.5 and stats["long_text"] == strategy
    assert (stats["windows"] > len(texts)) == (strategy == "windows")
    assert all(len(ids) <= 16 for ids in data["input_ids"])
    torch_logits, truth = per_text(task.predict(tiny_model_dir, data, test, p), data, how)
    assert truth.tolist() == [labels.index(x) for x in test["label"]]

    out = tmp_path / "onnx"
    options = ExportOptions(16, long_text=task.reading(p), temperature=2.0)
    model_folder.build(tiny_model_dir, out, task, texts, options)
    model = bertrt.load(out, device="cpu", variant="fp32")
    assert model.metadata()["long_text"]["strategy"] == strategy
    runtime_logits = model.logits(texts, batch_size=4)
    np.testing.assert_allclose(runtime_logits, torch_logits, atol=1e-4)
    scores = [x.score for x in model.predict(texts)]
    calibrated = np.exp(torch_logits / 2.0) / np.exp(torch_logits / 2.0).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores, calibrated.max(-1), atol=1e-4)
