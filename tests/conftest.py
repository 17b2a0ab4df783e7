"""Offline fixtures: a tiny BERT with a tokenizer trained on the fly, and small labeled data."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# `slow` means what it says (tests/slow_work.py); long modules start first (tests/module_order.py).
pytest_plugins = ["slow_work", "module_order"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once every test module is imported (torch, transformers, MLflow and the rest), their
    objects live as long as the run: frozen, the collector's full passes stop walking them again
    each time the tests' own objects pile up."""
    gc.collect()
    gc.freeze()


def _restoring_mlflow_environment() -> Iterator[None]:
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="module")
def _own_mlflow_store_per_module() -> Iterator[None]:
    """The same for what module fixtures (a pipeline run once per module) leave behind."""
    yield from _restoring_mlflow_environment()


@pytest.fixture(autouse=True)
def _own_mlflow_store() -> Iterator[None]:
    """MLflow writes the store and experiment it was pointed at into the environment, where they
    would win over the next test's params; each test starts from the environment it was given."""
    yield from _restoring_mlflow_environment()


POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "superb",
    "delightful",
    "moving",
    "brilliant",
    "fun",
    "charming",
]
NEGATIVE = [
    "bad",
    "awful",
    "boring",
    "dull",
    "terrible",
    "tedious",
    "clumsy",
    "weak",
    "bland",
    "messy",
]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "story",
    "plot",
    "actor",
    "scene",
    "script",
    "director",
    "cast",
    "was",
    "is",
    "and",
    "a",
    "of",
    "it",
]


def synthetic_reviews(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short review-like texts whose label follows from their sentiment words."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["fresh", "rotten"])
        words = rng.sample(NEUTRAL, rng.randint(3, 8))
        words += rng.sample(POSITIVE if label == "fresh" else NEGATIVE, rng.randint(1, 3))
        rng.shuffle(words)
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "category": label, "movie_name": f"movie {len(rows) // 3}"})
    return rows


def build_tiny_model(folder: Path, labels: tuple[str, ...] = ("fresh", "rotten")) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer trained on the synthetic words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The vocabulary is built in a fixed order rather than trained: WordPiece training breaks
    # ties differently from one process to the next, which changed token ids between runs.
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL))
    tokens = [*specials, *chars, *(f"##{c}" for c in chars), *words]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    import torch

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def shared(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]
) -> Path:
    """The folder `name`, built by `build(folder)` once per test run: under pytest-xdist the
    first worker to ask builds it under a file lock in the run's base temp folder and the others
    wait for it. Tests read it; a test that changes it works on a copy. A build that failed
    leaves no folder behind, so the next worker to ask tries again and reports its own error."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared(tmp_path_factory, "tiny-model", build_tiny_model)


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model exported by the export stage's own functions (every shipped variant)."""
    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    def build(out: Path) -> None:
        texts = [r["text"] for r in synthetic_reviews(64, seed=1)]
        task = tasks.get("text-classification")
        options = ExportOptions(max_length=64, opset=17)
        model_folder.build(tiny_model_dir, out, task, texts, options)

    return shared(tmp_path_factory, "onnx-model", build)


@pytest.fixture
def model_copy(tmp_path: Path, onnx_model_dir: Path) -> Path:
    """A private copy of the exported folder that a test may tamper with."""
    dest = tmp_path / "model"
    shutil.copytree(onnx_model_dir, dest)
    return dest


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_params(folder: Path, overrides: dict[str, object] | None = None) -> Path:
    """The project's params.yaml with `section.key` overrides, written into `folder`."""
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    # Tiny models train in fp32 so that their numbers are the same on CPUs with and without
    # native bf16; tests that mean bf16 say so.
    data["finetune"]["precision"] = "fp32"
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """Parquet files `folder/{split}.parquet`, as the ingest stage writes them."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pd.DataFrame(rows).to_parquet(folder / f"{name}.parquet", index=False)
    return folder


PEOPLE = [["alice"], ["bob", "stone"], ["carol", "dune"], ["dave"]]
PLACES = [["paris"], ["new", "york"], ["oslo"], ["rome"]]


def synthetic_sentences(n: int, seed: int = 0) -> list[dict]:
    """IOB2-tagged sentences (`tokens`, `tags`) with PER and LOC entities among filler words."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        tokens, tags = [], []
        for _ in range(rng.randint(2, 4)):
            tokens += rng.sample(NEUTRAL, rng.randint(1, 3))
            tags += ["O"] * (len(tokens) - len(tags))
            kind, names = rng.choice([("PER", PEOPLE), ("LOC", PLACES)])
            name = rng.choice(names)
            tokens += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        key = " ".join(tokens)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def synthetic_corpus(n: int, seed: int = 0) -> list[dict]:
    """Review-like lines (`text`, empty `answer`) whose last 6 rows are probes: a sentence with
    [MASK] and the word it hides."""
    rows = [{"text": r["text"], "answer": ""} for r in synthetic_reviews(n - 6, seed)]
    probes = [("the [MASK] was good", "film"), ("a dull [MASK]", "plot")] * 3
    return rows + [{"text": text, "answer": answer} for text, answer in probes]


# Per registered task: tiny rows for train/validation/test and the params that read them.
TASK_DATA = {
    "text-classification": (
        lambda n, seed: synthetic_reviews(n, seed),
        {"base.text_column": "text", "base.label_column": "category"},
    ),
    "token-classification": (
        lambda n, seed: synthetic_sentences(n, seed),
        {
            "base.task": "token-classification",
            "base.text_column": "tokens",
            "base.label_column": "tags",
            "token-classification.stride": 4,
        },
    ),
    "fill-mask": (
        lambda n, seed: synthetic_corpus(n, seed),
        {"base.task": "fill-mask", "base.text_column": "text", "tokenize.group_texts": False},
    ),
}


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny encoder with a token-classification head, exported with windows of 8 tokens."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    def build(root: Path) -> None:
        labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
        torch.manual_seed(0)
        model = BertForTokenClassification.from_pretrained(
            tiny_model_dir,
            num_labels=5,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
        with torch.no_grad():  # random head weights large enough to tag some tokens as entities
            model.classifier.weight.normal_(0, 0.5)
        model.save_pretrained(root / "ft")
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "ft")
        texts = [" ".join(r["tokens"]) for r in synthetic_sentences(24, seed=9)]
        task = tasks.get("token-classification")
        options = ExportOptions(8, window_stride=2)
        model_folder.build(root / "ft", root / "onnx", task, texts, options)

    return shared(tmp_path_factory, "ner", build) / "onnx"


@pytest.fixture(scope="session")
def fill_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny encoder with a seeded masked-LM head, exported as a fill-mask folder."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    def build(root: Path) -> None:
        torch.manual_seed(0)
        model = BertForMaskedLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():  # a head sharp enough that fills differ from one context to another
            model.cls.predictions.transform.dense.weight.normal_(0, 1.0)
        model.save_pretrained(root / "ft")
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "ft")
        texts = [r["text"] for r in synthetic_reviews(12, seed=4)]
        texts.append("the [MASK] [MASK] was good")
        options = ExportOptions(32)
        model_folder.build(root / "ft", root / "onnx", tasks.get("fill-mask"), texts, options)

    return shared(tmp_path_factory, "fill", build) / "onnx"


def run_in(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """`cmd` in the repo `cwd` with this venv's tools first on PATH and no inherited MLflow
    store; its exit status is the caller's to judge."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env = {
        **base,
        **extra,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(cwd / ".dvc" / "tmp" / "site-cache"),
        "PIPELINE_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def answers(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """True once a GET of `url` gives 200 (a server's health path), tried every 0.2 s; False
    after `timeout` seconds, or as soon as `proc`, the server's process, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def sh(cmd: list[str], cwd: Path, **extra: str) -> str:
    done = run_in(cmd, cwd, **extra)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` (or `dvc exp run`) ran, in order, from what it printed."""
    return re.findall(r"Running stage '([a-z]+)'", output)


def build_pipeline_repo(root: Path, model: Path) -> Path:
    """A git + DVC repo at `root` with the project's pipeline, on `model` and 240 synthetic
    reviews, committed."""
    import pandas as pd

    for name in ("pipeline", "bertrt", "locks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "data" / "sources", root / "data" / "sources")
    (root / "sources").mkdir()
    pd.DataFrame(synthetic_reviews(240, seed=5)).to_csv(
        root / "sources" / "reviews.csv", index=False
    )
    write_params(
        root,
        {
            "base.model": str(model),
            "base.max_length": 32,
            "ingest.source": "sources/reviews.csv",
            "ingest.drop_labels": [],
            "finetune.epochs": 2,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 1e-3,
            "finetune.warmup_steps": 0,
            "finetune.logging_steps": 4,
            "finetune.max_train_samples": 0,
            "export.min_agreement": 0.9,
            "export.max_metric_drop": 0.1,
        },
    )
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@example.com"], root)
    sh(["git", "config", "user.name", "CI"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "pipeline"], root)
    return root


def copy_repo(src: Path, dest: Path) -> Path:
    """A private copy of the pipeline repo `src` at `dest`, for a test that changes it: files,
    git, DVC cache and MLflow store, whose absolute artifact locations (experiments, runs,
    registered versions) are re-pointed from `src` to `dest`."""
    shutil.copytree(src, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.is_file():
        old, new = str(src), str(dest)
        with closing(sqlite3.connect(db)) as con, con:
            listed = con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            tables = [row[0] for row in listed]
            for table in tables:
                for column in con.execute(f"PRAGMA table_info('{table}')").fetchall():
                    name, kind = column[1], str(column[2]).upper()
                    if "CHAR" in kind or "TEXT" in kind:
                        con.execute(
                            f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                            f'WHERE instr("{name}", ?) > 0',
                            (old, new, old),
                        )
    return dest


def make_key(folder: Path, name: str, password: bytes | None = None) -> tuple[Path, Path]:
    """A throwaway P-256 key pair as PEM files: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    private = folder / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    public = folder / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signing key pair ("private", "public") and another key's public half ("other")."""
    folder = tmp_path_factory.mktemp("keys")
    private, public = make_key(folder, "release")
    _, other = make_key(folder, "other")
    return {"private": private, "public": public, "other": other}


REPRO_LOG = "first-repro.log"


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The 240-review pipeline repo after its first `dvc repro` (every stage run, MLflow store
    at its root, a default DVC remote `remote` beside it), built once per test run; `REPRO_LOG`
    beside it holds what that repro printed. Read it as it is, or change a `copy_repo` of it."""

    def build(root: Path) -> None:
        repo = build_pipeline_repo(root / "repo", tiny_model_dir)
        # A default DVC remote committed before the run, as a team's repo has one; its absolute
        # path is shared by every copy (content-addressed, so their pushes never conflict).
        sh(["dvc", "remote", "add", "-d", "storage", str(root / "remote")], repo)
        sh(["git", "commit", "-qam", "a local remote"], repo)
        (root / REPRO_LOG).write_text(sh(["dvc", "repro"], repo), encoding="utf-8")

    return shared(tmp_path_factory, "reproduced", build) / "repo"
