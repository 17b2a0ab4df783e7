"""One frozen dataclass per `params.yaml` section, loaded and checked at the edge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bertrt.contract import OPTIONAL_VARIANTS
from bertrt.decoding import ARGMAX, VITERBI
from bertrt.long_text import Reading
from bertrt.predictors import FILL_MASK, TASKS, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from pipeline.core import precision

TAG_SCHEMES = ("iob1", "iob2", "bioes")
BROKEN_TAGS = ("refuse", "repair")
TEXT_FORMATS = ("plain", "word_pos")
TAG_DECODINGS = (ARGMAX, VITERBI)


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file, key and fix."""


@dataclass(frozen=True)
class Base:
    seed: int
    task: str
    model: str
    max_length: int
    text_column: str
    label_column: str
    trust_remote_code: bool

    def check(self) -> list[str]:
        errors = []
        if self.task not in TASKS:
            errors.append(f"base.task: {self.task!r} is not one of {list(TASKS)}")
        if not 8 <= self.max_length <= 8192:
            errors.append(f"base.max_length: {self.max_length} must be between 8 and 8192")
        if not self.model.strip():
            errors.append(
                "base.model: empty; give a hub id, a local folder or package:<pkg>/<dir>"
            )
        if self.text_column == self.label_column:
            errors.append("base.text_column and base.label_column must name different columns")
        return errors


@dataclass(frozen=True)
class Ingest:
    source: str
    group_column: str
    drop_labels: list[str]
    drop_empty_text: bool
    deduplicate: bool
    validation_fraction: float
    test_fraction: float
    max_rows: int
    heldout: str  # fill-mask: a separate held-out file becomes the test split ("" for a cut)
    probes: str  # fill-mask: JSONL of texts with [MASK] and their expected fills ("" for none)
    text_format: str  # fill-mask .txt lines: "plain", or "word_pos" (word/TAG tokens, joined)
    rehearsal: list[str]  # sources whose rows are added to train only (against forgetting)
    rehearsal_rows: int  # a seeded sample of that many rows of each rehearsal source; 0: all
    # fill-mask: validation is the training text itself (masked once) instead of a cut of it, so
    # that a corpus of facts loses none of its sentences; selection keeps the epoch that recalls
    # the taught text best (forgetting shows in the held-out perplexity).
    validate_on_train: bool = False

    def check(self) -> list[str]:
        errors = []
        if self.text_format not in TEXT_FORMATS:
            errors.append(
                f"ingest.text_format: {self.text_format!r} is not one of {list(TEXT_FORMATS)}"
            )
        for key in ("validation_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 0.5:
                errors.append(f"ingest.{key}: {value} must be in (0, 0.5)")
        if self.rehearsal_rows < 0:
            errors.append(f"ingest.rehearsal_rows: {self.rehearsal_rows} must be >= 0")
        if self.max_rows < 0:
            errors.append(f"ingest.max_rows: {self.max_rows} must be >= 0 (0 keeps every row)")
        if not self.source.strip():
            errors.append("ingest.source: empty; give a file, a folder or package:<pkg>/<path>")
        return errors


@dataclass(frozen=True)
class Validate:
    labels: list[str]
    max_duplicate_report: int
    tag_scheme: str  # token classification: the scheme of the input tags, read into IOB2
    broken_tags: str  # token classification: "refuse" broken sequences, or "repair" them
    max_line_chars: int  # fill-mask: longer lines are split into pieces of at most this many

    def check(self) -> list[str]:
        errors = []
        if self.max_line_chars < 16:
            errors.append(f"validate.max_line_chars: {self.max_line_chars} must be >= 16")
        if len(set(self.labels)) != len(self.labels):
            errors.append(f"validate.labels: {self.labels} lists a label twice")
        if self.broken_tags not in BROKEN_TAGS:
            errors.append(
                f"validate.broken_tags: {self.broken_tags!r} is not one of {list(BROKEN_TAGS)}"
            )
        if self.tag_scheme not in TAG_SCHEMES:
            errors.append(
                f"validate.tag_scheme: {self.tag_scheme!r} is not one of {list(TAG_SCHEMES)} "
                "(BMES is read as bioes)"
            )
        return errors


@dataclass(frozen=True)
class Tokenize:
    batch_size: int
    vocab_extension_min_count: int  # add characters seen this often as [UNK]; 0: never
    group_texts: bool  # fill-mask: concatenate lines into blocks of max_length (else per line)

    def check(self) -> list[str]:
        errors = [] if self.batch_size > 0 else ["tokenize.batch_size must be > 0"]
        if self.vocab_extension_min_count < 0:
            errors.append(
                f"tokenize.vocab_extension_min_count: {self.vocab_extension_min_count} must be "
                ">= 0 (0 keeps the vocabulary as it is)"
            )
        return errors


@dataclass(frozen=True)
class Tagging:
    """Token classification: how sentences become windows, which subwords carry a tag, how the
    tags are decoded, and whether a CRF head learns which tag follows which."""

    stride: int  # tokens shared by the windows of a sentence over base.max_length (0: cut)
    label_all_subwords: bool  # label every subword, not only a word's first
    # argmax (each word's best tag) or viterbi (the best sequence IOB2 allows); recorded in the
    # fine-tuned model, which evaluate, the export's gates and the runtime decode by.
    decoding: str
    crf: bool  # a linear-chain CRF head trained by its likelihood, decoded by Viterbi
    crf_learning_rate: float  # the CRF's parameters' own AdamW rate (no layer decay)

    def check(self) -> list[str]:
        errors = []
        if self.stride < 0:
            errors.append(f"token-classification.stride: {self.stride} must be >= 0")
        if self.decoding not in TAG_DECODINGS:
            errors.append(
                f"token-classification.decoding: {self.decoding!r} is not one of "
                f"{list(TAG_DECODINGS)}"
            )
        if self.crf and self.decoding != VITERBI:
            errors.append(
                "token-classification.crf: true decodes with the CRF's transitions; set "
                "token-classification.decoding: viterbi"
            )
        if not 0.0 < self.crf_learning_rate < 1.0:
            errors.append(
                f"token-classification.crf_learning_rate: {self.crf_learning_rate} must be in "
                "(0, 1)"
            )
        if self.crf and self.label_all_subwords:
            errors.append(
                "token-classification.crf: true reads a word's first subword only; set "
                "token-classification.label_all_subwords: false"
            )
        return errors


@dataclass(frozen=True)
class LongText:
    """Text classification: how a text over base.max_length tokens is read (bertrt.long_text)."""

    strategy: str
    stride: int
    head_fraction: float
    aggregate: str

    def reading(self) -> Reading:
        return Reading(self.strategy, self.stride, self.head_fraction, self.aggregate)

    def check(self) -> list[str]:
        # The stride is checked against base.max_length where both are known (tokenize).
        return [f"{TEXT_CLASSIFICATION}.{x}" for x in self.reading().problems(1 << 30)]


SEGMENTERS = ("", "jieba")


@dataclass(frozen=True)
class Masking:
    """Fill-mask: how tokens are masked, in training (dynamic) and held-out data (seeded once)."""

    probability: float
    mask_replace_prob: float  # of the chosen tokens, this share becomes the mask token
    random_replace_prob: float  # this share a random token; the rest stay as they are
    whole_word: bool  # mask every token of a chosen word
    segmenter: str  # "" (words from the text's gaps) or "jieba" (Chinese words)
    user_words: str  # jieba: a file of extra words, one a line (new names), or ""
    # Salient-span masking: the words of this file (one a line, e.g. the names being taught)
    # are masked with salient_probability wherever they occur, besides `probability`.
    salient_words: str = ""
    salient_probability: float = 0.0
    # Of those salient masks, this share leaves a random first part of the word visible (at least
    # one token masked): the runtime fills a run of masks left to right, reading each token it
    # put in, so the model must also learn the rest of a word from its start (诸葛[MASK] -> 涛).
    salient_prefix_probability: float = 0.0

    def check(self) -> list[str]:
        errors = []
        if not 0.0 < self.probability < 1.0:
            errors.append(f"fill-mask.probability: {self.probability} must be in (0, 1)")
        for key in ("mask_replace_prob", "random_replace_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                errors.append(f"fill-mask.{key}: {getattr(self, key)} must be in [0, 1]")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            errors.append(
                "fill-mask.mask_replace_prob + fill-mask.random_replace_prob must be <= 1"
            )
        if self.whole_word and self.mask_replace_prob != 1.0:
            # The library's whole-word masking replaces every chosen token with the mask token.
            errors.append(
                "fill-mask.whole_word: true masks chosen words with the mask token only; set "
                "fill-mask.mask_replace_prob: 1.0 and fill-mask.random_replace_prob: 0.0"
            )
        if self.segmenter not in SEGMENTERS:
            errors.append(f"fill-mask.segmenter: {self.segmenter!r} is not one of {SEGMENTERS}")
        if self.user_words and self.segmenter != "jieba":
            errors.append("fill-mask.user_words is only read with fill-mask.segmenter: jieba")
        if self.segmenter and not self.whole_word:
            errors.append("fill-mask.segmenter is only read with fill-mask.whole_word: true")
        if not 0.0 <= self.salient_probability <= 1.0:
            errors.append(
                f"fill-mask.salient_probability: {self.salient_probability} must be in [0, 1]"
            )
        if not 0.0 <= self.salient_prefix_probability <= 1.0:
            errors.append(
                "fill-mask.salient_prefix_probability: "
                f"{self.salient_prefix_probability} must be in [0, 1]"
            )
        if self.salient_prefix_probability > 0 and not self.salient_words:
            errors.append(
                "fill-mask.salient_prefix_probability is only read with fill-mask.salient_words"
            )
        if bool(self.salient_words) != (self.salient_probability > 0):
            errors.append(
                "fill-mask.salient_words and fill-mask.salient_probability go together: a file of "
                "words and a probability > 0, or neither"
            )
        return errors


@dataclass(frozen=True)
class Finetune:
    epochs: float
    learning_rate: float
    batch_size: int
    eval_batch_size: int
    weight_decay: float
    warmup_steps: int
    early_stopping_patience: int
    max_train_samples: int
    threads: int
    logging_steps: int
    layer_lr_decay: float
    precision: str

    def check(self) -> list[str]:
        errors = []
        if self.precision not in precision.PRECISIONS:
            errors.append(
                f"finetune.precision: {self.precision!r} must be one of "
                f"{', '.join(precision.PRECISIONS)}"
            )
        if not 0.0 < self.layer_lr_decay <= 1.0:
            errors.append(f"finetune.layer_lr_decay: {self.layer_lr_decay} must be in (0, 1]")
        if not 0.0 < self.learning_rate < 1.0:
            errors.append(f"finetune.learning_rate: {self.learning_rate} must be in (0, 1)")
        if self.epochs <= 0:
            errors.append(f"finetune.epochs: {self.epochs} must be > 0")
        for key in ("batch_size", "eval_batch_size", "logging_steps"):
            if getattr(self, key) <= 0:
                errors.append(f"finetune.{key}: {getattr(self, key)} must be > 0")
        for key in ("warmup_steps", "early_stopping_patience", "max_train_samples", "threads"):
            if getattr(self, key) < 0:
                errors.append(f"finetune.{key}: {getattr(self, key)} must be >= 0")
        return errors


@dataclass(frozen=True)
class Evaluate:
    batch_size: int
    ece_bins: int
    top_mistakes: int

    def check(self) -> list[str]:
        errors = []
        if self.batch_size <= 0:
            errors.append("evaluate.batch_size must be > 0")
        if self.ece_bins < 2:
            errors.append(f"evaluate.ece_bins: {self.ece_bins} must be >= 2")
        return errors


@dataclass(frozen=True)
class Export:
    opset: int
    parity_atol: float
    batch_size: int
    variants: list[str]
    min_agreement: float
    max_metric_drop: float
    int8_search_agreement: float
    int8_smooth_alpha: float
    int8_sensitivity_rows: int

    def check(self) -> list[str]:
        errors = []
        if self.int8_sensitivity_rows < 0:
            errors.append(
                f"export.int8_sensitivity_rows: {self.int8_sensitivity_rows} must be >= 0 "
                "(0: every validation window)"
            )
        if not 0.0 <= self.int8_smooth_alpha <= 1.0:
            errors.append(f"export.int8_smooth_alpha: {self.int8_smooth_alpha} must be in [0, 1]")
        if not 0.0 <= self.int8_search_agreement <= 1.0:
            errors.append(
                f"export.int8_search_agreement: {self.int8_search_agreement} must be in [0, 1]"
            )
        unknown = [v for v in self.variants if v not in OPTIONAL_VARIANTS]
        if unknown:
            errors.append(f"export.variants: {unknown} not among {list(OPTIONAL_VARIANTS)}")
        if not 0.0 < self.min_agreement <= 1.0:
            errors.append(f"export.min_agreement: {self.min_agreement} must be in (0, 1]")
        if not 0.0 <= self.max_metric_drop < 1.0:
            errors.append(f"export.max_metric_drop: {self.max_metric_drop} must be in [0, 1)")
        if not 14 <= self.opset <= 21:
            errors.append(f"export.opset: {self.opset} must be between 14 and 21")
        if not 0.0 < self.parity_atol <= 1e-2:
            errors.append(f"export.parity_atol: {self.parity_atol} must be in (0, 0.01]")
        return errors


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str

    def check(self) -> list[str]:
        return [] if self.experiment.strip() else ["tracking.experiment must not be empty"]


# A stage that reads its task's section lists this, in dvc.yaml as in its SECTIONS: DVC resolves
# it from params.yaml, so a stage depends on the section of the task it runs, not on the others.
TASK_SECTION = "${base.task}"

SECTIONS: dict[str, type] = {
    "base": Base,
    "ingest": Ingest,
    "validate": Validate,
    "tokenize": Tokenize,
    # What one task alone reads sits in a section named after the task (Python: p.fill_mask).
    TEXT_CLASSIFICATION: LongText,
    TOKEN_CLASSIFICATION: Tagging,
    FILL_MASK: Masking,
    "finetune": Finetune,
    "evaluate": Evaluate,
    "export": Export,
    "tracking": Tracking,
}


@dataclass(frozen=True)
class Params:
    """The sections one stage reads, each a checked frozen dataclass.

    Args:
        path: where they were read from (a file, or a name such as "params" for a dict).
    """

    path: Path
    sections: dict[str, Any] = field(default_factory=dict)

    def select(self, *names: str) -> Params:
        """Only the named sections (a stage's own), so that what it records and fingerprints
        does not depend on what else the caller loaded."""
        task = self.sections["base"].task if "base" in self.sections else None
        wanted = [task if name == TASK_SECTION else name for name in names]
        missing = [str(name) for name in wanted if name not in self.sections]
        if missing:
            raise ParamsError(
                f"{self.path}: missing section(s) {', '.join(missing)}; this stage reads "
                f"{', '.join(map(str, wanted))}"
            )
        return Params(self.path, {name: self.sections[name] for name in wanted})

    def with_section(self, name: str, raw: Any, where: str | Path) -> Params:
        """These params and the section `name` checked from `raw` (as an artifact recorded it)."""
        return Params(self.path, {**self.sections, name: _section(Path(where), name, raw)})

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        for key in (name, name.replace("_", "-")):  # p.fill_mask is the section "fill-mask"
            if key in sections:
                return sections[key]
        raise AttributeError(f"params section {name!r} was not loaded")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(value) for name, value in self.sections.items()}

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, the shape MLflow params take."""
        return {
            f"{name}.{key}": value
            for name, section in self.as_dict().items()
            for key, value in section.items()
        }

    def digest(self, skip: tuple[str, ...] = ()) -> str:
        """sha256 of the loaded sections, canonical JSON; `skip` leaves out "section.key"s that
        a stage loads but whose value does not change its output."""
        data = self.as_dict()
        for dotted in skip:
            section, key = dotted.split(".", 1)
            data.get(section, {}).pop(key, None)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def _coerce(path: Path, where: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ParamsError(f"{path}: {where} must be a list, got {value!r}")
        return [_coerce(path, f"{where}[{i}]", item, inner) for i, item in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unsupported annotation for {where}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `5e-05` (no dot, as `dvc exp run -S` writes it) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ParamsError(
            f"{path}: {where} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _section(path: Path, name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: section {name!r} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ParamsError(
            f"{path}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"the section {name!r} takes {', '.join(known)}"
        )
    missing = [k for k in known if k not in raw]
    if missing:
        raise ParamsError(
            f"{path}: missing key(s) {', '.join(f'{name}.{k}' for k in missing)}; add them to "
            f"the {name!r} section (see the params.yaml shipped with the project)"
        )
    values = {k: _coerce(path, f"{name}.{k}", raw[k], hints[k]) for k in known}
    section = cls(**values)
    errors = section.check()
    if errors:
        raise ParamsError(f"{path}: " + "; ".join(errors))
    return section


def load(path: str | Path, *names: str) -> Params:
    """Load and check the named sections (all of them when none are named)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found; run from the project root") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return from_dict(raw, *names, where=path)


def from_dict(raw: Any, *names: str, where: str | Path = "params") -> Params:
    """Check the named sections of `raw` (params.yaml's shape) as `load` does: for a notebook
    or a test that runs a stage without a file of params."""
    path = Path(where)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}"
        )
    wanted = names or tuple(SECTIONS)
    if TASK_SECTION in wanted:
        base = raw.get("base")
        task = base.get("task") if isinstance(base, dict) else None
        if task not in TASKS:
            raise ParamsError(f"{path}: base.task {task!r} must be one of {list(TASKS)}")
        wanted = tuple(task if name == TASK_SECTION else name for name in wanted)
    for name in wanted:
        if name not in raw:
            raise ParamsError(f"{path}: missing section {name!r}")
    return Params(path=path, sections={name: _section(path, name, raw[name]) for name in wanted})
