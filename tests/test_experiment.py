"""The config runner: a config file becomes `dvc exp run -S` overrides, checked against params."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.core import params
from pipeline.ops import experiment
from pipeline.ops.experiment import overrides


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_params(config: Path, tmp_path: Path) -> None:
    import yaml

    sets = overrides(config)
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for item in sets:
        dotted, _, value = item.partition("=")
        section, key = dotted.split(".")
        data[section][key] = yaml.safe_load(value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = params.load(path)
    assert loaded.base.task in ("token-classification", "fill-mask")
    files = [loaded.ingest.source, loaded.ingest.probes, loaded.fill_mask.user_words]
    for value in files:  # the repo's own corpora, probes and word lists are where configs say
        assert not value or value.startswith("package:") or (REPO / value).is_file(), value
    assert loaded.ingest.drop_labels == []  # no config is a sentiment task


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("finetune:\n  epoch: 3\n", "unknown key finetune.epoch"),
        ("train:\n  epochs: 3\n", "'train' is not a section"),
        ("- a\n- b\n", "must be a mapping"),
        ("base: [1\n", "cannot be read"),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(params.ParamsError, match=message):
        overrides(path)


def test_set_overrides_a_config_value_and_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("base:\n  task: fill-mask\n", encoding="utf-8")
    sets = overrides(config, ["finetune.epochs=2", "base.task=token-classification"])
    assert "finetune.epochs=2" in sets and 'base.task="token-classification"' in sets
    with pytest.raises(params.ParamsError, match="unknown key finetune.epoch"):
        overrides(config, ["finetune.epoch=2"])
    with pytest.raises(params.ParamsError, match="write section.key=value"):
        overrides(config, ["epochs"])


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _committed_repo(tmp_path: Path, dvc: str | None = None) -> Path:
    """A git repo with one commit of what is written in it first (and DVC's files, given dvc)."""
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    _git(repo, "init", "-q")
    if dvc:
        subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    _git(repo, "add", "-A")
    identity = ("-c", "user.name=t", "-c", "user.email=t@t")
    _git(repo, *identity, "commit", "-q", "--allow-empty", "-m", "a")
    return repo


def _repo_with_experiment(tmp_path: Path, name: str, baseline: str = "HEAD") -> Path:
    """A git repo whose experiment `name` (a ref as DVC writes it) has `baseline` as its base."""
    repo = _committed_repo(tmp_path)
    head = _git(repo, "rev-parse", "HEAD")
    base = head if baseline == "HEAD" else baseline
    _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", head)
    return repo


def test_an_experiment_of_the_same_name_on_this_commit_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo_with_experiment(tmp_path, "cloze-zh")
    monkeypatch.chdir(repo)
    assert experiment.baseline_experiment("cloze-zh") == _git(repo, "rev-parse", "HEAD")
    assert experiment.baseline_experiment("cloze-zh-30ep") is None


def test_an_experiment_of_an_older_commit_does_not_clash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo_with_experiment(tmp_path, "cloze-zh", baseline="ab" + "c" * 38)
    monkeypatch.chdir(repo)
    assert experiment.baseline_experiment("cloze-zh") is None


def test_a_second_run_of_a_name_stops_before_dvc_runs_and_names_the_ways_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo_with_experiment(tmp_path, "c")
    config = tmp_path / "c.yaml"
    config.write_text("finetune:\n  epochs: 2\n", encoding="utf-8")
    monkeypatch.chdir(repo)
    assert experiment.main([str(config)]) == 1
    out = capsys.readouterr()
    assert "already has an experiment named 'c'" in out.err
    assert "--name" in out.err and "--replace" in out.err and "dvc exp remove c" in out.err
    assert "exp run" not in out.out  # the command is printed just before it runs


def test_the_dvc_command_overwrites_only_when_replacing() -> None:
    cmd = experiment.exp_run_command("dvc", "c", ["finetune.epochs=2"])
    assert cmd == ["dvc", "exp", "run", "--temp", "-n", "c", "-S", "finetune.epochs=2"]
    queued = experiment.exp_run_command("dvc", "c", [], queue=True, replace=True)
    assert queued == ["dvc", "exp", "run", "--queue", "-n", "c", "-f"]


@pytest.mark.slow
def test_dvc_keeps_one_experiment_of_a_name_and_replace_overwrites_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With DVC itself, in a one-stage repo: a second run stops, --replace overwrites."""
    dvc = experiment.dvc_executable()
    if dvc is None:
        pytest.skip("dvc is not installed in this environment (make venv installs it)")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("finetune:\n  epochs: 1\n", encoding="utf-8")
    (repo / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: cp params.yaml out.txt\n"
        "    params: [finetune.epochs]\n    outs: [out.txt]\n",
        encoding="utf-8",
    )
    _committed_repo(tmp_path, dvc)
    config = tmp_path / "c.yaml"
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")

    def run(epochs: int, *flags: str) -> int:
        config.write_text(f"finetune:\n  epochs: {epochs}\n", encoding="utf-8")
        return experiment.main([str(config), *flags])

    assert run(3) == 0
    first = experiment.baseline_experiment("c")
    assert run(4) == 1
    assert experiment.baseline_experiment("c") == first  # the first one is untouched
    assert run(4, "--replace") == 0
    second = experiment.baseline_experiment("c")
    assert second not in (None, first)
    assert "epochs: 4" in _git(repo, "show", f"{second}:params.yaml")
    assert "epochs: 4" in _git(repo, "show", f"{second}:dvc.lock")  # its stage ran on it
    capsys.readouterr()
