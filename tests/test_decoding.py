"""The one decoder of tag scores (bertrt.decoding): IOB2's allowed steps, Viterbi against
enumeration, the CRF transitions file, and the manifest's `decoding`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from bertrt.decoding import (
    ARGMAX,
    CRF,
    VITERBI,
    Decoder,
    Transitions,
    invalid_steps,
    iob2_allowed,
    viterbi,
)
from bertrt.manifest import IntegrityError, Manifest, VariantEntry

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def test_iob2_allows_an_inside_tag_only_after_its_own_type() -> None:
    start, step = iob2_allowed(list(LABELS))
    assert start.tolist() == [True, True, False, True, False]
    # Rows: from O, B-PER, I-PER, B-LOC, I-LOC; columns: to the same.
    assert step.astype(int).tolist() == [
        [1, 1, 0, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 1, 1],
        [1, 1, 0, 1, 1],
    ]


@pytest.mark.parametrize(
    ("tags", "invalid"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], 0),
        ([], 0),
        (["I-PER"], 1),  # no I- at the start
        (["O", "I-LOC"], 1),  # none after O
        (["B-PER", "I-LOC"], 1),  # none after another type
        (["B-LOC", "I-LOC", "I-PER", "O", "I-PER"], 2),
        (["X", "I-X"], 1),  # a label outside IOB2 counts as O
    ],
)
def test_invalid_steps_counts_what_iob2_forbids(tags: list[str], invalid: int) -> None:
    assert invalid_steps(tags) == invalid


def _brute_force(emissions, transitions, start, end) -> tuple[float, tuple[int, ...]]:
    best = (-np.inf, ())
    for path in itertools.product(range(emissions.shape[1]), repeat=len(emissions)):
        score = start[path[0]] + end[path[-1]] + emissions[np.arange(len(path)), path].sum()
        score += sum(transitions[a, b] for a, b in itertools.pairwise(path))
        best = max(best, (float(score), path))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_viterbi_finds_the_best_sequence_that_enumeration_finds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n = 4, 1 + seed % 4
    emissions, transitions = rng.normal(size=(n, k)), rng.normal(size=(k, k))
    start, end = rng.normal(size=k), rng.normal(size=k)
    transitions[rng.random((k, k)) < 0.3] = -np.inf  # forbidden steps
    transitions[:, 0] = 0.0  # ... with one tag always reachable
    score, path = _brute_force(emissions, transitions, start, end)
    got = viterbi(emissions, transitions, start, end)
    assert tuple(got.tolist()) == path
    assert np.isfinite(score)


def test_viterbi_repairs_an_entity_argmax_opens_with_i() -> None:
    # Argmax says O I-PER I-PER ("佐刘备" read as an entity without its start).
    log_probs = np.log(
        [
            [0.90, 0.04, 0.02, 0.02, 0.02],
            [0.10, 0.35, 0.45, 0.05, 0.05],
            [0.10, 0.10, 0.70, 0.05, 0.05],
        ]
    )
    decoder = Decoder(LABELS, ARGMAX)
    assert [LABELS[i] for i in decoder.decode(log_probs)] == ["O", "I-PER", "I-PER"]
    fixed = decoder.using(VITERBI).decode(log_probs)
    assert [LABELS[i] for i in fixed] == ["O", "B-PER", "I-PER"]


def test_viterbi_never_breaks_iob2_and_keeps_argmax_where_it_is_valid() -> None:
    rng = np.random.default_rng(0)
    decoder = Decoder(LABELS, VITERBI)
    changed = 0
    for _ in range(300):
        log_probs = np.log(rng.dirichlet(np.ones(len(LABELS)) * 0.3, size=rng.integers(1, 9)))
        tags = [LABELS[i] for i in decoder.decode(log_probs)]
        argmax = [LABELS[i] for i in log_probs.argmax(-1)]
        assert invalid_steps(tags) == 0
        if invalid_steps(argmax) == 0:
            assert tags == argmax
        changed += tags != argmax
    assert changed > 30  # the random scores did break IOB2 often


def test_crf_decoding_adds_the_learned_transitions() -> None:
    k = len(LABELS)
    transitions = np.zeros((k, k))
    transitions[1, 3] = 5.0  # B-PER then B-LOC, strongly
    crf = Transitions(LABELS, transitions, np.zeros(k), np.zeros(k))
    log_probs = np.log(np.full((2, k), 0.2))
    log_probs[0, 1] += 0.1  # B-PER first
    decoder = Decoder(LABELS, CRF, crf)
    assert decoder.modes() == (ARGMAX, VITERBI, CRF)
    assert [LABELS[i] for i in decoder.decode(log_probs)] == ["B-PER", "B-LOC"]
    assert [LABELS[i] for i in decoder.using(VITERBI).decode(log_probs)] == ["B-PER", "O"]
    # A constant added to one position's scores changes nothing (log-softmax of emissions).
    shifted = log_probs + np.array([[3.0], [-7.0]])
    assert decoder.decode(shifted).tolist() == decoder.decode(log_probs).tolist()
    assert decoder.decode(np.zeros((0, k))).tolist() == []


def test_transitions_file_round_trips_and_refuses_bad_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k = len(LABELS)
    table = Transitions(LABELS, rng.normal(size=(k, k)), rng.normal(size=k), rng.normal(size=k))
    table.write(tmp_path / "t.json")
    back = Transitions.read(tmp_path / "t.json")
    assert back.labels == LABELS
    for name in ("transitions", "start", "end"):
        assert np.array_equal(getattr(back, name), getattr(table, name))
    data = table.as_dict()
    cases = [
        ({**data, "start": data["start"][:-1]}, r"start \(5,\)"),
        ({k: v for k, v in data.items() if k != "end"}, "needs exactly the keys"),
        ({**data, "end": ["a"] * k}, "must be numbers"),
        ({**data, "end": [float("inf")] * k}, "must be finite"),
    ]
    for bad, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            Transitions.read(tmp_path / "bad.json")


def test_decoder_refuses_what_it_cannot_decode() -> None:
    with pytest.raises(ValueError, match="decoding 'beam' is not one of"):
        Decoder(LABELS, "beam")
    with pytest.raises(ValueError, match="needs the CRF's transitions"):
        Decoder(LABELS, CRF)
    k = 3
    other = Transitions(("O", "B-X", "I-X"), np.zeros((k, k)), np.zeros(k), np.zeros(k))
    with pytest.raises(ValueError, match="transitions are over labels"):
        Decoder(LABELS, CRF, other)


def _manifest(**changes: object) -> Manifest:
    values = {
        "task": "token-classification",
        "labels": list(LABELS),
        "max_length": 16,
        "pad_token_id": 0,
        "inputs": ["input_ids"],
        "outputs": ["logits"],
        "opset": 17,
        "variants": {"fp32": VariantEntry.of("fp32")},
        **changes,
    }
    return Manifest(**values)


def test_manifest_checks_decoding_and_its_digest_covers_it() -> None:
    assert _manifest().decoding == ARGMAX
    assert _manifest(decoding=VITERBI).problems() == []
    assert _manifest(decoding="beam").problems() == [
        "decoding 'beam' is not one of ['argmax', 'viterbi', 'crf']"
    ]
    assert _manifest(decoding=CRF).problems() == [
        "decoding 'crf' needs transitions.json listed in files"
    ]
    entry = {"sha256": "0" * 64, "bytes": 2}
    assert _manifest(decoding=CRF, files={"transitions.json": entry}).problems() == []
    viterbi_manifest = _manifest(decoding=VITERBI)
    data = viterbi_manifest.to_dict()
    data["settings_sha256"] = viterbi_manifest.settings_digest()
    Manifest.from_dict(data)
    data["decoding"] = ARGMAX  # a hand edit of what the runtime acts on
    with pytest.raises(IntegrityError, match="do not match their digest"):
        Manifest.from_dict(data)
