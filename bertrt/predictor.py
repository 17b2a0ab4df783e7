"""Predictors over an exported model folder: tokenise, batch by length, run, restore order."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bertrt import manifest as manifest_io
from bertrt.contract import INPUT_NAMES, LABELS_FILE, TOKENIZER_FILE, VARIANT_FILES
from bertrt.session import CPU, DeviceError, start_session

log = logging.getLogger(__name__)

# Texts are tokenised and run this many at a time, so a list of millions never sits in memory
# as token ids all at once.
CHUNK = 4096
# A token is rarely longer than this many characters; cutting a huge string first keeps the
# tokenizer from spending seconds on text that truncation throws away.
CHARS_PER_TOKEN_CAP = 32


class ModelFolderError(ValueError):
    """A model folder that cannot be served."""


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score}
        if self.top_k is not None:
            out["top_k"] = [{"label": label, "score": score} for label, score in self.top_k]
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class TextClassifier:
    """Sequence classification over one ONNX Runtime session."""

    folder: Path
    manifest: dict[str, Any]
    variant: str
    session: Any
    provider: str
    tokenizer: Tokenizer
    labels: list[str]
    input_names: tuple[str, ...] = field(init=False)
    output_name: str = field(init=False)

    def __post_init__(self) -> None:
        declared = {i.name for i in self.session.get_inputs()}
        self.input_names = tuple(name for name in INPUT_NAMES if name in declared)
        self.output_name = self.manifest["outputs"][0]
        self.max_length = int(self.manifest["max_length"])
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        cap = self.max_length * CHARS_PER_TOKEN_CAP
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        return self.tokenizer.encode_batch([text[:cap] for text in texts])

    def _feeds(self, encodings: list[Any]) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        pad_id = int(self.manifest.get("pad_token_id", 0))
        ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names}

    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start of chunk, logits in the chunk's original order)."""
        from bertrt.session import run

        for start in range(0, len(texts), CHUNK):
            encodings = self._encode(texts[start : start + CHUNK])
            order = np.argsort([len(e.ids) for e in encodings], kind="stable")
            out = np.empty((len(encodings), len(self.labels)), dtype=np.float32)
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                feeds = self._feeds([encodings[i] for i in idx])
                out[idx] = run(self.session, feeds, self.output_name, self.provider)
            yield start, out

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Raw logits, one row per text, in the caller's order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        result = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for start, chunk in self._batches(list(texts), batch_size):
            result[start : start + len(chunk)] = chunk
        return result

    def predict(
        self, texts: Sequence[str], batch_size: int = 32, top_k: int | None = None
    ) -> list[Prediction]:
        """Label and softmax score per text; `top_k` adds the k best labels with scores."""
        if top_k is not None and not 1 <= top_k <= len(self.labels):
            raise ValueError(f"top_k must be between 1 and {len(self.labels)}, got {top_k}")
        probs = softmax(self.logits(texts, batch_size).astype(np.float64))
        best = probs.argmax(axis=-1)
        predictions = []
        for row, label_id in zip(probs, best, strict=True):
            ranked = None
            if top_k is not None:
                ids = np.argsort(-row, kind="stable")[:top_k]
                ranked = [(self.labels[i], float(row[i])) for i in ids]
            predictions.append(Prediction(self.labels[label_id], float(row[label_id]), ranked))
        return predictions

    def metadata(self) -> dict[str, Any]:
        return {
            "task": self.manifest["task"],
            "labels": self.labels,
            "variant": self.variant,
            "provider": self.provider,
            "max_length": self.max_length,
            "metrics": self.manifest.get("metrics", {}),
            "base_model": self.manifest.get("base_model", {}),
        }


def choose_variant(manifest: dict[str, Any], provider: str, variant: str | None) -> str:
    """The asked-for variant, else the best shipped one for the provider."""
    shipped = manifest.get("variants", {})
    if variant is not None:
        if variant not in shipped:
            raise ModelFolderError(
                f"variant {variant!r} is not shipped in this folder; shipped: {sorted(shipped)}"
            )
        return variant
    preference = ["fp32-optimized", "fp32"] if provider == CPU else ["fp16", "fp32-optimized"]
    for name in [*preference, "fp32"]:
        if name in shipped:
            return name
    raise ModelFolderError(f"manifest lists no variant; shipped: {sorted(shipped)}")


def _path(folder: Path, manifest: dict[str, Any], variant: str) -> Path:
    return folder / manifest["variants"][variant]["file"]


def load(
    model_dir: str | Path,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
) -> TextClassifier:
    """Open an exported model folder on `device` ("auto", "cuda" or "cpu").

    Args:
        variant: "fp32", "fp32-optimized", "fp16" or "int8"; by default the best shipped one for
            the provider (fp16 on CUDA, optimised fp32 on CPU).
        threads: intra-op threads on CPU; 0 lets ONNX Runtime decide.
        tensorrt: try TensorRT before CUDA where it loads.
        verify: check every file's sha256 against the manifest first.
    """
    folder = Path(model_dir)
    manifest = manifest_io.read(folder)
    if manifest.get("task") != "text-classification":
        raise ModelFolderError(f"{folder}: task {manifest.get('task')!r} has no predictor yet")
    if verify:
        # Every listed file, and the files this runtime reads even if the manifest omits them.
        used = {TOKENIZER_FILE, LABELS_FILE}
        used |= {entry["file"] for entry in manifest.get("variants", {}).values()}
        manifest_io.verify(folder, manifest, sorted(used | set(manifest.get("files", {}))))
    # Start on the file the device would prefer; re-open if the provider changes the choice.
    wanted = choose_variant(manifest, CPU if device == "cpu" else "cuda", variant)
    try:
        session, provider = start_session(
            _path(folder, manifest, wanted), device, threads, tensorrt
        )
    except DeviceError:
        raise
    except Exception:
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
        )
    labels = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    log.info("loaded %s variant %s on %s", folder, chosen, provider)
    return TextClassifier(folder, manifest, chosen, session, provider, tokenizer, labels)


__all__ = ["VARIANT_FILES", "Prediction", "TextClassifier", "load"]
