"""The task-independent core: model folder, session, encoding and length-sorted batching."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

import bertrt.long_text as long_text
import bertrt.manifest as manifest_io
from bertrt.contract import (
    BASE_VARIANT,
    CPU,
    CUDA,
    INPUT_NAMES,
    LABELS_FILE,
    MANIFEST_FILE,
    TENSORRT,
    TOKENIZER_FILE,
    preferred,
)
from bertrt.manifest import Manifest, VariantEntry
from bertrt.session import (
    DeviceError,
    GraphError,
    cuda_possible,
    int8_kernels,
    run,
    start_session,
)

log = logging.getLogger(__name__)

# Texts are tokenised and run this many at a time, so a list of millions never sits in memory
# as token ids all at once.
CHUNK = 4096
# Lone UTF-16 surrogates, which no tokenizer reads: every text is searched for them whole, so a
# long text of which only the ends are tokenized is refused as when it was tokenized whole.
SURROGATE = re.compile("[\ud800-\udfff]")


# What one run costs beyond its tokens, in padded tokens' worth of work, by provider. A batch of
# texts of mixed lengths is padded to its longest, so on the CPU, where a run's fixed cost is
# small, a sorted batch is cut where padding the shorter texts to the next one would cost more
# than another run. On the default model (int8, 2 cores) 32 random test texts ran 1.7x faster
# cut this way than as one padded run, and any price from 16 to 64 tokens gave the same speed.
# Other providers (CUDA) fill every run.
RUN_COST_TOKENS = {CPU: 32.0}


def length_groups(lengths: np.ndarray, batch_size: int, run_cost: float) -> list[tuple[int, int]]:
    """Cut `lengths` (ascending) into runs [a, b) of at most `batch_size` that minimise the
    padded tokens, (b - a) * lengths[b - 1] for each, plus `run_cost` per run (exact, by
    dynamic programming over the cut points)."""
    n = len(lengths)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        start = np.arange(max(0, end - batch_size), end)
        costs = best[start] + (end - start) * float(lengths[end - 1]) + run_cost
        pick = int(np.argmin(costs))  # the first minimum: the longest run of equal cost
        best[end], cut[end] = costs[pick], start[pick]
    groups, end = [], n
    while end:
        groups.append((int(cut[end]), end))
        end = int(cut[end])
    return groups[::-1]


class ModelFolderError(ValueError):
    """A model folder that cannot be served."""


@dataclass(frozen=True)
class Piece:
    """One window of a text, cut from its encoding by bertrt.long_text (one sequence)."""

    ids: list[int]
    type_ids: list[int]


@dataclass
class Engine:
    """One ONNX Runtime session over a model folder, with its tokenizer and manifest."""

    folder: Path
    manifest: Manifest
    variant: str
    session: Any
    provider: str
    tokenizer: Tokenizer
    # The most windows one text is read as (windows reading, or a stride); None: no limit.
    max_windows: int | None = None
    input_names: tuple[str, ...] = field(init=False)
    output_name: str = field(init=False)
    probe_s: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        declared = {i.name for i in self.session.get_inputs()}
        self.input_names = tuple(name for name in INPUT_NAMES if name in declared)
        self.output_name = self.manifest.outputs[0]
        self.max_length = int(self.manifest.max_length)
        self.stride = int(self.manifest.window_stride)
        self.tokenizer.no_padding()
        self.read_as(self.manifest.reading())

    def read_as(self, reading: long_text.Reading) -> None:
        """Read long texts as `reading` says. A model folder is served as its manifest says (as
        it was evaluated); this is for measuring another reading of the same graph."""
        problems = reading.problems(self.max_length)
        if problems:
            raise ValueError(f"long_text: {'; '.join(problems)}")
        self.reading = reading
        # A classifier that reads long texts whole tokenizes them whole and cuts the ids itself.
        self.whole = reading.strategy != long_text.TRUNCATE
        if self.whole:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(self.max_length, stride=self.stride)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def encode(self, texts: Sequence[str], first: int = 0) -> list[list[Encoding | Piece]]:
        """Per text, its windows: one when texts are cut at max_length, else all of them.
        `first` is the place of `texts[0]` in the caller's whole list: errors name a text by
        its place there.

        A text over `max_length * CHARS_PER_TOKEN_CAP` characters is tokenized alone, and only
        as much of it as its reading keeps: its start (truncation) or its two ends (head+tail),
        with the same result as tokenizing it whole (bertrt.long_text.read_head, read_ends).
        Read as windows, a text of more than `max_windows` is refused (TextTooLong).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {first + i} is {type(text).__name__}, expected str")
            bad = None if text.isascii() else SURROGATE.search(text)
            if bad is not None:  # also where only the ends of a long text are tokenized
                raise ValueError(
                    f"text {first + i} cannot be tokenised (a lone surrogate {bad.group()!r} "
                    f"at character {bad.start()}); send valid Unicode (no lone surrogates)"
                )
        short = self.max_length * long_text.CHARS_PER_TOKEN_CAP
        together = [i for i, text in enumerate(texts) if len(text) <= short]
        encodings = self._tokenize([texts[i] for i in together], [first + i for i in together])
        out: list[list[Encoding | Piece]] = [[] for _ in texts]
        for i, encoding in zip(together, encodings, strict=True):
            out[i] = self.windows(encoding, first + i)
        for i, text in enumerate(texts):
            if len(text) > short:
                out[i] = self.read_long(text, first + i, short)
        return out

    def read_long(self, text: str, index: int, start: int) -> list[Encoding | Piece]:
        """The windows of one long text, tokenizing no more of it than its reading keeps."""
        if self.stride or self.reading.strategy == long_text.WINDOWS:
            most = self.max_windows
            if (
                most is not None
                and len(text) > most * self.max_length * long_text.CHARS_PER_TOKEN_CAP
            ):
                raise long_text.too_many_windows(index, most, self.max_length, chars=len(text))
            (encoding,) = self._tokenize([text], [index])
            return self.windows(encoding, index)
        encode = self.tokenizer.encode
        if not self.whole:
            return [long_text.read_head(text, encode, index, start)]
        ids = long_text.read_ends(
            text, encode, self.max_length, self.reading.head_fraction, index, start
        )
        return [Piece(ids, [0] * len(ids))]

    def _tokenize(self, texts: list[str], indices: list[int]) -> list[Encoding]:
        """The tokenizer's encodings of `texts` (at `indices` in the caller's list)."""
        try:
            return self.tokenizer.encode_batch(texts)
        except (TypeError, ValueError) as exc:
            bad = next((i for i, t in zip(indices, texts, strict=True) if not _encodable(t)), None)
            where = f"text {bad}" if bad is not None else "a text"
            raise ValueError(
                f"{where} cannot be tokenised ({exc}); send valid Unicode (no lone surrogates)"
            ) from None

    def windows(self, encoding: Encoding, index: int) -> list[Encoding | Piece]:
        """The windows of a text tokenized whole; more than `max_windows` is TextTooLong."""
        if self.whole:
            found: list[Encoding | Piece] = list(self.pieces(encoding))
        elif self.stride:
            found = [encoding, *encoding.overflowing]
        else:
            return [encoding]
        if self.max_windows is not None and len(found) > self.max_windows:
            raise long_text.too_many_windows(
                index, self.max_windows, self.max_length, found=len(found)
            )
        return found

    def pieces(self, encoding: Encoding) -> list[Piece]:
        """The windows `self.reading` cuts a whole text's encoding into."""
        cut = long_text.split(
            encoding.ids, encoding.special_tokens_mask, self.max_length, self.reading
        )
        return [Piece(ids, [0] * len(ids)) for ids in cut]

    def feeds(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch, padded to its longest encoding."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names}

    def batches(self, encodings: Sequence[Encoding], batch_size: int) -> list[np.ndarray]:
        """Index batches of `encodings` (at most `batch_size` each), sorted by length so
        padding stays short; on the CPU also cut where padding would cost more than a run."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        lengths = np.fromiter(map(len, (e.ids for e in encodings)), np.int64, len(encodings))
        order = np.argsort(lengths, kind="stable")
        run_cost = RUN_COST_TOKENS.get(self.provider)
        if run_cost is None:
            return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        return [order[a:b] for a, b in length_groups(lengths[order], batch_size, run_cost)]

    def infer(
        self, encodings: Sequence[Encoding], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, mask) in the caller's order, padded to the longest encoding.

        Per-text outputs are (n, labels); per-token outputs are (n, width, labels) and valid only
        where mask (n, width) is 1.
        """
        return self.collect(
            encodings,
            batch_size,
            lambda feeds: run(self.session, feeds, self.output_name, self.provider),
        )

    def collect(
        self,
        encodings: Sequence[Encoding],
        batch_size: int,
        forward: Callable[[dict[str, np.ndarray]], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """`forward` over the length-sorted batches, gathered as `infer` returns them (the
        export's parity check passes the PyTorch model here)."""
        width = max((len(e.ids) for e in encodings), default=0)
        mask = np.zeros((len(encodings), width), dtype=bool)
        for row, enc in enumerate(encodings):
            mask[row, : len(enc.ids)] = True
        out: np.ndarray | None = None
        for idx in self.batches(encodings, batch_size):
            got = forward(self.feeds([encodings[i] for i in idx]))
            per_token = got.ndim == 3
            if out is None:
                shape = (len(encodings), *((width,) if per_token else ()), *got.shape[-1:])
                out = np.zeros(shape, dtype=np.float32)
            if per_token:
                out[idx, : got.shape[1]] = got
            else:
                out[idx] = got
        if out is None:
            out = np.zeros((0, len(self.labels)), dtype=np.float32)
        return out, mask

    def metadata(self) -> dict[str, Any]:
        return {
            "task": self.manifest.task,
            "labels": self.labels,
            "variant": self.variant,
            "provider": self.provider,
            "max_length": self.max_length,
            "window_stride": self.stride,
            "long_text": self.reading.as_dict(),
            "temperature": self.manifest.temperature,
            "metrics": self.manifest.metrics,
            "base_model": (
                dataclasses.asdict(self.manifest.provenance.base_model)
                if self.manifest.provenance
                else None
            ),
        }


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def choose_variant(manifest: Manifest, provider: str, variant: str | None) -> str:
    """The asked-for variant, else the first shipped of the provider's preference
    (bertrt.contract.VARIANTS: fp16 on CUDA, the optimised graph on CPU, the plain graph for
    TensorRT); `open_engine` then measures the provider's variants against each other
    (`fastest_here`)."""
    shipped = manifest.variants
    if variant is not None:
        if variant not in shipped:
            raise ModelFolderError(
                f"variant {variant!r} is not shipped in this folder; shipped: {sorted(shipped)}"
            )
        return variant
    for name in [*preferred(provider), BASE_VARIANT]:
        if name in shipped:
            return name
    raise ModelFolderError(f"manifest lists no variant; shipped: {sorted(shipped)}")


def open_engine(
    model_dir: str | Path,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
    *,
    manifest: Manifest | None = None,
    max_windows: int | None = None,
) -> Engine:
    """Read and check the folder, then start a session on `device` ("auto", "cuda" or "cpu").

    Args:
        manifest: the folder's manifest when the caller has read it already.
        max_windows: the most windows one text is read as (None: no limit).
    """
    folder = Path(model_dir)
    if manifest is None:
        manifest = manifest_io.read(folder)
    if verify:
        # Every listed file, and the files this runtime reads even if the manifest omits them.
        used = {TOKENIZER_FILE, LABELS_FILE} | {e.file for e in manifest.variants.values()}
        manifest_io.verify(folder, manifest, sorted(used | set(manifest.files)))
        _same_labels(folder, manifest)
    # Start on the file the device would prefer; re-open if the provider changes the choice.
    # Where no CUDA session can start, a CUDA-only graph (fp16) is not even opened.
    if device == "cpu" or (device == "auto" and not cuda_possible()):
        first = CPU
    else:
        first = TENSORRT if tensorrt else CUDA
    wanted = choose_variant(manifest, first, variant)
    profile = (manifest.inputs, manifest.max_length)
    try:
        session, provider = start_session(
            _path(folder, manifest, wanted), device, threads, tensorrt, profile
        )
    except GraphError:
        if device != "auto":
            raise
        # A GPU-only variant (fp16) may not load on the CPU fallback; pick again for the CPU.
        session, provider = None, CPU
    chosen = choose_variant(manifest, provider, variant)
    if session is None or chosen != wanted:
        session, provider = start_session(
            _path(folder, manifest, chosen),
            "cpu" if provider == CPU else device,
            threads,
            tensorrt,
            profile,
        )
    path = manifest_io.inside(folder, TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise ModelFolderError(f"{path}: not a readable tokenizer ({exc}); re-export") from None
    engine = Engine(folder, manifest, chosen, session, provider, tokenizer, max_windows)
    del session  # the engine holds it; the probe may replace both
    if variant is None and provider in (CPU, CUDA):
        engine = fastest_here(engine, threads)
        _release_memory()  # the sessions not kept: about 100 MB each on the default model
    log.info("loaded %s variant %s on %s", folder, engine.variant, provider)
    return engine


PROBE_TEXT = "a quiet, funny and surprisingly moving film about friendship and loss " * 3
PROBE_BATCH = 16  # texts per timed run
PROBE_RUNS = 3  # timed runs per variant (after one warm-up); the fastest counts
# Another variant replaces the preferred one only when this much faster, so that two variants
# within timing noise of each other do not swap from one start to the next.
PROBE_MARGIN = 1.15


def _release_memory() -> None:
    """Hand the freed pages of the dropped sessions back to the OS: glibc keeps freed heap
    pages of a process, so the probe's sessions would stay in the server's RSS. A dropped engine
    is in no reference cycle, so it is freed the moment its last reference goes; no garbage
    collection is needed (a full one costs a large process, a notebook with torch loaded or a
    pipeline stage, a tenth to half a second each time)."""
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(libc).malloc_trim(0)


def fastest_here(engine: Engine, threads: int) -> Engine:
    """Of the shipped variants built for the engine's provider (CPU or CUDA), the one that runs
    a probe batch fastest here: which one wins depends on the machine (on the CPU the optimised
    graph was slower than the plain one on two machines, and int8 gains most with VNNI; on a GPU
    fp16 is expected to win, and is checked), so it is measured, not assumed. The preferred one
    stays unless another is PROBE_MARGIN faster; pass `variant=` to pin one. The seconds per run
    are kept in `engine.probe_s`. TensorRT is not probed: each variant would cost an engine
    build."""
    provider = engine.provider
    names = [
        n
        for n, e in engine.manifest.variants.items()
        if provider in e.providers and not _int8_untested_here(n, e, provider)
    ]
    if len(names) < 2:
        return engine
    probe = engine.encode([PROBE_TEXT] * PROBE_BATCH)
    batch = [windows[0] for windows in probe]
    engine.infer(batch, PROBE_BATCH)  # warm first (kernels, pools, clocks)
    timings = {engine.variant: float("inf")}
    # One candidate at a time beside the preferred engine and the fastest other so far: at
    # most three sessions at once (all four CPU graphs of the default model at once took the
    # load's peak to 540 MB).
    best: Engine | None = None
    for name in names:
        if name in timings:
            continue
        candidate = _start_variant(engine, name, threads)
        if candidate is None:
            continue
        candidate.infer(batch, PROBE_BATCH)
        timings[name] = float("inf")
        for _ in range(PROBE_RUNS):  # in rounds with the preferred one: drift hits both alike
            for timed in (engine, candidate):
                start = time.perf_counter()
                timed.infer(batch, PROBE_BATCH)
                timings[timed.variant] = min(timings[timed.variant], time.perf_counter() - start)
        if best is None or timings[name] < timings[best.variant]:
            best, candidate = candidate, best
        del candidate  # the slower of the two
        _release_memory()
    fastest = min(timings, key=timings.__getitem__)
    keep = best is None or timings[fastest] * PROBE_MARGIN >= timings[engine.variant]
    chosen = engine if keep else best
    chosen.probe_s = {name: round(seconds, 6) for name, seconds in timings.items()}
    log.info(
        "variants timed on a probe batch on %s (s): %s; using %s",
        provider,
        chosen.probe_s,
        chosen.variant,
    )
    return chosen


def _start_variant(engine: Engine, name: str, threads: int) -> Engine | None:
    """An engine like `engine` on the variant `name`, None where it does not start on the
    engine's provider (then it is not comparable)."""
    provider = engine.provider
    path = _path(engine.folder, engine.manifest, name)
    try:
        session, started = start_session(path, "cpu" if provider == CPU else "cuda", threads)
    except DeviceError as exc:  # the engine already runs: skip what cannot start
        log.info("variant %s not timed: %s", name, exc)
        return None
    if started != provider:
        return None
    return Engine(
        engine.folder,
        engine.manifest,
        name,
        session,
        provider,
        engine.tokenizer,
        engine.max_windows,
    )


def _int8_untested_here(name: str, entry: VariantEntry, provider: str) -> bool:
    """An int8-weight graph gated where its products are exact (VNNI, AMX), on a CPU whose
    kernels saturate: its gate says nothing about this machine, so it is not picked unless
    pinned. uint8 weights (int8-portable) are summed exactly on every CPU."""
    if provider != CPU or entry.int8_weights != "int8":
        return False
    if entry.gated_int8_kernels == "exact" and int8_kernels() == "saturating":
        log.warning(
            "int8 not used: its gate ran on a CPU with VNNI or AMX, and this one has neither "
            "(its int8 products can saturate); pass variant=%r to use it anyway",
            name,
        )
        return True
    return False


def _path(folder: Path, manifest: Manifest, variant: str) -> Path:
    return manifest_io.inside(folder, manifest.variants[variant].file)


def _same_labels(folder: Path, manifest: Manifest) -> None:
    """labels.json (whose digest was just checked) must say what the manifest says."""
    path = manifest_io.inside(folder, LABELS_FILE)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc}); re-export") from None
    if labels != manifest.labels:
        raise manifest_io.IntegrityError(
            f"{path}: {labels!r:.120} differs from {MANIFEST_FILE}'s labels "
            f"{manifest.labels!r:.120}; restore the folder from the export"
        )
