"""Signed model folders (OpenSSF model-signing, an EC key made here): a signed folder loads with
its public key; a changed, added or removed file, a missing signature or another key is refused
in one line before anything in the folder is read, from Python, the command line and the
environment; the wheel carries the signature (the signed release: tests/test_release.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_key

import bertrt
from bertrt import signing
from bertrt.cli import main
from bertrt.manifest import IntegrityError
from bertrt.signing import SIGNATURE_FILE, SignatureError

TEXTS = ["a wonderful film", "dull and boring"]


@pytest.fixture(scope="module")
def signed_dir(
    tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path, keys: dict[str, Path]
) -> Path:
    folder = tmp_path_factory.mktemp("signed") / "model"
    shutil.copytree(onnx_model_dir, folder)
    assert signing.sign(folder, keys["private"]) == folder / SIGNATURE_FILE
    return folder


@pytest.fixture
def signed_copy(tmp_path: Path, signed_dir: Path) -> Path:
    """A private copy of the signed folder that a test may tamper with."""
    return Path(shutil.copytree(signed_dir, tmp_path / "model"))


def refusal(folder: Path, public_key: Path) -> str:
    with pytest.raises(SignatureError) as caught:
        bertrt.load(folder, device="cpu", public_key=public_key)
    message = str(caught.value)
    assert "\n" not in message
    return message


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_signed_folder_loads_and_predicts_as_the_unsigned_one(
    signed_dir: Path, onnx_model_dir: Path, keys: dict[str, Path]
) -> None:
    model = bertrt.load(signed_dir, device="cpu", public_key=keys["public"])
    plain = bertrt.load(onnx_model_dir, device="cpu")
    assert [p.as_dict() for p in model.predict(TEXTS)] == [
        p.as_dict() for p in plain.predict(TEXTS)
    ]
    # The signature is beside the files, not one of them: the manifest does not list it.
    manifest = json.loads((signed_dir / "manifest.json").read_text())
    assert SIGNATURE_FILE not in manifest["files"]
    # Without a key nothing is checked and the signature is not in the way.
    assert bertrt.load(signed_dir, device="cpu").labels == plain.labels


@pytest.mark.parametrize("name", ["manifest.json", "labels.json", "model.onnx", "tokenizer.json"])
def test_a_changed_byte_in_any_file_is_refused_naming_it(
    signed_copy: Path, keys: dict[str, Path], name: str
) -> None:
    flip_a_byte(signed_copy / name)
    message = refusal(signed_copy, keys["public"])
    assert message.startswith(f"{signed_copy}: signature check failed: files differ")
    assert f"changed {name}" in message


def test_the_signature_is_checked_before_the_manifest_is_read(
    signed_copy: Path, keys: dict[str, Path]
) -> None:
    (signed_copy / "manifest.json").write_text("{ not json")
    assert "changed manifest.json" in refusal(signed_copy, keys["public"])
    # Without the key, the manifest is what fails.
    with pytest.raises(IntegrityError, match="not valid JSON"):
        bertrt.load(signed_copy, device="cpu")


def test_an_added_or_removed_file_is_refused(signed_copy: Path, keys: dict[str, Path]) -> None:
    (signed_copy / "extra.onnx").write_bytes(b"not a graph")
    assert "added extra.onnx" in refusal(signed_copy, keys["public"])
    (signed_copy / "extra.onnx").unlink()
    (signed_copy / "labels.json").unlink()
    assert "removed labels.json" in refusal(signed_copy, keys["public"])


def test_an_unsigned_folder_is_refused(signed_copy: Path, keys: dict[str, Path]) -> None:
    (signed_copy / SIGNATURE_FILE).unlink()
    message = refusal(signed_copy, keys["public"])
    assert message.startswith(f"{signed_copy / SIGNATURE_FILE}: missing: the folder is unsigned")


def test_another_key_and_a_forged_signature_are_refused(
    signed_copy: Path, keys: dict[str, Path]
) -> None:
    assert f"signed with another key than {keys['other']}" in refusal(signed_copy, keys["other"])
    # The signed statement edited to list another digest: the signature no longer verifies.
    bundle = json.loads((signed_copy / SIGNATURE_FILE).read_text())
    envelope = bundle["dsseEnvelope"]
    import base64

    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed_copy / SIGNATURE_FILE).write_text(json.dumps(bundle))
    assert "does not verify with" in refusal(signed_copy, keys["public"])
    (signed_copy / SIGNATURE_FILE).write_text("garbage")
    assert "unreadable signature" in refusal(signed_copy, keys["public"])


def test_a_missing_or_unreadable_public_key_is_one_line(signed_dir: Path, tmp_path: Path) -> None:
    assert "no such public key file" in refusal(signed_dir, tmp_path / "none.pub")
    (tmp_path / "bad.pub").write_text("not a key")
    assert "not a PEM elliptic-curve public key" in refusal(signed_dir, tmp_path / "bad.pub")


def test_without_model_signing_a_key_is_refused_naming_the_install(
    signed_dir: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "model_signing", None)
    message = refusal(signed_dir, keys["public"])
    assert "signatures need model-signing, which is not installed" in message
    assert "pip install 'model-signing==1.1.1' pyopenssl" in message


def test_the_runtime_imports_model_signing_only_when_a_key_is_given(signed_dir: Path) -> None:
    code = (
        "import sys, bertrt; "
        f"bertrt.load({str(signed_dir)!r}, device='cpu'); "
        "print('model_signing' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_the_command_line_checks_the_signature_on_every_command_that_loads_a_model(
    signed_dir: Path,
    signed_copy: Path,
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ok = ["predict", "--model", str(signed_dir), "--device", "cpu"]
    assert main([*ok, "--public-key", str(keys["public"]), *TEXTS]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    flip_a_byte(signed_copy / "model.onnx")
    source = tmp_path / "in.jsonl"
    source.write_text('"x"\n')
    commands = [
        ["predict", "--model", str(signed_copy), *TEXTS],
        ["info", "--model", str(signed_copy)],
        ["serve", "--model", str(signed_copy)],
        ["batch", "--model", str(signed_copy), "--input", str(source), "--output", "o"],
        ["package", "--model", str(signed_copy), "--out", str(tmp_path / "dist")],
    ]
    for argv in commands:
        assert main([*argv, "--public-key", str(keys["public"])]) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        err = captured.err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"bertrt: error: {signed_copy}: signature check failed"), err
        assert "changed model.onnx" in err
    assert not (tmp_path / "dist").exists()


def test_the_environment_names_the_public_key(
    signed_dir: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["predict", "--model", str(signed_dir), "--device", "cpu", *TEXTS]
    monkeypatch.setenv("BERTRT_PUBLIC_KEY", str(keys["other"]))
    assert main(argv) == 1
    assert "signed with another key" in capsys.readouterr().err
    with pytest.raises(SignatureError, match="signed with another key"):
        bertrt.load(signed_dir, device="cpu")
    # The flag wins over the environment.
    assert main([*argv, "--public-key", str(keys["public"])]) == 0
    monkeypatch.setenv("BERTRT_PUBLIC_KEY", str(keys["public"]))
    assert main(argv) == 0


def test_the_wheel_carries_a_signature_that_still_covers_its_folder(
    signed_dir: Path, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bertrt.bundle import write_project

    # The whole folder unchanged: its signature is carried as it is.
    write_project(signed_dir, tmp_path / "whole", "tiny", "1.0", None)
    bundled = tmp_path / "whole" / "bertrt" / "models" / "tiny"
    assert (bundled / SIGNATURE_FILE).read_bytes() == (signed_dir / SIGNATURE_FILE).read_bytes()
    signing.verify(bundled, keys["public"])
    # Other files (a stray file is not bundled): not carried without a key, signed with one.
    source = Path(shutil.copytree(signed_dir, tmp_path / "source"))
    (source / "notes.txt").write_text("a stray file")
    signing.sign(source, keys["private"])
    write_project(source, tmp_path / "unsigned", "tiny", "1.0", None)
    assert not (tmp_path / "unsigned" / "bertrt" / "models" / "tiny" / SIGNATURE_FILE).exists()
    assert "its signature is left out" in caplog.text
    write_project(source, tmp_path / "signed", "tiny", "1.0", None, private_key=keys["private"])
    bundled = tmp_path / "signed" / "bertrt" / "models" / "tiny"
    signing.verify(bundled, keys["public"])
    extras = (tmp_path / "signed" / "pyproject.toml").read_text()
    assert 'signing = ["model-signing==1.1.1", "pyopenssl>=25"]' in extras


def test_an_encrypted_key_signs_with_its_password(signed_dir: Path, tmp_path: Path) -> None:
    private, public = make_key(tmp_path, "locked", password=b"s3cret")
    folder = Path(shutil.copytree(signed_dir, tmp_path / "model"))
    with pytest.raises(SignatureError, match="not a readable PEM private key"):
        signing.sign(folder, private)
    signing.sign(folder, private, password="s3cret")
    signing.verify(folder, public)


def test_the_release_signs_a_copy_and_leaves_the_exported_folder_alone(
    onnx_model_dir: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    from pipeline.ops import release

    before = sorted(p.name for p in onnx_model_dir.iterdir())
    key = release.signing_key(str(keys["private"]), required=True)
    assert key is not None and len(key.fingerprint) == 64
    folder = release.signed_copy(onnx_model_dir, key, tmp_path)
    signing.verify(folder, keys["public"])
    assert sorted(p.name for p in onnx_model_dir.iterdir()) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, SIGNATURE_FILE])


def test_the_release_says_it_is_unsigned_or_refuses_before_tagging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import write_params

    from pipeline.ops import release

    assert release.signing_key(None, required=False) is None
    out = capsys.readouterr().out
    assert out.startswith("release: unsigned: no signing key") and len(out.splitlines()) == 1
    # In a folder that is no git repository: the key is refused before the tree is looked at.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BERTRT_SIGNING_KEY", raising=False)
    params = write_params(tmp_path)
    argv = ["v1", "--params", str(params), "--signed"]
    assert release.main(argv) == 1
    assert "--signed asks for a signature but no key is given" in capsys.readouterr().err
    (tmp_path / "bad.pem").write_text("not a key")
    assert release.main([*argv, "--signing-key", str(tmp_path / "bad.pem")]) == 1
    err = capsys.readouterr().err
    assert f"signing key {tmp_path / 'bad.pem'}: not a readable PEM private key" in err


def test_make_release_passes_the_signing_key() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["make", "-n", "release", "TAG=v9", "SIGNING_KEY=k.pem"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-m pipeline.ops.release v9 --params params.yaml" in done.stdout
    assert "--signing-key k.pem" in done.stdout and "--signed" not in done.stdout


def test_the_registered_model_checks_the_key_it_is_given(
    signed_dir: Path, keys: dict[str, Path]
) -> None:
    from pipeline.ops.registry_model import PACKAGE, PackageModel

    model = PackageModel()
    context = SimpleNamespace(
        artifacts={PACKAGE: str(signed_dir)}, model_config={"public_key": str(keys["other"])}
    )
    with pytest.raises(SignatureError, match="signed with another key"):
        model.load_context(context)
    context.model_config = {"public_key": str(keys["public"])}
    model.load_context(context)
    assert len(model.predict(context, TEXTS)) == 2


@pytest.mark.slow
def test_a_local_dask_cluster_run_checks_the_folder_and_leaves_the_environment_as_it_was(
    signed_dir: Path,
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    import pandas as pd

    monkeypatch.delenv("BERTRT_PUBLIC_KEY", raising=False)
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS * 3}).to_csv(source, index=False)
    argv = ["batch", "--model", str(signed_dir), "--input", str(source), "--local", "1"]
    argv += ["--public-key", str(keys["public"]), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows_written"] == 6
    assert "BERTRT_PUBLIC_KEY" not in os.environ  # set for the cluster's workers only
