"""Dynamic batching: concurrent requests share runs of the real tiny model, with a bounded
queue and a deadline; each caller gets exactly its own results."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import synthetic_reviews

import bertrt
from bertrt.batcher import Batcher, DeadlineExceeded, Overloaded


@pytest.fixture(scope="module")
def model(onnx_model_dir: Path) -> bertrt.TextClassifier:
    return bertrt.load(onnx_model_dir, device="cpu")


class Recorded:
    """The model's predict, recording each run's size (and slowed down when asked)."""

    def __init__(self, model: bertrt.TextClassifier, delay: float = 0.0) -> None:
        self.model, self.delay, self.sizes = model, delay, []

    def __call__(self, texts: list[str], **options: object) -> list:
        self.sizes.append(len(texts))
        time.sleep(self.delay)
        return self.model.predict(texts, **options)


async def gather(batcher: Batcher, requests: list[list[str]], **options: object) -> list:
    await batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.submit(texts, **options) for texts in requests), return_exceptions=True
        )
    finally:
        await batcher.stop()


def test_concurrent_single_texts_share_runs_and_get_their_own_answers(model) -> None:
    texts = [r["text"] for r in synthetic_reviews(40, seed=11)]
    run = Recorded(model)
    got = asyncio.run(gather(Batcher(run, max_texts=16, max_wait_ms=50), [[t] for t in texts]))
    assert len(run.sizes) < len(texts) and max(run.sizes) <= 16 and sum(run.sizes) == 40
    want = model.predict(texts)
    assert [g[0].label for g in got] == [w.label for w in want]
    assert [g[0].score for g in got] == pytest.approx([w.score for w in want], abs=1e-5)


def test_requests_with_other_options_are_not_mixed(model) -> None:
    run = Recorded(model)
    batcher = Batcher(run, max_texts=64, max_wait_ms=50)

    async def both() -> list:
        await batcher.start()
        try:
            return await asyncio.gather(
                batcher.submit(["good film"], top_k=2), batcher.submit(["bad film"])
            )
        finally:
            await batcher.stop()

    with_top_k, plain = asyncio.run(both())
    assert with_top_k[0].top_k is not None and plain[0].top_k is None
    assert sorted(run.sizes) == [1, 1]


def test_a_full_queue_refuses_with_a_retry_time(model) -> None:
    run = Recorded(model, delay=0.3)
    got = asyncio.run(
        gather(Batcher(run, max_texts=2, max_wait_ms=0, max_queue=4), [["a b"] * 2] * 6)
    )
    refused = [g for g in got if isinstance(g, Overloaded)]
    assert refused and all(r.retry_after >= 1 for r in refused)
    assert "limit 4" in str(refused[0])
    assert sum(isinstance(g, list) for g in got) >= 2


def test_a_request_past_its_deadline_is_dropped_not_run(model) -> None:
    run = Recorded(model, delay=0.5)
    got = asyncio.run(
        gather(Batcher(run, max_texts=1, max_wait_ms=0, deadline_s=0.3), [["a"], ["b"], ["c"]])
    )
    assert all(isinstance(g, DeadlineExceeded) for g in got)
    assert "0.3 s deadline" in str(got[0])
    assert sum(run.sizes) < 3  # the ones still queued at the deadline never ran


def test_a_malformed_text_fails_only_its_own_request(model) -> None:
    run = Recorded(model)
    got = asyncio.run(
        gather(Batcher(run, max_texts=8, max_wait_ms=50), [["good"], ["bad \ud800"], ["fine"]])
    )
    assert isinstance(got[1], ValueError) and "cannot be tokenised" in str(got[1])
    assert [g[0].label for g in (got[0], got[2])] == [
        p.label for p in model.predict(["good", "fine"])
    ]


def test_limits_must_be_positive(model) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Batcher(model.predict, max_texts=0)


@pytest.mark.parametrize("slow_runs", [0, 1, 3])
def test_retry_after_follows_the_recent_drain_rate_not_one_slow_run(slow_runs: int) -> None:
    """2,048 texts waiting, runs of 64 texts in 0.05 s (about 1.6 s to drain), a few of them a
    single long text that took 600 s: Retry-After stays at the drain time."""
    batcher = Batcher(lambda texts: texts, max_texts=64, max_queue=2048, deadline_s=30)
    batcher.waiting_texts = 2048
    for _ in range(32 - slow_runs):
        batcher.recent.append((64, 0.05))
    for _ in range(slow_runs):
        batcher.recent.append((1, 600.0))
    assert batcher.retry_after() == 2  # ceil(2048 / 1280)


def test_retry_after_is_bounded_by_the_deadline_and_one_second() -> None:
    batcher = Batcher(lambda texts: texts, deadline_s=10)
    assert batcher.retry_after() == 1  # nothing measured yet
    batcher.waiting_texts = 2048
    batcher.recent.extend([(1, 5.0)] * 4)  # 0.2 texts/s: 10,240 s to drain
    assert batcher.retry_after() == 10
    batcher.waiting_texts = 1
    batcher.recent.extend([(64, 0.001)] * 32)
    assert batcher.retry_after() == 1
