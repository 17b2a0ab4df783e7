"""Masked language modelling: adapt or pretrain an encoder on text, and teach it new fills."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bertrt.predictors import FILL_MASK
from pipeline.core.params import Params
from pipeline.core.sources import from_pretrained, load_options, resolve_model, resolve_path
from pipeline.core.tables import SPLITS, table_format, text_key
from pipeline.tasks.base import Task
from pipeline.tasks.masked_lm import corpus, masks, scoring, sparse_head
from pipeline.tasks.percentiles import percentiles

log = logging.getLogger(__name__)
TEXT = "text"
ANSWER = "answer"  # non-empty only on probe rows (test split)
KIND = "kind"  # a probe's group in the report ("name", "fact", "control", ...); may be empty
AVOID = "avoid"  # characters a probe's fill must not bring in (see corpus.read_probes)
PIECE = "piece"  # >0 on the later pieces of a line longer than validate.max_line_chars
EXPORT_TEXTS = 32  # held-out lines export checks parity on (each output row is vocabulary-wide)


def is_probe(df: pd.DataFrame) -> pd.Series:
    return df[ANSWER].astype(str) != "" if ANSWER in df else pd.Series(False, index=df.index)


def failure(file: Path, row: int, column: str, reason: str, value: Any = None) -> dict[str, Any]:
    return {"file": str(file), "row": row, "column": column, "reason": reason, "value": value}


class MaskedLM(Task):
    name = FILL_MASK
    columns = (TEXT, ANSWER)
    selection_metric = "loss"
    greater_is_better = False
    gate_metric = "fill_accuracy"
    headline = ("perplexity", "perplexity_change", "masked_accuracy", "probe_top1")
    long_inputs = "cut into blocks (tokenize.group_texts) or truncated"
    reads_folders = True
    validates_on_train = True
    remove_unused_columns = False
    trains_with_section = True

    # ingest ---------------------------------------------------------------------------------
    def accepts(self, path: Path) -> bool:
        return corpus.is_text_file(path) or table_format(path) is not None

    def read(self, path: Path, p: Params) -> pd.DataFrame:
        return corpus.read_corpus(path, p.base.text_column, p.ingest.text_format)

    def clean(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        text = p.base.text_column
        dropped: dict[str, int] = {}
        empty = df[text].isna() | (df[text].astype("string").str.strip() == "")
        dropped["empty_text"] = int(empty.sum())
        df = df[~empty]
        if p.ingest.deduplicate:
            duplicate = text_key(df[text]).duplicated(keep="first")
            dropped["duplicate_text"] = int(duplicate.sum())
            df = df[~duplicate]
        return df.reset_index(drop=True), dropped

    def key(self, df: pd.DataFrame, p: Params) -> pd.Series:
        return text_key(df[p.base.text_column])

    def finish_splits(self, frames: dict[str, pd.DataFrame], p: Params) -> dict[str, pd.DataFrame]:
        text = p.base.text_column
        frames = {k: v.assign(**{ANSWER: "", KIND: "", AVOID: ""}) for k, v in frames.items()}
        if p.ingest.probes:
            path = resolve_path(p.ingest.probes, "ingest.probes")
            probes = corpus.read_probes(path).rename(columns={"text": text})
            if probes[text].str.contains(corpus.PLACEHOLDER, regex=False).any():
                probes[text] = corpus.with_mask_token(probes[text], mask_token(p))
            probes = probes.assign(source_file=path.name)
            frames["test"] = pd.concat([frames["test"], probes], ignore_index=True)
        return frames

    def label_counts(self, df: pd.DataFrame, p: Params) -> dict[str, int]:
        probes = int(is_probe(df).sum())
        return {"texts": len(df) - probes, "probes": probes}

    # validate -------------------------------------------------------------------------------
    def check(
        self, frames: dict[str, pd.DataFrame], files: dict[str, Path], p: Params
    ) -> tuple[list[str], list[dict[str, Any]]]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model(p.base.model), **load_options(p.base.trust_remote_code, weights=False)
        )
        mask = tokenizer.mask_token
        text = p.base.text_column
        found: list[dict[str, Any]] = []
        for split in SPLITS:
            df, file = frames[split], files[split]
            if text not in df:
                found.append(failure(file, 0, text, f"no column {text!r} (base.text_column)"))
                continue
            texts = df[text].astype("string").fillna("")
            if not (texts.str.strip() != "").any():
                found.append(failure(file, 0, text, f"the {split} corpus has no text"))
            for i in np.flatnonzero(is_probe(df).to_numpy()):
                row, probe, answer = int(i) + 1, str(df[text].iloc[i]), str(df[ANSWER].iloc[i])
                masks = probe.count(mask) if mask else 0
                wanted = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
                if not masks:
                    found.append(failure(file, row, text, f"probe has no {mask}", probe))
                elif masks != wanted:
                    found.append(
                        failure(
                            file,
                            row,
                            ANSWER,
                            f"probe has {masks} {mask} but its answer is {wanted} token(s); "
                            f"write one {mask} per token of the answer",
                            answer,
                        )
                    )
        return [], found

    def validated(self, df: pd.DataFrame, p: Params) -> pd.DataFrame:
        rows = []
        blank = pd.Series("", index=df.index)
        answers, kinds, avoids = (
            df[c].fillna("") if c in df else blank for c in (ANSWER, KIND, AVOID)
        )
        for text, answer, kind, avoid in zip(
            df[p.base.text_column].astype(str), answers, kinds, avoids, strict=True
        ):
            pieces = [text] if answer else corpus.split_long(text, p.validate.max_line_chars)
            probe = {ANSWER: str(answer), KIND: str(kind), AVOID: str(avoid)}
            rows += [{TEXT: t, **probe, PIECE: i} for i, t in enumerate(pieces)]
        columns = [TEXT, ANSWER, KIND, AVOID, PIECE]
        return pd.DataFrame(rows, columns=columns).astype({PIECE: "int64"})

    def split_stats(self, df: pd.DataFrame, tokenizer: Any, p: Params) -> dict[str, Any]:
        texts = df.loc[~is_probe(df), TEXT].tolist()
        tokens = np.array([len(i) for i in tokenizer(texts)["input_ids"]]) if texts else []
        return {
            "rows": len(texts),
            "probes": int(is_probe(df).sum()),
            "lines_split": int((df[PIECE] == 1).sum()),
            "pieces_added": int((df[PIECE] > 0).sum()),
            "chars": percentiles([len(t) for t in texts]),
            "tokens": percentiles(tokens),
            "total_tokens": int(np.sum(tokens)) if len(tokens) else 0,
            "over_max_length": int((np.asarray(tokens) > p.base.max_length).sum()),
        }

    # tokenize -------------------------------------------------------------------------------
    def tokenize(
        self,
        dataset: Any,
        tokenizer: Any,
        labels: list[str],
        p: Params,
        fingerprint: str,
        split: str = "train",
    ) -> tuple[Any, dict[str, Any]]:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"base.model {p.base.model!r}: its tokenizer has no mask token")
        table = dataset.to_pandas()
        check_answers(table[is_probe(table)], tokenizer)
        texts = dataset.select(np.flatnonzero(~is_probe(table).to_numpy()))
        seed = p.base.seed + SPLITS.index(split)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch[TEXT], add_special_tokens=False, return_offsets_mapping=True)
            rows = masks.blocks(
                enc,
                batch[TEXT],
                tokenizer,
                p.base.max_length,
                p.tokenize.group_texts,
                p.fill_mask,
            )
            if split != "train":
                return masks.mask_once(rows, tokenizer, p.fill_mask, seed)
            if not p.fill_mask.whole_word:
                rows.pop("offset_mapping")
            return rows

        out = texts.map(
            encode,
            batched=True,
            batch_size=max(len(texts), 1),  # one batch: blocks run across every line
            remove_columns=texts.column_names,
            new_fingerprint=fingerprint,
            desc="tokenizing",
        )
        lengths = [len(ids) for ids in out["input_ids"]]
        stats = {"rows": len(texts), "blocks": len(out), "tokens": int(sum(lengths))}
        if split != "train":
            stats["masked_tokens"] = int(
                sum((np.asarray(x) != masks.IGNORE).sum() for x in out["labels"])
            )
        return out, stats

    # finetune -------------------------------------------------------------------------------
    def model_class(self) -> Any:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM

    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        return {}

    def collator(self, tokenizer: Any, p: Params) -> Any:
        return masks.MaskingCollator(tokenizer, p.fill_mask)

    def prepare_training(self, model: Any) -> None:
        sparse_head.install(model)  # the vocabulary-wide head runs on masked positions only

    def reduce_logits(self) -> Any:
        return sparse_head.scatter

    def compute_metrics(self, labels: list[str]) -> Any:
        def accuracy(eval_pred: Any) -> dict[str, float]:
            predicted, truth = (np.asarray(x) for x in eval_pred)
            where = truth != masks.IGNORE
            return {
                "accuracy": float((predicted[where] == truth[where]).mean())
                if where.any()
                else 0.0
            }

        return accuracy

    def training_summary(self, dataset: Any) -> pd.DataFrame:
        return pd.DataFrame({"n_tokens": [len(x) for x in dataset["input_ids"]]})

    # evaluate -------------------------------------------------------------------------------
    def predict(self, model_dir: Path, dataset: Any, test: pd.DataFrame, p: Params) -> Any:
        """Scores of the fine-tuned model and of base.model (before) on the held-out blocks and
        the probes."""
        from transformers import AutoTokenizer, DataCollatorForTokenClassification

        out: dict[str, Any] = {}
        probes = test[is_probe(test)]
        largest = max((max(ids) for ids in dataset["input_ids"]), default=-1)
        for name, folder in (("after", model_dir), ("before", resolve_model(p.base.model))):
            trust = p.base.trust_remote_code
            tokenizer = AutoTokenizer.from_pretrained(folder, **load_options(trust, False))
            model = from_pretrained(self.model_class(), folder, trust)
            # Held-out blocks carry their masks and labels: the collator only pads them. A model
            # without an embedding for a token the tokenize stage added cannot read them.
            fits = largest < model.get_input_embeddings().num_embeddings
            pad = DataCollatorForTokenClassification(tokenizer)
            out[name] = (
                scoring.heldout_scores(model, dataset, pad, p.evaluate.batch_size)
                if fits
                else None
            )
            out[f"probes_{name}"] = scoring.probe_fills(model, tokenizer, probes)
        return out

    def evaluate(
        self,
        predictions: Any,
        dataset: Any,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        plots_dir: Path,
        validation: Any = None,
    ) -> dict[str, Any]:
        after, before = predictions["after"], predictions["before"]
        overall: dict[str, Any] = {
            "perplexity": scoring.perplexity(after),
            "masked_accuracy": after["top1"] / max(after["count"], 1),
            "masked_top5": after["top5"] / max(after["count"], 1),
            "masked_tokens": int(after["count"]),
            "rows": len(dataset),
        }
        if before is not None:
            overall["perplexity_before"] = scoring.perplexity(before)
            overall["perplexity_change"] = overall["perplexity"] / overall["perplexity_before"] - 1
            overall["masked_accuracy_before"] = before["top1"] / max(before["count"], 1)
        probes = test[is_probe(test)].reset_index(drop=True)
        fills, fills_before = predictions["probes_after"], predictions["probes_before"]
        if len(probes):
            multi = np.array([f["masks"] > 1 for f in fills])
            for key, rows in (("", fills), ("_before", fills_before)):
                ok1 = np.array([f["top1_ok"] for f in rows])
                overall[f"probe_top1{key}"] = float(ok1.mean())
                for strategy in ("greedy", "beam"):
                    right = [f[f"{strategy}_ok"] for f in rows]
                    overall[f"probe_top1_{strategy}{key}"] = float(np.mean(right))
                overall[f"probe_top5{key}"] = float(np.mean([f["top5_ok"] for f in rows]))
                for part, where in (("single", ~multi), ("multi", multi)):
                    if where.any():
                        overall[f"probe_top1_{part}{key}"] = float(ok1[where].mean())
            overall["probes"] = len(probes)
            overall.update(probe_groups(probes, fills, fills_before))
        pd.DataFrame(
            {
                "text": probes[TEXT] if len(probes) else [],
                "answer": probes[ANSWER] if len(probes) else [],
                "before": [f["fill"] for f in fills_before],
                "after": [f["fill"] for f in fills],
                "right_before": [f["top1_ok"] for f in fills_before],
                "right_after": [f["top1_ok"] for f in fills],
                "after_greedy": [f["greedy"] for f in fills],
                "right_after_greedy": [f["greedy_ok"] for f in fills],
                "after_beam": [f["beam"] for f in fills],
                "right_after_beam": [f["beam_ok"] for f in fills],
                "top5_after": [" | ".join(f["top5"]) for f in fills],
                "kind": column(probes, KIND),
                "brings_in_avoided": [
                    brings_in(f["beam"], a, answer)
                    for f, a, answer in zip(
                        fills, column(probes, AVOID), probes[ANSWER], strict=True
                    )
                ],
            }
        ).to_csv(plots_dir / "probes.csv", index=False)
        return {"overall": overall}

    # export ---------------------------------------------------------------------------------
    def output_labels(self, config: Any) -> list[str]:
        return []

    def texts(self, test: pd.DataFrame) -> list[str]:
        return test[TEXT].tolist()

    def export_texts(self, test: pd.DataFrame) -> list[str]:
        probes = is_probe(test)
        return [*test.loc[probes, TEXT], *test.loc[~probes, TEXT].head(EXPORT_TEXTS)]

    def score(
        self,
        windows: list[list[Any]],
        outputs: np.ndarray,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        tokenizer: Any = None,
    ) -> float:
        """Probe top-1 accuracy (every mask right); without probes, how often each held-out
        token is the best fill of its own place."""
        probes = test[is_probe(test)]
        if not len(probes):
            hits = [
                outputs[i, : len(w[0].ids)].argmax(-1) == np.asarray(w[0].ids)
                for i, w in enumerate(windows)
            ]
            return float(np.concatenate(hits).mean()) if hits else 0.0
        right = 0
        for i, answer in enumerate(probes[ANSWER]):
            ids = np.asarray(windows[i][0].ids)
            where = np.flatnonzero(ids == tokenizer.mask_token_id)
            truth = tokenizer(answer, add_special_tokens=False)["input_ids"]
            right += outputs[i, where].argmax(-1).tolist() == truth
        return right / len(probes)


def column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name].fillna("").astype(str) if name in df else pd.Series("", index=df.index)


def brings_in(fill: str, avoid: str, answer: str) -> bool:
    """Whether `fill` holds a character of `avoid` that the right answer does not (a control
    probe about Li Bai filled 李涛 brings in the taught name's 涛)."""
    return bool(set(fill) & (set(avoid) - set(answer)))


def probe_groups(
    probes: pd.DataFrame, fills: list[dict[str, Any]], before: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per probe kind, how many probes and how many the runtime's beam search fills right
    (before and after); over the probes with an `avoid`, how many fills bring its characters
    in. The beam search is the runtime's default way to fill consecutive masks."""
    out: dict[str, Any] = {}
    kinds = column(probes, KIND).to_numpy()
    for kind in sorted(set(kinds) - {""}):
        where = np.flatnonzero(kinds == kind)
        out[f"probes_{kind}"] = len(where)
        out[f"probe_right_{kind}"] = int(sum(fills[i]["beam_ok"] for i in where))
        out[f"probe_right_{kind}_before"] = int(sum(before[i]["beam_ok"] for i in where))
    avoid, answers = column(probes, AVOID).to_numpy(), probes[ANSWER].astype(str).to_numpy()
    guarded = np.flatnonzero(avoid != "")
    if len(guarded):
        out["probes_guarded"] = len(guarded)
        for key, rows in (("", fills), ("_before", before)):
            out[f"probe_brings_in_avoided{key}"] = int(
                sum(brings_in(rows[i]["beam"], avoid[i], answers[i]) for i in guarded)
            )
    return out


def mask_token(p: Params) -> str:
    """The mask token of base.model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(p.base.model), **load_options(p.base.trust_remote_code, weights=False)
    )
    if tokenizer.mask_token is None:
        raise ValueError(f"base.model {p.base.model!r}: its tokenizer has no mask token")
    return str(tokenizer.mask_token)


def check_answers(probes: pd.DataFrame, tokenizer: Any) -> None:
    """Probe answers must be tokens the model can produce (after any vocabulary extension)."""
    for i, answer in enumerate(probes[ANSWER]):
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id in ids:
            raise ValueError(
                f"probe {i + 1} (test split): its answer {answer!r} tokenizes to "
                f"{tokenizer.unk_token}; the model cannot fill it. Use a tokenizer that knows "
                "these characters, or add them with tokenize.vocab_extension_min_count (they "
                "must occur that often in the training text)"
            )
