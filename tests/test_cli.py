"""The runtime's command line: predict on texts and JSONL files or stdin, info, errors."""

from __future__ import annotations

import inspect
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import synthetic_reviews

import bertrt
from bertrt import cli
from bertrt.cli import InputError, main, parse_line
from bertrt.predictors import REGISTRY
from bertrt.predictors.base import Option
from bertrt.predictors.text_classification import TextClassifier
from bertrt.progress import Progress


@pytest.fixture(scope="module")
def model(onnx_model_dir: Path) -> TextClassifier:
    return bertrt.load(onnx_model_dir, device="cpu")


def expected_lines(model: TextClassifier, texts: list[str], top_k: int | None = None) -> list:
    return [p.as_dict() for p in model.predict(texts, top_k=top_k)]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-6)


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_predict_texts_print_json_lines(
    onnx_model_dir: Path, model: TextClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a wonderful film", "dull and boring", ""]
    assert main(["predict", "--model", str(onnx_model_dir), "--device", "cpu", *texts]) == 0
    got = read_jsonl(capsys.readouterr().out)
    assert_same(got, expected_lines(model, texts))
    assert all(set(line) == {"label", "score"} for line in got)


def test_tensorrt_flag_reaches_the_loader_and_the_cpu_ignores_it(
    onnx_model_dir: Path,
    model: TextClassifier,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bertrt import cli

    asked = []
    real = cli.load
    monkeypatch.setattr(cli, "load", lambda *a, **k: asked.append(a[4]) or real(*a, **k))
    texts = ["a wonderful film", "dull and boring"]
    argv = ["predict", "--model", str(onnx_model_dir), "--device", "cpu", "--tensorrt", *texts]
    assert main(argv) == 0
    assert asked == [True]
    assert_same(read_jsonl(capsys.readouterr().out), expected_lines(model, texts))


def test_predict_top_k(
    onnx_model_dir: Path, model: TextClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(onnx_model_dir), "--top-k", "2", "fun plot"]) == 0
    (line,) = read_jsonl(capsys.readouterr().out)
    (expected,) = expected_lines(model, ["fun plot"], top_k=2)
    assert [entry["label"] for entry in line["top_k"]] == [e["label"] for e in expected["top_k"]]
    assert line["top_k"][0]["score"] == pytest.approx(line["score"])


def test_jsonl_file_in_file_out(
    onnx_model_dir: Path, model: TextClassifier, tmp_path: Path
) -> None:
    texts = [r["text"] for r in synthetic_reviews(30, seed=5)]
    records = [{"text": t, "id": i} if i % 2 else t for i, t in enumerate(texts)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = [
        "predict",
        "--model",
        str(onnx_model_dir),
        "--input",
        str(source),
        "--output",
        str(out),
    ]
    assert main([*argv, "--batch-size", "4"]) == 0
    assert_same(read_jsonl(out.read_text(encoding="utf-8")), expected_lines(model, texts))
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_jsonl_from_stdin_to_stdout_in_chunks_with_progress(
    onnx_model_dir: Path,
    model: TextClassifier,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = [r["text"] for r in synthetic_reviews(25, seed=6)] + ["héllo wörld ✓"]
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode("utf-8"))))
    monkeypatch.setattr(cli, "CHUNK", 7)
    argv = ["predict", "--model", str(onnx_model_dir), "--input", "-", "--progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert_same(read_jsonl(captured.out), expected_lines(model, texts))
    # No total on stdin: the bar is a count and a rate.
    assert captured.err.split("\r")[-1].startswith("26 texts, ")


def test_python_dash_m_reads_stdin(onnx_model_dir: Path, model: TextClassifier) -> None:
    texts = ["good fun", "a bland messy script"]
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    argv = [sys.executable, "-m", "bertrt", "--log-level", "warning", "predict"]
    result = subprocess.run(
        [*argv, "--model", str(onnx_model_dir), "--device", "cpu", "--input", "-"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_same(read_jsonl(result.stdout), expected_lines(model, texts))


BAD_LINES = [
    (b"{not json\n", "line 3: not valid JSON (Expecting property name"),
    (b"[1, 2]\n", "line 3: found a JSON array; expected a JSON string or an object"),
    (b'{"txt": "x"}\n', "line 3: object has no \"text\" key (keys: ['txt'])"),
    (b'{"text": 5}\n', "line 3: found a JSON number"),
    (b'{"text": null}\n', "line 3: found a JSON null"),
    (b"\n", "line 3: blank line"),
    (b'"caf\xe9"\n', "line 3: not UTF-8 (invalid continuation byte at byte 4)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_bad_jsonl_line_is_named_and_no_output_is_left(
    onnx_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad: bytes,
    message: str,
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'"fine"\n{"text": "also fine"}\n' + bad + b'"after"\n')
    out = tmp_path / "out.jsonl"
    argv = [
        "predict",
        "--model",
        str(onnx_model_dir),
        "--input",
        str(source),
        "--output",
        str(out),
    ]
    assert main(argv) == 1
    assert f"bertrt: error: {source}, {message}" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize(
    ("raw", "text"),
    [(b'"plain"', "plain"), (b'{"text": "obj", "id": 3}', "obj"), (b'""', ""), (b'" "\r\n', " ")],
)
def test_parse_line_accepts_strings_and_text_objects(raw: bytes, text: str) -> None:
    assert parse_line(raw, 1, "f") == text


def test_parse_line_error_names_source_and_line() -> None:
    with pytest.raises(InputError, match=r"^data\.jsonl, line 12: found a JSON boolean"):
        parse_line(b"true", 12, "data.jsonl")


def test_texts_and_input_are_exclusive(
    onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(onnx_model_dir), "--input", "-", "x"]) == 1
    assert "give texts to predict or --input" in capsys.readouterr().err
    assert main(["predict", "--model", str(onnx_model_dir)]) == 1


def test_missing_model_folder_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(tmp_path / "nope"), "x"]) == 1
    err = capsys.readouterr().err
    assert f"bertrt: error: {tmp_path / 'nope' / 'manifest.json'}: no manifest" in err
    assert "Traceback" not in err


def test_bad_top_k_is_a_one_line_error(
    onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(onnx_model_dir), "--top-k", "5", "x"]) == 1
    assert "bertrt: error: top_k must be between 1 and 2, got 5" in capsys.readouterr().err


def test_info_prints_metadata(onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(onnx_model_dir), "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == ["fresh", "rotten"]
    assert (info["task"], info["max_length"]) == ("text-classification", 64)
    assert info["provider"] == "CPUExecutionProvider"
    manifest = json.loads((onnx_model_dir / "manifest.json").read_text())
    assert info["shipped_variants"] == sorted(manifest["variants"])
    assert info["variant"] in info["shipped_variants"]


def test_progress_bar_renders_fraction_and_rate() -> None:
    stream = io.StringIO()
    bar = Progress(stream, total=200, interval=0.0)
    bar.update(50, 10)
    bar.update(50, 10)
    bar.close()
    lines = stream.getvalue().split("\r")
    assert lines[1].startswith(" 25% |######                  | 10 texts, ")
    assert lines[2].startswith(" 50% |############            | 20 texts, ")
    assert lines[-1].endswith(" texts/s\n")
    assert Progress(io.StringIO(), total=None).render(0.0).startswith("0 texts, ")


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(stream, total=10, enabled=False, interval=0.0)
    bar.update(10, 3)
    bar.close()
    assert stream.getvalue() == ""


def test_token_classification_model_prints_entities(
    ner_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "bob 🙂 stone went to oslo"
    assert (
        main(["predict", "--model", str(ner_dir), "--tokens", "--aggregation", "max", text]) == 0
    )
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert set(result) == {"entities", "tokens"}
    for item in result["entities"] + result["tokens"]:
        assert text[item["start"] : item["end"]] == item["text"]


def test_an_option_of_another_task_is_refused(
    onnx_model_dir: Path, ner_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(onnx_model_dir), "--aggregation", "max", "good"]) == 1
    assert "--aggregation does not apply to this text-classification model" in (
        capsys.readouterr().err
    )
    assert main(["predict", "--model", str(ner_dir), "--top-k", "2", "alice"]) == 1
    assert "--top-k does not apply to this token-classification model" in capsys.readouterr().err


def test_output_onto_the_input_is_refused_and_the_input_kept(
    onnx_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "good"}\n', encoding="utf-8")
    argv = ["predict", "--model", str(onnx_model_dir), "--input", str(path)]
    assert main([*argv, "--output", str(tmp_path / "." / "a.jsonl")]) == 1
    assert "is the --input file" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == '{"text": "good"}\n'


def test_a_lone_surrogate_is_a_clear_error(
    onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", str(onnx_model_dir), "ok", "bad \ud800 text"]) == 1
    err = capsys.readouterr().err
    assert "text 1 cannot be tokenised" in err and "lone surrogates" in err
    assert "Traceback" not in err


def predict_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(["predict", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_every_declared_option_is_a_flag_that_leaves_the_default_to_the_predictor(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no help line wrapped
    usage = predict_help(capsys)
    args = cli.build_parser().parse_args(["predict", "--model", "m"])
    for task, predictor in REGISTRY.items():
        signature = inspect.signature(predictor.predict).parameters
        for option in predictor.OPTIONS:
            assert cli.flag(option.name) in usage
            assert f"{task}: {option.help}" in usage
            assert getattr(args, option.name) is None
            # Unset, the flag is not passed: predict()'s default must be the declared one.
            assert signature[option.name].default == option.default, (task, option.name)


@dataclass(frozen=True)
class Echoed:
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"text": self.text}


class Echo:
    """A task the runtime lacks, declared in one class: registered, the CLI takes its option."""

    task = "echo"
    OPTIONS = (Option("shout", bool, default=False, help="upper-case the texts"),)

    def predict(
        self, texts: Sequence[str], batch_size: int = 32, shout: bool = False
    ) -> list[Echoed]:
        return [Echoed(t.upper() if shout else t) for t in texts]


def test_a_registered_predictor_gets_its_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "REGISTRY", {**REGISTRY, "echo": Echo})
    monkeypatch.setattr(cli, "open_model", lambda args: Echo())
    monkeypatch.setenv("COLUMNS", "1000")
    assert main(["predict", "--model", "m", "--shout", "hi"]) == 0
    assert read_jsonl(capsys.readouterr().out) == [{"text": "HI"}]
    assert main(["predict", "--model", "m", "hi"]) == 0
    assert read_jsonl(capsys.readouterr().out) == [{"text": "hi"}]
    assert main(["predict", "--model", "m", "--top-k", "2", "hi"]) == 1
    assert "--top-k does not apply to this echo model; its options are ['--shout']" in (
        capsys.readouterr().err
    )
    (line,) = [line for line in predict_help(capsys).splitlines() if "  --shout" in line]
    assert line.split() == ["--shout", "echo:", "upper-case", "the", "texts"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "argument --port: 70000 is out of range: use a value between 1"),
        (["--port", "0"], "argument --port: 0 is out of range"),
        (["--max-connections", "0"], "argument --max-connections: 0 is out of range"),
        (["--max-batch", "-3"], "argument --max-batch: -3 is out of range"),
        (["--deadline", "0"], "argument --deadline: 0 is out of range"),
        (["--port", "http"], "argument --port: 'http' is not a int"),
    ],
)
def test_serve_flags_out_of_range_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--model", "m", *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(15, 143, "terminated"), (2, 130, "interrupted")]
)
def test_a_signal_during_predict_leaves_no_partial_output(
    onnx_model_dir: Path, tmp_path: Path, signum: int, code: int, word: str
) -> None:
    """SIGTERM or SIGINT while the output is being written: one line, no traceback, neither the
    output nor its temporary file left."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'"review number {i} was fine"\n' for i in range(400_000)))
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "bertrt", "--log-level", "warning", "predict", "--device", "cpu"]
    argv += ["--model", str(onnx_model_dir), "--input", str(source), "--output", str(out)]
    # A shell's background job starts with SIGINT ignored, and Python then keeps ignoring it:
    # the child gets the default disposition, as a command started from a terminal has.
    process = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = out.with_name(out.name + ".tmp")
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "the output was being written"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == f"bertrt: {word}; {out} was not written"
    assert "Traceback" not in err
    assert not partial.exists() and not out.exists()


def test_a_lone_surrogate_deep_in_a_file_is_named_by_its_line(
    onnx_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Line 2,050 is the second chunk's second line: the error names the file's line."""
    source = tmp_path / "in.jsonl"
    lines = [json.dumps(f"review {i}") for i in range(3000)]
    lines[2049] = '"bad \\ud800 text"'
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["predict", "--model", str(onnx_model_dir), "--input", str(source)]
    assert main([*argv, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{source}, line 2050: the text holds a lone surrogate" in err, err
    assert not out.exists() and "Traceback" not in err
