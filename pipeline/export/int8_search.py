"""The int8 node search: the nodes whose quantisation moves the outputs most stay fp32 until
the label agreement with fp32 on calibration texts reaches its target."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrt.contract import INT8_VARIANT, VARIANTS
from bertrt.engine import Engine
from bertrt.session import run
from pipeline.export import graphs, sessions

log = logging.getLogger(__name__)


# Texts (their windows), fp32 outputs and valid positions the int8 search measures against.
Calibration = tuple[list[Any], np.ndarray, np.ndarray]


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """`size` of the row numbers 0..n-1, a seeded choice in ascending order (all when size is
    0 or at least n)."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def fewest(reaches: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """The first k from `start` up to `limit` for which `reaches(k)`, or `limit` when none does.
    From a `start` above 1 that already reaches (another search's answer), the walk goes down
    instead, to the last k that still reaches. Each k is asked once, one at a time: the
    agreement moves by a text or two from one k to the next, up or down, so a k cannot be
    skipped on the strength of its neighbours."""
    first = min(max(start, 1), limit)
    if first > 1 and reaches(first):
        k = first
        while k > 1 and reaches(k - 1):
            k -= 1
        return k
    for k in range(first if first == 1 else first + 1, limit + 1):
        if reaches(k):
            return k
    return limit


def search_int8(
    engine: Engine,
    optimized: Path,
    calibration: Calibration,
    target: float,
    batch_size: int,
    variant: str = INT8_VARIANT,
    shift: dict[str, float] | None = None,
    sensitivity_rows: int = 0,
    seed: int = 0,
    guess: int | None = None,
) -> dict[str, Any]:
    """Quantise everything into `variant`'s file; where label agreement with fp32 on the
    calibration texts is below `target`, keep in fp32 the fewest of the nodes whose int8 alone
    moves the outputs most that reach it, up to half of them. Returns what was measured, for
    the manifest; the file holds the graph it describes.

    Args:
        engine: open on the model folder, whose tokenizer and batching the measures use.
        shift: each node's figure from another int8 variant's search, instead of measuring
            them again (each node's int8 alone, one graph per node).
        sensitivity_rows: the node figures are measured on a seeded sample (`seed`) of this
            many calibration windows (0: all of them); the agreement always on all of them.
        guess: how many nodes another variant's search kept, where the walk starts.
    """
    started = time.perf_counter()
    dst = engine.folder / VARIANTS[variant].file
    weights = VARIANTS[variant].weights or "int8"
    encodings, reference, mask = calibration
    nodes = graphs.quantizable(optimized)
    positions = int(mask.sum()) if reference.ndim == 3 else len(reference)
    # The batches `engine.infer` runs these windows in (dynamic int8 scales each batch by its
    # own range: the same batches give the same outputs), closest calls first.
    margin = margins(reference, mask)
    batches = sorted(engine.batches(encodings, batch_size), key=lambda idx: margin[idx].min())
    written: list[str] = []  # the nodes kept in fp32 in the graph now in `dst`

    def graph(keep: Sequence[str]) -> Engine:
        written[:] = keep
        graphs.to_int8(optimized, dst, written, weights)
        return sessions.engine_on(engine, dst, variant)

    def shift_of(keep: Sequence[str], rows: np.ndarray) -> float:
        got, want = _valid(graph(keep), encodings, reference, mask, rows, batch_size)
        return float(np.abs(got - want).mean())

    def agreement(keep: Sequence[str], early: bool = False) -> float:
        """Over every window, closest calls first; `early`: stops as soon as the disagreements
        found put the target out of reach (the windows left cannot take them back), giving
        the most those windows could leave (below the target)."""
        int8, wrong = graph(keep), 0
        for idx in batches:
            feeds = int8.feeds([encodings[i] for i in idx])
            got = run(int8.session, feeds, int8.output_name, int8.provider)
            want, valid = reference[idx], mask[idx]
            if got.ndim == 3:
                valid = valid[:, : got.shape[1]]
                got, want = got[valid], want[:, : got.shape[1]][valid]
            wrong += int((got.argmax(-1) != want.argmax(-1)).sum())
            if early and (positions - wrong) / positions < target:
                break
        return (positions - wrong) / positions

    everything = agreement([])
    result: dict[str, Any] = {"target": target, "all_int8_agreement": everything, "kept_fp32": []}
    if everything >= target:
        result["agreement"] = everything
        _log(variant, result, len(nodes), len(encodings), started)
        return result
    if shift is None:
        sample = sample_rows(len(encodings), sensitivity_rows, seed)
        shift = {n: shift_of([m for m in nodes if m != n], sample) for n in nodes}
        result["mean_abs_logit_shift"] = {n: round(v, 6) for n, v in shift.items()}
        result["sensitivity_rows"] = len(sample)
    else:  # the same nodes, ranked by another variant's figures
        result["shift_measured_on"] = INT8_VARIANT
        shift = {node: shift.get(node, 0.0) for node in nodes}
    ranked = sorted(nodes, key=shift.__getitem__, reverse=True)
    limit = len(nodes) // 2
    measured: dict[int, float] = {0: everything}

    def reaches(k: int) -> bool:
        # Below the limit, a k that cannot reach the target needs no exact figure.
        found = agreement(ranked[:k], early=k < limit)
        if found >= target or k == limit:  # every window ran
            measured[k] = found
        return found >= target

    kept = fewest(reaches, limit, guess or 1) if limit else 0
    if written != ranked[:kept]:  # the last graph measured was another
        graphs.to_int8(optimized, dst, ranked[:kept], weights)
    result.update(kept_fp32=ranked[:kept], agreement=measured[kept])
    _log(variant, result, len(nodes), len(encodings), started)
    return result


def margins(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per window, fp32's margin between its two best labels (per-token outputs: the window's
    smallest where valid): int8 can flip a label only where it is small."""
    if reference.shape[-1] < 2:
        return np.full(len(reference), np.inf)
    top = np.partition(reference, -2, axis=-1)
    margin = top[..., -1] - top[..., -2]
    return np.where(mask, margin, np.inf).min(axis=1) if margin.ndim == 2 else margin


def _valid(
    graph: Engine,
    encodings: list[Any],
    reference: np.ndarray,
    mask: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`graph`'s outputs on the windows `rows` and the reference's, where valid."""
    outputs, _ = graph.infer([encodings[i] for i in rows], batch_size)
    want, valid = reference[rows], mask[rows]
    if outputs.ndim == 3:  # these windows' width: their longest
        valid = valid[:, : outputs.shape[1]]
        return outputs[valid], want[:, : outputs.shape[1]][valid]
    return outputs, want


def _log(variant: str, result: dict[str, Any], nodes: int, windows: int, started: float) -> None:
    reached = result["agreement"] >= result["target"]
    (log.info if reached else log.warning)(
        "int8 search %s: %d of %d nodes kept in fp32, agreement %.4f %s %s on %d calibration "
        "windows (all int8: %.4f), %.0f s",
        variant,
        len(result["kept_fp32"]),
        nodes,
        result["agreement"],
        ">=" if reached else "<",
        result["target"],
        windows,
        result["all_int8_agreement"],
        time.perf_counter() - started,
    )
