"""Signatures of model folders: OpenSSF model-signing with an elliptic-curve key.

`sign` writes SIGNATURE_FILE into a folder: a Sigstore bundle over the sha256 of every other
file in it, made with a PEM private key and no network. `verify` checks a folder against it with
the matching public key before anything in the folder is read: a changed, added or removed file,
a missing signature or another key is an IntegrityError of one line. Only these two functions
import model-signing (`pip install model-signing pyopenssl`, the wheel's [signing] extra).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from bertrt.manifest import IntegrityError

# Beside the files it covers, and left out of what it covers. The model-signing CLI's default
# name, so `model_signing verify key FOLDER --signature FOLDER/model.sig` checks it too.
SIGNATURE_FILE = "model.sig"
# The curves model-signing accepts (those of Sigstore's specification).
CURVES = ("secp256r1", "secp384r1", "secp521r1")
INSTALL = "pip install 'model-signing==1.1.1' pyopenssl (the wheel's [signing] extra)"


class SignatureError(IntegrityError):
    """A folder whose signature is missing, made with another key, or does not match its files;
    or a key or library that cannot check it."""


def _library() -> ModuleType:
    """model-signing, imported only when a key is given."""
    try:
        return importlib.import_module("model_signing")
    except ModuleNotFoundError as exc:
        # 1.1.1 imports pyOpenSSL (OpenSSL) without declaring it.
        raise SignatureError(
            f"signatures need model-signing, which is not installed ({exc}); {INSTALL}"
        ) from None


def _hashing(library: ModuleType) -> Any:
    """sha256 of every file but the signature; symlinks refused; git files not left out."""
    return (
        library.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    )


def public_pem(private_key: str | Path, password: str | None = None) -> bytes:
    """The PEM public key of an EC private key file, checked to be one model-signing signs
    with; a SignatureError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(private_key)
    try:
        key = serialization.load_pem_private_key(
            path.read_bytes(), password.encode() if password else None
        )
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise SignatureError(
            f"{path}: not an elliptic-curve key on one of {list(CURVES)}; make one with "
            "openssl ecparam -name prime256v1 -genkey -noout -out key.pem"
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(public_key_pem: bytes) -> str:
    """sha256 of a PEM public key: the key hint a signature records."""
    return hashlib.sha256(public_key_pem).hexdigest()


def sign(folder: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign every file of `folder` into `folder`/SIGNATURE_FILE (replacing any) with the PEM
    EC private key `private_key`; returns the signature's path."""
    library = _library()
    folder = Path(folder)
    public_pem(private_key, password)  # a wrong key fails here, naming the file
    target = folder / SIGNATURE_FILE
    target.unlink(missing_ok=True)
    # Written beside the folder, then moved in: the folder never holds a half-written file.
    handle, tmp = tempfile.mkstemp(prefix=".model-sig-", dir=folder.parent)
    os.close(handle)
    try:
        config = library.signing.Config().use_elliptic_key_signer(
            private_key=Path(private_key), password=password.encode() if password else None
        )
        config.set_hashing_config(_hashing(library)).sign(folder, Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def verify(folder: str | Path, public_key: str | Path) -> None:
    """Check `folder` against its SIGNATURE_FILE with the PEM public key `public_key`; a
    SignatureError of one line naming the folder and what differs otherwise."""
    folder = Path(folder)
    key = Path(public_key)
    signature = folder / SIGNATURE_FILE
    if not key.is_file():
        raise SignatureError(f"{key}: no such public key file; pass the signer's PEM public key")
    if not folder.is_dir():
        raise SignatureError(f"{folder}: not a model folder")
    if signature.is_symlink() or not signature.is_file():
        raise SignatureError(
            f"{signature}: missing: the folder is unsigned, so it cannot be checked against "
            f"{key}; use a signed release (make release SIGNING_KEY=...)"
        )
    library = _library()
    try:
        verifier = library.verifying.Config().use_elliptic_key_verifier(public_key=key)
    except Exception as exc:  # cryptography's and model-signing's own exception types
        raise SignatureError(f"{key}: not a PEM elliptic-curve public key ({exc})") from None
    # model-signing prints a warning about old signatures to stdout, which carries predictions.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            verifier.set_hashing_config(_hashing(library)).verify(folder, signature)
        except Exception as exc:  # the library raises ValueError, InvalidSignature, JSON errors
            raise SignatureError(
                f"{folder}: signature check failed: {_reason(exc, key)}; restore the folder "
                "from the release"
            ) from None


def _reason(exc: Exception, key: Path) -> str:
    """What model-signing's error says, in one short line."""
    raw = str(exc)
    text = " ".join(raw.split())
    if type(exc).__name__ == "InvalidSignature":
        return f"the signature does not verify with {key} (forged, or made with another key)"
    if text.startswith("Key mismatch"):
        return f"signed with another key than {key}"
    prefix = "Signature mismatch: "
    if raw.startswith(prefix):
        try:  # the message ends with the repr of a list of differences
            differences = [str(d) for d in ast.literal_eval(raw[len(prefix) :])]
        except (ValueError, SyntaxError):
            differences = [raw[len(prefix) :]]
        found = []
        for difference in differences:
            listed = re.match(r"(Extra|Missing) files (?:found )?in model '.*?': (.*)", difference)
            changed = re.match(r"Hash mismatch for '(.*?)':", difference)
            if listed:
                found.append(f"{'added' if listed[1] == 'Extra' else 'removed'} {listed[2]}")
            elif changed:
                found.append(f"changed {changed[1]}")
            else:
                found.append(" ".join(difference.split())[:200])
        return "files differ from what was signed: " + "; ".join(found)
    return f"unreadable signature ({type(exc).__name__}: {text[:200]})"
