"""Command line: predict (texts or JSONL), batch (on Dask), info, serve and package an exported
model folder."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

import bertrt.manifest as manifest_io
import bertrt.signing as signing
from bertrt.api import MAX_WINDOWS_ENV, PUBLIC_KEY_ENV, load
from bertrt.bundle import ONNXRUNTIMES, build_wheel
from bertrt.locate import BundleError, resolve_model
from bertrt.long_text import MAX_WINDOWS, TextTooLong
from bertrt.manifest import IntegrityError
from bertrt.predictors import REGISTRY, Predictor
from bertrt.predictors.base import Option
from bertrt.progress import Progress
from bertrt.registry import RegistryError
from bertrt.session import DEVICES, DeviceError

log = logging.getLogger(__name__)

# Lines read, predicted and written at a time, so a file of any size streams through.
CHUNK = 2048
JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean"}
SURROGATE = re.compile("[\ud800-\udfff]")
SIGNING_PASSWORD_ENV = "BERTRT_SIGNING_KEY_PASSWORD"


class InputError(ValueError):
    """A JSONL input line that is not a text."""


def parse_line(raw: bytes, number: int, source: str) -> str:
    """The text on one JSONL line: a JSON string or an object with a "text" string.

    A line of any length is held as its bytes, its decoded string and the text at most (no
    stripped or re-encoded copy), so a 50 MB line costs about three times 50 MB while read."""
    where = f"{source}, line {number}"
    expected = 'expected a JSON string or an object with a "text" string'
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line or line.isspace():
        raise InputError(f"{where}: blank line; {expected}")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    del line
    if isinstance(value, dict):
        if "text" not in value:
            raise InputError(f'{where}: object has no "text" key (keys: {sorted(value)})')
        value = value["text"]
    if not isinstance(value, str):
        kind = "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)
        raise InputError(f"{where}: found a JSON {kind}; {expected}")
    bad = None if value.isascii() else SURROGATE.search(value)
    if bad is not None:  # a JSON escape of half a surrogate pair, "\ud800"
        raise InputError(
            f"{where}: the text holds a lone surrogate ({bad.group()!r} at character "
            f"{bad.start()}), which is not Unicode text; send valid Unicode"
        )
    return value


def read_chunks(stream: BinaryIO, source: str) -> Iterator[tuple[list[str], int, int]]:
    """Yield (texts, line number of the first, bytes consumed) CHUNK lines at a time, checking
    every line."""
    texts: list[str] = []
    consumed = 0
    number = first = 0
    # Not enumerate(): the tuple it reuses would hold the last line until the next one.
    for raw in stream:
        number += 1  # noqa: SIM113
        consumed += len(raw)
        texts.append(parse_line(raw, number, source))
        del raw
        if len(texts) == CHUNK:
            yield texts, first + 1, consumed
            texts, consumed, first = [], 0, number
    if texts:
        yield texts, first + 1, consumed


@contextmanager
def open_output(target: str) -> Iterator[TextIO]:
    """stdout for "-", else a file that appears only once it is complete."""
    if target == "-":
        yield sys.stdout
        return
    path = Path(target)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_predictions(
    model: Predictor, texts: list[str], batch_size: int, options: dict[str, Any], out: IO[str]
) -> None:
    """One JSON line per text: the predictor's result (a label, or entities) as a dict."""
    for prediction in model.predict(texts, batch_size, **options):
        out.write(json.dumps(prediction.as_dict(), ensure_ascii=False) + "\n")


def flag(name: str) -> str:
    """The command-line flag of a predict() option: --top-k for top_k."""
    return "--" + name.replace("_", "-")


def task_options() -> dict[str, dict[str, Option]]:
    """Option name -> {task: its declaration}, over every registered predictor: the command line
    is parsed before the model, and so its task, is known."""
    options: dict[str, dict[str, Option]] = {}
    for task, predictor in REGISTRY.items():
        for option in predictor.OPTIONS:
            options.setdefault(option.name, {})[task] = option
    return options


def describe(option: Option) -> str:
    """An option's help with its bounds and default, as --help shows it."""
    notes = []
    most = "the label count" if option.maximum_labels else option.maximum
    if option.minimum is not None and most is not None:
        notes.append(f"{option.minimum} to {most}")
    elif option.minimum is not None or most is not None:
        notes.append(f"at least {option.minimum}" if most is None else f"at most {most}")
    if option.default is not None and option.type is not bool:
        notes.append(f"default {option.default}")
    return option.help + (f" ({', '.join(notes)})" if notes else "")


def add_option(parser: argparse.ArgumentParser, name: str, declared: dict[str, Option]) -> None:
    """One flag for an option however many tasks declare it. Its default is None, so that the
    loaded predictor's own default applies and a flag its task lacks can be refused."""
    kinds = {option.type for option in declared.values()}
    if len(kinds) > 1:
        raise TypeError(f"option {name} has a different type in each of {sorted(declared)}")
    (kind,) = kinds
    # argparse formats help with %.
    text = "; ".join(f"{task}: {describe(o)}" for task, o in declared.items()).replace("%", "%%")
    if kind is bool:
        parser.add_argument(flag(name), dest=name, action="store_const", const=True, help=text)
        return
    choices = None
    if all(option.choices for option in declared.values()):
        choices = list(dict.fromkeys(c for option in declared.values() for c in option.choices))
    parser.add_argument(flag(name), dest=name, type=kind, choices=choices, help=text)


def predict_options(args: argparse.Namespace, model: Predictor) -> dict[str, Any]:
    """The task options given on the command line; one the model's task lacks is an error."""
    names = task_options()
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    own = [option.name for option in model.OPTIONS]
    for name in given:
        if name not in own:
            raise InputError(
                f"{flag(name)} does not apply to this {model.task} model; "
                f"its options are {[flag(o) for o in own] or 'none'}"
            )
    return given


def open_model(args: argparse.Namespace) -> Predictor:
    """Load the folder or bundled model named by --model with the device options, its signature
    checked first when a public key is given (--public-key or BERTRT_PUBLIC_KEY)."""
    return load(
        resolve_model(args.model),
        args.device,
        args.variant,
        args.threads,
        args.tensorrt,
        public_key=args.public_key,
        max_windows=args.max_windows,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict the texts on the command line, or stream a JSONL file or stdin."""
    if bool(args.texts) == bool(args.input):
        raise InputError(
            "give texts to predict or --input FILE.jsonl (- for stdin): one of the two"
        )
    same = args.input not in (None, "-") and args.output != "-"
    if same and Path(args.input).resolve() == Path(args.output).resolve():
        raise InputError(
            f"--output {args.output} is the --input file: it would be replaced by the "
            "predictions; write them to another file"
        )
    model = open_model(args)
    options = predict_options(args, model)
    with open_output(args.output) as out:
        if args.texts:
            write_predictions(model, args.texts, args.batch_size, options, out)
            return 0
        stdin = args.input == "-"
        source = "<stdin>" if stdin else args.input
        total = None if stdin else Path(args.input).stat().st_size
        show = sys.stderr.isatty() if args.progress is None else args.progress
        progress = Progress(sys.stderr, total, enabled=show)
        with ExitStack() as stack:
            stream = sys.stdin.buffer if stdin else stack.enter_context(open(args.input, "rb"))
            for texts, first, consumed in read_chunks(stream, source):
                try:
                    write_predictions(model, texts, args.batch_size, options, out)
                except TextTooLong as exc:
                    raise InputError(f"{source}, line {first + exc.index}: {exc.reason}") from None
                progress.update(consumed, len(texts))
        progress.close()
        log.info("%d texts from %s on %s", progress.texts, source, model.provider)
    return 0


def optional(module: str, what: str, install: str) -> Any:
    """`module`, imported only by the command that needs it; missing, a one-line error saying
    what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise BundleError(f"{what} ({exc}); {install}") from None


def cmd_batch(args: argparse.Namespace) -> int:
    """Score a CSV, JSONL or Parquet table on a Dask cluster into Parquet; print a summary."""
    batch = optional(
        "bertrt.batch",
        "batch scoring needs Dask",
        "install the wheel's [dask] extra (pip install 'bertrt-model-NAME[dask]') or "
        "pip install 'dask[dataframe]' distributed",
    )
    folder = resolve_model(args.model)  # fails here, before a cluster starts
    key = args.public_key or os.environ.get(PUBLIC_KEY_ENV)
    if key:
        signing.verify(folder, key)  # here first: a bad folder fails before a cluster starts
    task = manifest_io.read(folder).task
    options = predict_options(args, REGISTRY[task]) if task in REGISTRY else {}
    threads = args.threads
    if args.local and not threads:
        # N single-threaded workers on one machine: split its cores rather than each take all.
        threads = max(1, (os.cpu_count() or 1) // args.local)
    spec = batch.ModelSpec(
        args.model,
        args.device,
        args.variant,
        threads,
        args.tensorrt,
        public_key=str(Path(key).resolve()) if key else None,
        max_windows=args.max_windows,
    )
    client, cluster = batch.open_client(args.scheduler, args.local)
    try:
        summary = batch.run(
            args.input,
            args.output,
            spec,
            client,
            args.text_column,
            args.id_column,
            args.batch_size,
            options,
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(json.dumps(dataclasses.asdict(summary)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print the model's metadata as JSON."""
    model = open_model(args)
    info = {**model.metadata(), "shipped_variants": sorted(model.manifest.variants)}
    provenance = model.manifest.provenance
    if provenance:  # where the package came from: commit, DVC outputs, lock, MLflow run
        model_hash = provenance.finetuned_sha256
        environment = provenance.environment  # a record of the machine: shown as it is
        info["lineage"] = {
            "git_commit": provenance.git.source_commit,
            "uncommitted_changes": provenance.git.dirty,
            "dvc_stages": provenance.dvc_stages,
            "lock": {k: environment.get(k) for k in ("lock", "lock_sha256")},
            "cpu": environment.get("cpu"),
            "model_sha256": model_hash,
            "mlflow_run": f"experiment {provenance.mlflow_experiment!r}, "
            f"tags.model_sha256 = '{model_hash}'",
        }
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP until interrupted."""
    server = optional(
        "bertrt.server",
        "serving needs fastapi and uvicorn",
        "install the wheel's [serve] extra or pip install fastapi uvicorn",
    )
    model = open_model(args)
    server.serve(
        model,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch,
        batch_size=args.batch_size,
        max_concurrency=args.max_concurrency,
        batching=server.Batching(
            max_texts=args.gather_texts,
            max_wait_ms=args.gather_ms,
            max_queue=args.max_queue,
            deadline_s=args.deadline,
        ),
        token=os.environ.get("BERTRT_API_TOKEN") or None,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
    )
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    """Build a wheel with the runtime and the model folder; print its path."""
    variants = None if args.variants is None else args.variants.split(",")
    onnxruntime = None if args.onnxruntime == "extras" else args.onnxruntime
    folder = resolve_model(args.model)
    key = args.public_key or os.environ.get(PUBLIC_KEY_ENV)
    if key:
        signing.verify(folder, key)
    password = os.environ.get(SIGNING_PASSWORD_ENV) or None
    wheel = build_wheel(
        folder,
        args.out,
        args.name,
        args.version,
        onnxruntime,
        variants,
        private_key=args.private_key,
        password=password,
    )
    print(wheel)
    return 0


def _bounded(kind: type, low: float, high: float | None = None) -> Any:
    """An argparse type: `kind` in [low, high], else a usage error naming the bounds."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (high is not None and value > high):
            where = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a value {where}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _bounded(int, 1)
PORT = _bounded(int, 1, 65535)
SECONDS = _bounded(float, 0.001)


class Terminated(Exception):
    """SIGTERM: stop as an interrupt does, leaving no partial output."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares."""
    parser.add_argument(
        "--model",
        required=True,
        help="exported model folder, or `bundled` / `bundled:NAME` for a model in this wheel",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--variant", help="fp32, fp32-optimized, fp16, int8 or int8-portable (default: best)"
    )
    parser.add_argument(
        "--threads", type=_bounded(int, 0), default=0, help="CPU threads (0: ORT decides)"
    )
    parser.add_argument(
        "--tensorrt",
        action="store_true",
        help="on CUDA, try TensorRT first (fp16; engines cached in BERTRT_TENSORRT_CACHE)",
    )
    parser.add_argument("--batch-size", type=POSITIVE, default=32)
    _trust_options(parser)
    parser.add_argument(
        "--max-windows",
        type=POSITIVE,
        help="the most windows one text is read as (windows reading or a stride); longer "
        f"texts are refused (default: ${MAX_WINDOWS_ENV}, else {MAX_WINDOWS})",
    )


def _trust_options(parser: argparse.ArgumentParser) -> None:
    """--public-key, for every command that reads a model folder."""
    parser.add_argument(
        "--public-key",
        metavar="PEM",
        help="check the folder's signature (model.sig) with this public key before reading "
        f"anything in it; unsigned or changed folders are refused (default: ${PUBLIC_KEY_ENV}; "
        "needs model-signing)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `bertrt` argument parser with its five commands."""
    parser = argparse.ArgumentParser(prog="bertrt", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify, tag or fill texts; JSON lines out")
    _model_options(predict)
    predict.add_argument("texts", nargs="*", help="texts to predict")
    predict.add_argument("--input", help='JSONL file ("text" objects or strings), - for stdin')
    predict.add_argument("--output", default="-", help="JSONL file to write, - for stdout")
    for name, declared in task_options().items():
        add_option(predict, name, declared)
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    predict.set_defaults(run=cmd_predict)

    batch = commands.add_parser(
        "batch", help="score a CSV, JSONL or Parquet table on Dask; Parquet out (needs dask)"
    )
    _model_options(batch)
    batch.add_argument(
        "--input", required=True, help="CSV, JSONL or Parquet: a file, folder or glob (fsspec URL)"
    )
    batch.add_argument(
        "--output", required=True, help="folder for part-NNNNN.parquet, one per input partition"
    )
    where = batch.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running scheduler, tcp://HOST:PORT")
    where.add_argument(
        "--local",
        type=POSITIVE,
        metavar="N",
        help="start a local cluster of N one-thread worker processes on 127.0.0.1 (default: 1)",
    )
    batch.add_argument("--text-column", default="text", help="the column of texts")
    batch.add_argument("--id-column", help="a column to copy into the output (default: row)")
    for name, declared in task_options().items():
        add_option(batch, name, declared)
    batch.set_defaults(run=cmd_batch)

    info = commands.add_parser("info", help="print the model's metadata")
    _model_options(info)
    info.set_defaults(run=cmd_info)

    serve = commands.add_parser("serve", help="HTTP server (needs fastapi and uvicorn)")
    _model_options(serve)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (loopback by default); set BERTRT_API_TOKEN to require a token",
    )
    serve.add_argument(
        "--max-connections", type=POSITIVE, default=512, help="open connections; more get 503"
    )
    serve.add_argument(
        "--header-timeout",
        type=SECONDS,
        default=10.0,
        help="seconds a client has to send a request's headers before it is cut off",
    )
    serve.add_argument("--port", type=PORT, default=8000)
    serve.add_argument("--max-body-bytes", type=POSITIVE, default=1 << 20)
    serve.add_argument("--max-batch", type=POSITIVE, default=256, help="most texts per request")
    serve.add_argument("--max-concurrency", type=POSITIVE, default=2, help="inferences at once")
    serve.add_argument(
        "--gather-ms",
        type=_bounded(float, 0),
        default=5.0,
        help="gather concurrent requests' texts for at most this long into one run (0: no wait)",
    )
    serve.add_argument(
        "--gather-texts",
        type=POSITIVE,
        default=64,
        help="or until this many wait (1: none)",
    )
    serve.add_argument(
        "--max-queue", type=POSITIVE, default=2048, help="texts allowed to wait; more get 503"
    )
    serve.add_argument(
        "--deadline", type=SECONDS, default=30.0, help="seconds a request may take; later: 504"
    )
    serve.set_defaults(run=cmd_serve)

    package = commands.add_parser("package", help="build a wheel bundling runtime and model")
    package.add_argument("--model", required=True, help="exported model folder")
    package.add_argument("--out", required=True, help="folder for the wheel")
    package.add_argument("--name", default="default", help="bundled model name")
    package.add_argument("--version", help="wheel version (default: the runtime's)")
    package.add_argument(
        "--onnxruntime",
        choices=["extras", *ONNXRUNTIMES],
        default="extras",
        help="extras: ONNX Runtime comes with pip install NAME[cpu] or NAME[gpu] (default)",
    )
    package.add_argument(
        "--variants",
        help="comma-separated graphs to bundle (default: the ones picked on CPU and on CUDA)",
    )
    _trust_options(package)
    package.add_argument(
        "--private-key",
        metavar="PEM",
        help="sign the bundled folder with this EC private key (password in "
        f"${SIGNING_PASSWORD_ENV}); without it a signature is carried only if the bundle is "
        "the whole folder unchanged",
    )
    package.set_defaults(run=cmd_package)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run one command, turn expected failures into one-line errors."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.run is cmd_predict:  # the server handles SIGTERM itself (in-flight requests finish)
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args)
    except (KeyboardInterrupt, Terminated) as exc:
        output = getattr(args, "output", "-")
        left = "" if output == "-" else f"; {output} was not written"
        name = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"bertrt: {name}{left}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except (
        ValueError,
        TypeError,
        OSError,
        IntegrityError,
        DeviceError,
        BundleError,
        RegistryError,
    ) as exc:
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`| head`); stop quietly, as cat does.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"bertrt: error: {exc}", file=sys.stderr)
        return 1
