"""Carrying files to the GPU machine in pieces: the plan, and the join that checks every piece
and the whole before it installs or unpacks anything."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_carry
from benchmarks.gpu_carry import MIB, CarryError


def carried(tmp_path: Path, name: str, data: bytes, piece_bytes: int, **entry: Any) -> Path:
    """A carry folder holding `data` as the file `name`, split into pieces, with its manifest."""
    carry = tmp_path / "carry"
    whole = tmp_path / "made" / name
    whole.parent.mkdir(parents=True, exist_ok=True)
    whole.write_bytes(data)
    bundle = {**gpu_carry.split(whole, carry, piece_bytes), "kind": "model", **entry}
    gpu_carry.write_manifest(carry, [bundle])
    return carry


def bundle_of(carry: Path) -> dict[str, Any]:
    return json.loads((carry / gpu_carry.MANIFEST).read_text())["bundles"][0]


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3000)
    return carried(tmp_path, "blob.bin", data, 1024), data


def test_pieces_join_into_the_same_bytes(blob: tuple[Path, bytes]) -> None:
    carry, data = blob
    bundle = bundle_of(carry)
    assert [p["bytes"] for p in bundle["pieces"]] == [1024, 1024, 952]
    assert [Path(p["file"]).name for p in bundle["pieces"]] == [
        "blob.bin.part01of03",
        "blob.bin.part02of03",
        "blob.bin.part03of03",
    ]
    assert bundle["sha256"] == hashlib.sha256(data).hexdigest()
    assert gpu_carry.join(carry, bundle).read_bytes() == data


def test_a_missing_piece_is_refused_with_its_name_and_the_command_that_carries_it(
    blob: tuple[Path, bytes],
) -> None:
    carry, _ = blob
    bundle = bundle_of(carry)
    (carry / bundle["pieces"][1]["file"]).unlink()
    with pytest.raises(CarryError) as refused:
        gpu_carry.join(carry, bundle)
    assert refused.value.missing_only
    assert str(refused.value) == (
        f"{carry}/pieces/01/blob.bin.part02of03: missing (piece 2 of 3 of blob.bin); carry it "
        "(command 1 of the plan that prepare printed), then run again"
    )
    assert not (carry / gpu_carry.WHOLE / "blob.bin").exists()
    # Waiting for a piece is not an error for receive, unless it is told all should be there.
    assert gpu_carry.main(["receive", "--dir", str(carry)]) == 0
    assert gpu_carry.main(["receive", "--dir", str(carry), "--complete"]) == 1


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), r"sha256 [0-9a-f]{16}…, the manifest says 952"),
        (lambda b: b[:-10], r"942 bytes, the manifest says 952 bytes"),
    ],
    ids=["one bit flipped", "truncated"],
)
def test_a_corrupted_piece_is_refused_with_its_name_and_the_fix(
    blob: tuple[Path, bytes], damage: Any, found: str
) -> None:
    carry, _ = blob
    bundle = bundle_of(carry)
    piece = carry / bundle["pieces"][2]["file"]
    piece.write_bytes(damage(piece.read_bytes()))
    with pytest.raises(
        CarryError, match=r"part03of03: corrupted \(piece 3 of 3 of blob\.bin: "
    ) as e:
        gpu_carry.join(carry, bundle)
    assert not e.value.missing_only
    assert e.match(found) and e.match(r"carry it again \(command 1\)$")
    assert gpu_carry.main(["receive", "--dir", str(carry)]) == 1


def test_pieces_of_another_prepare_run_are_refused_as_a_whole(blob: tuple[Path, bytes]) -> None:
    carry, _ = blob
    bundle = {**bundle_of(carry), "sha256": "0" * 64}
    with pytest.raises(CarryError, match=r"joined pieces' sha256 .* run prepare again"):
        gpu_carry.join(carry, bundle)
    assert not (carry / gpu_carry.WHOLE / "blob.bin").exists()


def test_receive_without_the_manifest_says_to_carry_it(tmp_path: Path) -> None:
    with pytest.raises(CarryError, match=r"manifest\.json: missing; carry it with every command"):
        gpu_carry.receive(tmp_path)


def probe_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one module, `gpucheckprobe`, version 1.0."""
    info = "gpucheckprobe-1.0.dist-info"
    files = {
        "gpucheckprobe.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = [f"{name},," for name in [*files, f"{info}/RECORD"]]
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = folder / "gpucheckprobe-1.0-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_receive_installs_a_wheel_the_machine_lacks_once(tmp_path: Path) -> None:
    wheel = probe_wheel(tmp_path / "wheels")
    extra = {"kind": "wheel", "distribution": "gpucheckprobe", "version": "1.0", "requires": ""}
    carry = carried(tmp_path, wheel.name, wheel.read_bytes(), 200, **extra)
    assert len(bundle_of(carry)["pieces"]) > 1
    assert gpu_carry.receive(carry) == {wheel.name: "installed with pip"}
    assert (carry / gpu_carry.SITE / "gpucheckprobe.py").read_text() == "VALUE = 42\n"
    assert gpu_carry.receive(carry) == {wheel.name: "ready (joined and checked before)"}


def test_without_pip_a_wheel_is_unzipped_into_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoPip:
        returncode = 1

    monkeypatch.setattr(gpu_carry.subprocess, "run", lambda *args, **kwargs: NoPip())
    site = tmp_path / "site"
    assert gpu_carry.install(probe_wheel(tmp_path / "wheels"), site) == "unzipped (no pip here)"
    assert sorted(p.name for p in site.iterdir()) == [
        "gpucheckprobe-1.0.dist-info",
        "gpucheckprobe.py",
    ]


def test_a_wheel_already_there_in_a_version_that_will_do_is_not_installed(
    tmp_path: Path,
) -> None:
    pytest_version = gpu_carry.metadata.version("pytest")
    extra = {"kind": "wheel", "distribution": "pytest", "version": "0", "requires": ">=7"}
    carry = carried(tmp_path, "pytest-0-py3-none-any.whl", b"not read", 1024, **extra)
    assert gpu_carry.receive(carry) == {
        "pytest-0-py3-none-any.whl": f"not needed: pytest {pytest_version} is installed"
    }
    assert not (carry / gpu_carry.SITE).exists()


def piece(file: str, mib: float) -> dict[str, Any]:
    return {"file": file, "bytes": int(mib * MIB)}


@pytest.mark.parametrize(
    ("bundles", "commands"),
    [
        (  # the big wheel's pieces first, its remainder beside the model's and the small ones
            [
                {"kind": "wheel", "pieces": [piece("w1", 59), piece("w2", 59), piece("w3", 8)]},
                {"kind": "wheel", "pieces": [piece("small", 2)]},
                {"kind": "model", "pieces": [piece("m1", 59), piece("m2", 42)]},
            ],
            [["w1"], ["w2"], ["m2", "small", "w3"], ["m1"]],
        ),
        (  # nothing over the room of one command
            [{"kind": "model", "pieces": [piece("a", 30), piece("b", 30), piece("c", 31)]}],
            [["c"], ["a", "b"]],
        ),
    ],
)
def test_the_plan_packs_pieces_into_few_commands_wheels_first(
    bundles: list[dict[str, Any]], commands: list[list[str]]
) -> None:
    assert gpu_carry.plan(bundles) == commands
    sizes = {p["file"]: p["bytes"] for b in bundles for p in b["pieces"]}
    assert all(sum(sizes[f] for f in c) <= gpu_carry.CARRY_BYTES for c in commands)


def test_the_lock_gives_each_pin_with_its_digests(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "onnxruntime-gpu==1.31.1 \\\n"
        f"    --hash=sha256:{'a' * 64} \\\n"
        f"    --hash=sha256:{'b' * 64}\n"
        "    # via -r requirements.txt\n"
        "Typing_Extensions==4.16.0 \\\n"
        f"    --hash=sha256:{'c' * 64}\n"
        "    # via pydantic\n"
    )
    assert gpu_carry.read_lock(lock) == {
        "onnxruntime-gpu": ("1.31.1", ["a" * 64, "b" * 64]),
        "typing-extensions": ("4.16.0", ["c" * 64]),
    }
