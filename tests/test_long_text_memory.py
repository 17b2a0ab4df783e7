"""Long texts cost what their reading keeps: truncation and head+tail tokenize a text's ends only,
with the same tokens as the whole text; windows are capped by max_windows (TextTooLong: 413 from
the server, a named line from the command line); a 10 MB JSONL line stays within a bounded
resident memory."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

import bertrt
import bertrt.manifest as manifest_io
from bertrt import long_text
from bertrt.cli import main
from bertrt.long_text import Reading, TextTooLong, read_ends, read_head, split

# Pieces that make cuts hard: multi-byte and CJK characters, combining marks, emoji with
# modifiers, whitespace runs, contractions that a byte-level pattern splits by what follows, a
# word over WordPiece's 100 characters, and the special tokens written out.
PIECES = [
    *["we're", "don't", "it'll", "great", "film", "café", "ß", "İ", ",", "."],
    *[" ", "  ", "\n", "\t", " \u3000 ", "\u200b"],
    *["好", "的", "電影", "映画です", "é", "e\u0301", "ü", "😀", "👍🏽"],
    *["x" * 120, "[SEP]", "<s>"],
]


def byte_level_bpe() -> Tokenizer:
    """A RoBERTa-style tokenizer: NFC, byte-level pre-tokenizer and BPE, <s> ... </s>."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["we're great, don't you think? it'll be fine", "a quiet film 好的电影 café"] * 50
    tok.train_from_iterator(corpus, trainer)
    ends = (("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    tok.post_processor = processors.RobertaProcessing(*ends)
    return tok


@pytest.fixture(scope="module")
def tokenizers(onnx_model_dir: Path) -> dict[str, Tokenizer]:
    """The tiny model's WordPiece tokenizer and a byte-level BPE one, neither truncating."""
    found = {
        "wordpiece": Tokenizer.from_file(str(onnx_model_dir / "tokenizer.json")),
        "byte-level": byte_level_bpe(),
    }
    for tok in found.values():
        tok.no_padding()
        tok.no_truncation()
    return found


def hard_text(seed: int, pieces: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def truncating(tok: Tokenizer, max_length: int) -> Tokenizer:
    copy = Tokenizer.from_str(tok.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy


@pytest.mark.parametrize("name", ["wordpiece", "byte-level"])
@pytest.mark.parametrize("seed", range(4))
def test_the_ends_give_the_tokens_of_the_whole_text_wherever_the_cut_falls(
    tokenizers: dict[str, Tokenizer], name: str, seed: int
) -> None:
    # Every first cut from 16 to 159 characters: inside words, CJK runs, emoji, whitespace.
    tok = tokenizers[name]
    text = hard_text(seed, 400)
    whole = tok.encode(text)
    for max_length in (6, 12):
        cut_whole = truncating(tok, max_length)
        first = cut_whole.encode(text)
        for fraction in (0.0, 0.5, 1.0):
            reading = Reading(long_text.HEAD_TAIL, head_fraction=fraction)
            want = split(whole.ids, whole.special_tokens_mask, max_length, reading)[0]
            for start in range(16, 160):
                assert read_ends(text, tok.encode, max_length, fraction, 0, start) == want, (
                    max_length,
                    fraction,
                    start,
                )
        for start in range(16, 160):
            got = read_head(text, cut_whole.encode, 0, start)
            assert (got.ids, got.offsets, got.word_ids) == (
                first.ids,
                first.offsets,
                first.word_ids,
            ), (max_length, start)


@pytest.mark.parametrize("name", ["wordpiece", "byte-level"])
def test_random_texts_and_lengths_read_alike_at_their_ends_and_whole(
    tokenizers: dict[str, Tokenizer], name: str
) -> None:
    tok = tokenizers[name]
    rng = random.Random(7)
    for trial in range(120):
        text = hard_text(trial, rng.choice([30, 200, 700, 2000]))
        max_length = rng.choice([8, 16, 32])
        fraction = rng.choice([0.0, 0.25, 0.5, 1.0])
        start = rng.choice([16, 40, 128])
        whole = tok.encode(text)
        reading = Reading(long_text.HEAD_TAIL, head_fraction=fraction)
        want = split(whole.ids, whole.special_tokens_mask, max_length, reading)[0]
        assert read_ends(text, tok.encode, max_length, fraction, 0, start) == want, trial


class CountingTokenizer:
    """A tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.seen: list[int] = []

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(len(text))
        return self.tok.encode(text, *args, **kwargs)

    def encode_batch(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self.seen.extend(len(t) for t in texts)
        return self.tok.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def engine(onnx_model_dir: Path) -> Iterator[Any]:
    model = bertrt.load(onnx_model_dir, device="cpu", variant="fp32")
    yield model.engine


@pytest.mark.parametrize(
    "reading", [Reading(long_text.TRUNCATE), Reading(long_text.HEAD_TAIL, head_fraction=0.25)]
)
def test_a_five_megabyte_text_is_tokenized_only_at_its_ends(engine: Any, reading: Reading) -> None:
    phrase = "a quiet , funny film about loss "  # 32 characters
    huge = phrase * 160_000
    ends = huge[:20_000] + huge[-20_000:]  # the same first and last tokens, tokenized whole
    engine.read_as(reading)
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    try:
        (windows,) = engine.encode([huge])
        whole = counting.tok.encode(ends)
    finally:
        engine.tokenizer = counting.tok
        engine.read_as(engine.manifest.reading())
    if reading.strategy == long_text.TRUNCATE:
        want = [whole.ids]
    else:
        want = split(whole.ids, whole.special_tokens_mask, engine.max_length, reading)
    assert [w.ids for w in windows] == want
    first = engine.max_length * long_text.CHARS_PER_TOKEN_CAP
    assert counting.seen and max(counting.seen) <= first, counting.seen
    assert sum(counting.seen) <= 2 * first, counting.seen


def test_texts_around_the_lengths_where_reading_the_ends_begins_read_alike(engine: Any) -> None:
    """Texts tokenized whole, just past that, and past twice that (where the two ends are
    read apart), cut in a word, in CJK, in whitespace: the window of the whole text."""
    engine.read_as(Reading(long_text.HEAD_TAIL, head_fraction=0.5))
    try:
        edge = engine.max_length * long_text.CHARS_PER_TOKEN_CAP
        tok = engine.tokenizer
        lengths = [*range(edge - 2, edge + 3), *range(2 * edge - 2, 2 * edge + 3), 5 * edge + 1]
        for filler in ["great film ", "好的電影", "  \n ", "e\u0301 ", "x" * 150 + " "]:
            for length in lengths:
                text = (filler * (length // len(filler) + 1))[:length]
                whole = tok.encode(text)
                want = split(
                    whole.ids, whole.special_tokens_mask, engine.max_length, engine.reading
                )
                assert [w.ids for w in engine.encode([text])[0]] == want, (filler, length)
    finally:
        engine.read_as(engine.manifest.reading())


def test_a_text_without_a_word_break_near_its_start_is_refused_not_tokenized_whole(
    engine: Any,
) -> None:
    huge = "x" * 5_000_000
    engine.read_as(Reading(long_text.HEAD_TAIL))
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    try:
        with pytest.raises(TextTooLong, match="text 1 has no break between words within"):
            engine.encode(["fine", huge])
    finally:
        engine.tokenizer = counting.tok
        engine.read_as(engine.manifest.reading())
    assert max(counting.seen) <= long_text.SCAN_CHARS


def test_a_lone_surrogate_anywhere_in_a_long_text_is_refused(engine: Any) -> None:
    text = "fine words " * 100_000
    text = text[:500_000] + "\ud800" + text[500_000:]
    with pytest.raises(ValueError, match="text 0 cannot be tokenised .*character 500000"):
        engine.encode([text])


def test_windows_past_max_windows_are_refused_naming_the_limit(engine: Any) -> None:
    engine.read_as(Reading(long_text.WINDOWS, stride=8))
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    text = "great film " * 60
    try:
        found = len(engine.encode([text])[0])
        assert found >= 2
        engine.max_windows = found
        assert len(engine.encode([text])[0]) == found
        engine.max_windows = found - 1
        message = f"text 1 is read as {found} windows of 64 tokens; the limit is max_windows"
        with pytest.raises(TextTooLong, match=message):
            engine.encode(["short", text])
        # Far more than 3 windows hold: refused before a character is tokenized.
        engine.max_windows = 3
        counting.seen.clear()
        with pytest.raises(TextTooLong, match="text 0 has 1,100,000 characters.*max_windows=3"):
            engine.encode(["great film " * 100_000])
        assert counting.seen == []
    finally:
        engine.tokenizer, engine.max_windows = counting.tok, None
        engine.read_as(engine.manifest.reading())


def test_max_windows_comes_from_the_argument_the_environment_or_the_default(
    onnx_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BERTRT_MAX_WINDOWS", raising=False)
    assert bertrt.load(onnx_model_dir, device="cpu").engine.max_windows == long_text.MAX_WINDOWS
    monkeypatch.setenv("BERTRT_MAX_WINDOWS", "7")
    assert bertrt.load(onnx_model_dir, device="cpu").engine.max_windows == 7
    assert bertrt.load(onnx_model_dir, device="cpu", max_windows=2).engine.max_windows == 2
    monkeypatch.setenv("BERTRT_MAX_WINDOWS", "many")
    with pytest.raises(ValueError, match="BERTRT_MAX_WINDOWS='many' is not a whole number"):
        bertrt.load(onnx_model_dir, device="cpu")
    with pytest.raises(ValueError, match="max_windows must be a whole number >= 1, got 0"):
        bertrt.load(onnx_model_dir, device="cpu", max_windows=0)


def reading_folder(source: Path, dest: Path, reading: Reading) -> Path:
    """A copy of an exported folder whose manifest reads long texts as `reading`."""
    shutil.copytree(source, dest)
    manifest = manifest_io.read(dest)
    manifest.long_text = reading.as_dict()
    manifest_io.write(dest, manifest)
    return dest


@pytest.fixture(scope="module")
def windows_dir(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("windows") / "model"
    return reading_folder(onnx_model_dir, dest, Reading(long_text.WINDOWS, stride=8))


def test_the_command_line_names_the_file_line_and_limit_of_a_text_with_too_many_windows(
    windows_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    lines = ['"fine"', json.dumps("great film " * 20), json.dumps("great film " * 400)]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["predict", "--model", str(windows_dir), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--device", "cpu", "--max-windows", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"bertrt: error: {source}, line 3: is read as ")
    assert "max_windows=4 (--max-windows, BERTRT_MAX_WINDOWS)" in err
    assert not out.exists()
    assert main([*argv, "--device", "cpu", "--max-windows", "200"]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_the_server_answers_413_naming_the_limit(
    windows_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from bertrt.server import create_app

    monkeypatch.setenv("BERTRT_MAX_WINDOWS", "4")
    model = bertrt.load(windows_dir, device="cpu")
    with TestClient(create_app(model)) as client:
        fine = client.post("/predict", json=["great film " * 20])
        assert fine.status_code == 200
        over = client.post("/predict", json=["fine", "great film " * 400])
        assert over.status_code == 413
        detail = over.json()["detail"]
        assert detail.startswith("text 1 is read as ") and "max_windows=4" in detail
        assert client.post("/predict", json=["fine"]).status_code == 200


def test_a_ten_megabyte_jsonl_line_stays_within_bounded_memory(
    tmp_path: Path, onnx_model_dir: Path
) -> None:
    """Peak resident memory of `bertrt predict` on one 10 MB line with head+tail: about 100 MB
    here (the line held three times while parsed, the tiny model); tokenized whole it was 2.1 GB.
    The bound is loose, so that it holds on any machine; docs/reliability.md has the figures."""
    folder = reading_folder(
        onnx_model_dir, tmp_path / "model", Reading(long_text.HEAD_TAIL, head_fraction=0.5)
    )
    source = tmp_path / "big.jsonl"
    source.write_text(json.dumps({"text": "a quiet , funny film about loss " * 320_000}) + "\n")
    measure = (
        "import json, resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(json.dumps([done.returncode, peak, done.stdout, done.stderr[-2000:]]))"
    )
    command = [sys.executable, "-m", "bertrt", "predict", "--model", str(folder)]
    command += ["--device", "cpu", "--input", str(source)]
    done = subprocess.run(
        [sys.executable, "-c", measure, *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    code, peak_kib, out, err = json.loads(done.stdout)
    assert code == 0, err
    assert set(json.loads(out)) == {"label", "score"}
    assert peak_kib < 600 * 1024, f"peak RSS {peak_kib // 1024} MiB"
