"""Long documents: the exported classifier reading pseudo-reviews with each long-text strategy,
against a word 1-2-gram TF-IDF + logistic regression trained on the same training snippets.

The pseudo-reviews are built from the held-out splits: the snippets of one movie that share a
label, in a seeded order, `--snippets` at a time (hundreds of tokens each). Their movies are
never in training (ingest keeps a movie on one side of the split). Strategies and the
baseline's C are chosen on the validation documents; the test documents are reported.

    python -m benchmarks.long_documents --raw data/raw --model-dir models/onnx \
        --out docs/benchmarks.md --json reports/long_documents.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import measure, report
from pipeline.core import layout

HEADING = "Long documents (CPU)"
READINGS = [
    {"strategy": "truncate"},
    {"strategy": "head+tail", "head_fraction": 0.25},
    {"strategy": "head+tail", "head_fraction": 0.5},
    {"strategy": "windows", "stride": 0, "aggregate": "mean"},
    {"strategy": "windows", "stride": 32, "aggregate": "mean"},
    {"strategy": "windows", "stride": 32, "aggregate": "max"},
]


def documents(
    df: pd.DataFrame, text: str, label: str, group: str, snippets: int, seed: int
) -> pd.DataFrame:
    """Pseudo-reviews: per (group, label), its rows shuffled with `seed` and joined
    `snippets` at a time; a last piece shorter than half of that is left out."""
    rng = np.random.default_rng(seed)
    rows = []
    for (name, value), part in sorted(df.groupby([group, label], sort=True), key=lambda x: x[0]):
        texts = part[text].astype(str).tolist()
        order = rng.permutation(len(texts))
        for start in range(0, len(texts), snippets):
            piece = [texts[i] for i in order[start : start + snippets]]
            if len(piece) >= max(1, snippets // 2):
                rows.append({"text": " ".join(piece), "label": str(value), "group": name})
    return pd.DataFrame(rows, columns=["text", "label", "group"])


def baseline(
    train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, snippets: pd.DataFrame
) -> dict[str, Any]:
    """TF-IDF (word 1-2-grams) + logistic regression on the training snippets; C by validation
    accuracy; scored on the test documents and on the test snippets themselves."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    best: dict[str, Any] = {}
    for c in (0.3, 1.0, 3.0, 10.0):
        model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            LogisticRegression(C=c, max_iter=2000),
        )
        model.fit(train["text"], train["label"])
        val_acc = float((model.predict(val["text"]) == val["label"]).mean())
        if not best or val_acc > best["validation_accuracy"]:
            best = {"C": c, "validation_accuracy": val_acc, "model": model}
    model = best.pop("model")
    predicted = np.asarray(model.predict(test["text"]))
    truth = test["label"].to_numpy()
    on_snippets = scores(snippets["label"].to_numpy(), np.asarray(model.predict(snippets["text"])))
    return {
        **best,
        **scores(truth, predicted),
        "test_right": int((predicted == truth).sum()),
        "snippet_accuracy": on_snippets["accuracy"],
    }


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {
        "accuracy": float((truth == predicted).mean()),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
    }


def classify(model: Any, texts: list[str], batch_size: int) -> tuple[np.ndarray, float, float]:
    """(labels, windows per text, texts per second) with the model's current reading."""
    windows = model.engine.encode(texts)
    start = time.perf_counter()
    predicted = np.asarray([p.label for p in model.predict(texts, batch_size=batch_size)])
    seconds = time.perf_counter() - start
    return predicted, float(np.mean([len(w) for w in windows])), len(texts) / seconds


def run(raw: Path, params_path: Path, model_dir: Path, snippets: int, batch_size: int) -> dict:
    from tokenizers import Tokenizer

    import bertrt
    from bertrt.long_text import Reading
    from pipeline.core import params

    p = params.load(params_path, "base", "ingest")
    text, label, group = p.base.text_column, p.base.label_column, p.ingest.group_column
    splits = {s: pd.read_parquet(layout.split_file(raw, s)) for s in layout.SPLITS}
    for name, df in splits.items():
        keep = ~df[label].astype(str).isin(p.ingest.drop_labels) & df[text].notna()
        splits[name] = df[keep]
    docs = {
        s: documents(splits[s], text, label, group, snippets, p.base.seed)
        for s in ("validation", "test")
    }
    snippet_train = pd.DataFrame({"text": splits["train"][text], "label": splits["train"][label]})
    test_snippets = pd.DataFrame({"text": splits["test"][text], "label": splits["test"][label]})
    tfidf = baseline(snippet_train, docs["validation"], docs["test"], test_snippets)

    model = bertrt.load(model_dir, device="cpu")
    shipped = model.engine.reading
    whole = Tokenizer.from_str(model.engine.tokenizer.to_str())
    whole.no_truncation()
    tokens = [len(e.ids) for e in whole.encode_batch(docs["test"]["text"].tolist())]
    rows = []
    for spec in READINGS:
        reading = Reading(**spec)
        model.engine.read_as(reading)
        row: dict[str, Any] = {"reading": describe(reading)}
        for split, df in docs.items():
            predicted, per_doc, speed = classify(model, df["text"].tolist(), batch_size)
            result = scores(df["label"].to_numpy(), predicted)
            row[f"{split}_accuracy"] = result["accuracy"]
            row[f"{split}_right"] = int((predicted == df["label"].to_numpy()).sum())
            if split == "test":
                row.update(test_macro_f1=result["macro_f1"], windows=per_doc, docs_per_s=speed)
        rows.append(row)
    model.engine.read_as(shipped)
    on_snippets = [p.label for p in model.predict(test_snippets["text"].astype(str).tolist())]
    snippet_accuracy = float((np.asarray(on_snippets) == test_snippets["label"].to_numpy()).mean())
    chosen = max(rows, key=lambda r: r["validation_accuracy"])
    return {
        "snippets_per_document": snippets,
        "documents": {s: len(df) for s, df in docs.items()},
        "test_tokens": {
            "p50": float(np.percentile(tokens, 50)),
            "max": int(max(tokens)),
            "over_max_length": float(np.mean(np.asarray(tokens) > model.engine.max_length)),
        },
        "max_length": model.engine.max_length,
        "variant": model.variant,
        "model_sha256": (
            model.manifest.provenance.finetuned_sha256[:12] if model.manifest.provenance else None
        ),
        "readings": rows,
        "chosen_on_validation": chosen["reading"],
        "tfidf": tfidf,
        "snippets": {"test": len(test_snippets), "model_accuracy": snippet_accuracy},
        "chosen_vs_tfidf_test_accuracy": chosen["test_accuracy"] - tfidf["accuracy"],
    }


def describe(reading: Any) -> str:
    if reading.strategy == "head+tail":
        return f"head+tail ({reading.head_fraction:.0%} head)"
    if reading.strategy == "windows":
        return f"windows, stride {reading.stride}, {reading.aggregate}"
    return reading.strategy


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    tfidf = data["tfidf"]
    rows = [
        *data["readings"],
        {
            "reading": f"TF-IDF 1-2-gram + logistic regression (C={tfidf['C']})",
            "validation_accuracy": tfidf["validation_accuracy"],
            "test_accuracy": tfidf["accuracy"],
            "test_right": tfidf["test_right"],
            "test_macro_f1": tfidf["macro_f1"],
        },
    ]
    tokens = data["test_tokens"]
    return "\n".join(
        [
            f"Measured with `{command}` on {machine['cpu']} "
            f"(flags: {', '.join(machine['cpu_flags'])}).",
            "",
            f"- {data['documents']['validation']} validation and {data['documents']['test']} "
            f"test pseudo-reviews of {data['snippets_per_document']} snippets (one movie, one "
            f"label); test documents: median {tokens['p50']:.0f} tokens, longest "
            f"{tokens['max']}, {tokens['over_max_length']:.0%} over the model's "
            f"{data['max_length']}.",
            f"- Model `{data['model_sha256']}` ({data['variant']}); the reading is switched on "
            "the same graph. TF-IDF is trained on the same training snippets.",
            f"- Chosen on validation: **{data['chosen_on_validation']}**; its test accuracy "
            f"minus TF-IDF's: {data['chosen_vs_tfidf_test_accuracy']:+.3f}.",
            f"- On the {data['snippets']['test']} single test snippets: the model "
            f"{data['snippets']['model_accuracy']:.3f}, TF-IDF {tfidf['snippet_accuracy']:.3f}.",
            "",
            report.table(
                rows,
                {
                    "reading": "reading",
                    "windows": "windows / doc",
                    "validation_accuracy": "validation acc.",
                    "test_accuracy": "test acc.",
                    "test_right": "test docs right",
                    "test_macro_f1": "test macro-F1",
                    "docs_per_s": "docs / s",
                },
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/onnx"))
    parser.add_argument("--snippets", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/long_documents.json"))
    args = parser.parse_args(argv)
    data = run(args.raw, args.params, args.model_dir, args.snippets, args.batch_size)
    report.publish(
        "benchmarks.long_documents", argv, HEADING, data, measure.machine(), args.out, args.json
    )
    for row in data["readings"]:
        print(
            f"{row['reading']:<32} val {row['validation_accuracy']:.3f}  "
            f"test {row['test_accuracy']:.3f}"
        )
    print(f"TF-IDF test {data['tfidf']['accuracy']:.3f}; chosen: {data['chosen_on_validation']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
