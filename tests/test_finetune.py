"""Tests for the tokenize and finetune stages on the tiny model: outputs, MLflow, resuming."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, answers, synthetic_reviews, write_params, write_splits

from pipeline.core import params, sources, tracking
from pipeline.stages import finetune, tokenize_data, validate


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Validated and tokenized tiny data, and params pointing at the tiny model."""
    root = tmp_path_factory.mktemp("ft")
    rows = synthetic_reviews(160, seed=11)
    raw = write_splits(
        root / "raw", {"train": rows[:112], "validation": rows[112:136], "test": rows[136:]}
    )
    params_path = write_params(
        root,
        {
            "base.model": str(tiny_model_dir),
            "base.max_length": 32,
            "finetune.epochs": 2,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 1e-3,
            "finetune.warmup_steps": 0,
            "finetune.logging_steps": 2,
            "finetune.max_train_samples": 0,
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        },
    )
    validated = root / "validated"
    validate.run(
        raw, params.load(params_path), validated, root / "validation.json", root / "failures.json"
    )
    tokenized = root / "tokenized"
    tokenize_data.run(validated, params.load(params_path), tokenized, root / "tokenize.json")
    return {"root": root, "params": params_path, "validated": validated, "tokenized": tokenized}


def test_tokenize_keeps_lengths_unpadded_and_labels_as_ids(prepared: dict) -> None:
    from datasets import load_from_disk

    data = load_from_disk(str(prepared["tokenized"]))
    lengths = {len(ids) for ids in data["train"]["input_ids"]}
    assert len(lengths) > 1, "no padding at tokenization time"
    assert set(data["train"]["labels"]) == {0, 1}
    report = json.loads((prepared["root"] / "tokenize.json").read_text())
    assert report["splits"]["train"]["truncation_rate"] == 0.0
    assert report["splits"]["train"]["token_length"]["p100"] == max(lengths)


def run_finetune(prepared: dict, out: str, params_path: Path | None = None) -> dict:
    root = prepared["root"]
    return finetune.run(
        prepared["tokenized"],
        prepared["validated"],
        params.load(params_path or prepared["params"]),
        root / out,
        root / f"{out}-checkpoints",
        root / f"{out}-train.json",
        root / f"{out}-curves",
    )


@pytest.mark.slow
def test_finetune_saves_a_model_curves_and_one_mlflow_run(prepared: dict, capfd) -> None:
    import mlflow
    from transformers import AutoConfig

    summary = run_finetune(prepared, "model")
    printed = "".join(capfd.readouterr())
    # One bar and one line per evaluation; the per-step dicts went to MLflow and the curves.
    assert "epoch 1: validation loss" in printed and "epoch 2: validation loss" in printed
    assert "{'loss'" not in printed and "'eval_runtime'" not in printed
    root = prepared["root"]
    config = AutoConfig.from_pretrained(root / "model")
    assert config.id2label == {0: "fresh", 1: "rotten"}
    assert (root / "model" / "model.safetensors").is_file()
    assert (root / "model" / "tokenizer.json").is_file()
    assert not list((root / "model").glob("*.bin")), "no pickle is shipped"
    assert summary["epochs_run"] == 2.0
    assert summary["best_checkpoint"].startswith("checkpoint-")
    evals = (root / "model-curves" / "eval.csv").read_text().splitlines()
    header = "step,epoch,eval_loss,eval_accuracy,eval_macro_f1,selection_score"
    assert evals[0] == header and len(evals) == 3
    assert summary["selection_metric"] == "macro_f1"
    assert len((root / "model-curves" / "train_loss.csv").read_text().splitlines()) > 3

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["text-classification"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[tracking.MODEL_TAG] == summary["model_sha256"]
    assert run.data.params["finetune.learning_rate"] == "0.001"
    assert "git_commit" in run.data.tags and "data_sha256" in run.data.tags
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert len(history) >= 3, "step-level training curve"
    assert run.inputs.dataset_inputs[0].dataset.name == "train"


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(prepared: dict) -> None:
    first = run_finetune(prepared, "resumable")
    root = prepared["root"]
    # What a kill leaves behind: checkpoints, no final model. The next run must resume.
    import shutil

    shutil.rmtree(root / "resumable")
    second = run_finetune(prepared, "resumable")
    assert second["resumed"] is True
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["global_steps"] == first["global_steps"]
    assert second["model_sha256"] == first["model_sha256"]


@pytest.mark.slow
def test_changed_params_start_over_instead_of_resuming(prepared: dict) -> None:
    import yaml

    root = prepared["root"]
    run_finetune(prepared, "restart")
    data = yaml.safe_load(prepared["params"].read_text())
    data["finetune"]["epochs"] = 1
    changed = root / "params-one-epoch.yaml"
    changed.write_text(yaml.safe_dump(data))
    summary = run_finetune(prepared, "restart", changed)
    assert summary["resumed"] is False
    assert summary["epochs_run"] == 1.0


def test_an_unreachable_tracking_server_stops_before_training(
    prepared: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        run_finetune(prepared, "never")
    assert not (prepared["root"] / "never").exists()
    assert not (prepared["root"] / "never-checkpoints").exists()


def test_a_base_model_with_pickled_weights_only_is_refused_not_loaded(
    prepared: dict, tiny_model_dir: Path
) -> None:
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file

    root = prepared["root"]
    pickled = root / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    data = yaml.safe_load(prepared["params"].read_text())
    data["base"]["model"] = str(pickled)
    params_path = root / "params-pickled.yaml"
    params_path.write_text(yaml.safe_dump(data))
    with pytest.raises(sources.SourceError, match="has no safetensors weights; pickled ones"):
        run_finetune(prepared, "from-pickle", params_path)
    assert not (root / "from-pickle").exists()


@pytest.mark.slow
def test_the_saved_tokenizer_config_does_not_depend_on_the_environment(prepared: dict) -> None:
    config = json.loads((prepared["root"] / "model" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in config
    assert config["model_max_length"] == 64


def finetune_argv(prepared: dict, name: str) -> list[str]:
    """The finetune stage's arguments, its outputs named after `name` under the module's root."""
    root = prepared["root"]
    argv = ["-m", "pipeline.stages.finetune", "--tokenized", str(prepared["tokenized"])]
    argv += ["--validated", str(prepared["validated"]), "--params", str(prepared["params"])]
    argv += ["--out", str(root / name), "--checkpoints", str(root / f"{name}-checkpoints")]
    argv += ["--report", str(root / f"{name}-train.json")]
    argv += ["--curves", str(root / f"{name}-curves")]
    return argv


def run_ids(prepared: dict) -> set[str]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{prepared['root'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["text-classification"], output_format="list")
    return {run.info.run_id for run in runs}


def check_one_run_one_model(
    prepared: dict, name: str, processes: int, single: dict, before: set[str]
) -> None:
    """Rank 0 alone tracked and wrote: one model, one new MLflow run (of the runs that were not
    there before the launch), one curve; the processes share finetune.batch_size, so the result
    matches a single process within 0.1 validation macro-F1 (the distributed sampler orders
    batches differently)."""
    import mlflow

    root = prepared["root"]
    summary = json.loads((root / f"{name}-train.json").read_text())
    assert summary["processes"] == processes
    assert summary["global_steps"] == single["global_steps"]
    assert (root / name / "model.safetensors").is_file()
    assert sorted(p.name for p in root.glob(f"{name}*")) == [
        name,
        f"{name}-checkpoints",
        f"{name}-curves",
        f"{name}-train.json",
    ]
    assert summary["best_validation_macro_f1"] == pytest.approx(
        single["best_validation_macro_f1"], abs=0.1
    )
    assert run_ids(prepared) - before == {summary["mlflow_run_id"]}
    (run,) = mlflow.search_runs(
        experiment_names=["text-classification"],
        filter_string=f"attributes.run_id = '{summary['mlflow_run_id']}'",
        output_format="list",
    )
    assert run.data.tags[tracking.MODEL_TAG] == summary["model_sha256"]
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "loss")
    assert len({h.step for h in history}) == len(history), "one process logged the curve"


@pytest.fixture(scope="module")
def single(prepared: dict) -> dict:
    """One process's fine-tune of the module's data: what the distributed runs are held to."""
    return run_finetune(prepared, "single")


# gloo and the c10d store on the loopback interface only.
LOOPBACK_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}


@pytest.mark.slow
def test_two_processes_over_gloo_train_one_model_into_one_mlflow_run(
    prepared: dict, single: dict
) -> None:
    """`torchrun --nproc-per-node 2` on CPU (DDP over gloo)."""
    before = run_ids(prepared)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*argv, *finetune_argv(prepared, "ddp")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **LOOPBACK_ENV},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_one_run_one_model(prepared, "ddp", 2, single, before)


@pytest.mark.slow
def test_two_nodes_meet_over_c10d_and_train_one_model_into_one_mlflow_run(
    prepared: dict, single: dict
) -> None:
    """`torchrun --nnodes 2` with the c10d rendezvous: two launchers, each its own process
    group and node, meet at a rendezvous endpoint on 127.0.0.1 (what two machines do over
    their network, NCCL in place of gloo on GPUs: docs/experiments.md)."""
    before = run_ids(prepared)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank in range(2):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        argv += ["--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d"]
        argv += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
        argv += ["--local-addr", "127.0.0.1", "--max-restarts", "0"]
        nodes.append(
            subprocess.Popen(
                [*argv, *finetune_argv(prepared, "nodes")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **LOOPBACK_ENV},
                cwd=REPO,
            )
        )
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=600)[0])
        finally:
            node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{out[-3000:]}"
    check_one_run_one_model(prepared, "nodes", 2, single, before)


@pytest.mark.slow
def test_a_half_written_checkpoint_is_removed_not_loaded(prepared: dict, caplog) -> None:
    import shutil

    first = run_finetune(prepared, "half")
    root = prepared["root"]
    checkpoints = root / "half-checkpoints"
    last = max(checkpoints.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1]))
    # What a kill during a save leaves: a newer folder whose state file is cut short.
    torn = checkpoints / "checkpoint-999"
    shutil.copytree(last, torn)
    state = (torn / "trainer_state.json").read_text()
    (torn / "trainer_state.json").write_text(state[: len(state) // 2])
    shutil.rmtree(root / "half")
    caplog.set_level("WARNING", logger="pipeline.stages.finetune")
    second = run_finetune(prepared, "half")
    assert "checkpoint-999 was not finished" in caplog.text
    assert not torn.exists()
    assert second["resumed"] is True and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["model_sha256"] == first["model_sha256"]


@pytest.fixture(scope="module")
def four_epochs(prepared: dict) -> tuple[Path, dict]:
    """Params for four epochs with no early stop (long enough for a process to be stopped
    after its first checkpoint), and the report of an uninterrupted run of them."""
    import yaml

    data = yaml.safe_load(prepared["params"].read_text())
    data["finetune"]["epochs"] = 4
    data["finetune"]["early_stopping_patience"] = 0
    params_path = prepared["root"] / "params-four-epochs.yaml"
    params_path.write_text(yaml.safe_dump(data))
    return params_path, run_finetune(prepared, "whole", params_path)


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_gives_the_uninterrupted_model(
    prepared: dict, four_epochs: tuple[Path, dict]
) -> None:
    """SIGKILL once the first checkpoint is on disk; the re-run resumes into the same MLflow
    run and ends with the model of a run that was never interrupted (CPU, same machine)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = prepared["root"]
    params_path, reference = four_epochs

    argv = [
        sys.executable,
        "-m",
        "pipeline.stages.finetune",
        "--tokenized",
        str(prepared["tokenized"]),
    ]
    argv += ["--validated", str(prepared["validated"]), "--params", str(params_path)]
    argv += ["--out", str(root / "killed"), "--checkpoints", str(root / "killed-checkpoints")]
    argv += ["--report", str(root / "killed-train.json"), "--curves", str(root / "killed-curves")]
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(argv, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((root / "killed-checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stderr.close()
    assert not (root / "killed").exists(), "killed before the model was written"

    again = run_finetune(prepared, "killed", params_path)
    assert again["resumed"] is True
    assert again["global_steps"] == reference["global_steps"]
    assert again["model_sha256"] == reference["model_sha256"]


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real MLflow server on loopback over a SQLite store in `root`, once it answers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--workers", "1"]
    cmd += ["--artifacts-destination", str(root / "server-artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / f"server-{port}.log").open("a")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=log, start_new_session=True)
    if answers(f"http://127.0.0.1:{port}/health", 120, proc):
        return proc
    assert proc.poll() is None, (root / f"server-{port}.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no MLflow server on port {port} within 120 s")


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_training_costs_a_relog_not_the_training(
    prepared: dict, four_epochs: tuple[Path, dict]
) -> None:
    """The server is killed once the first checkpoint is written: training finishes, the model
    and report are saved, the stage names the gap; `relog` fills the same run in, once."""
    import time

    import mlflow

    from pipeline.ops import relog

    root = prepared["root"]
    params_path, reference = four_epochs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = _mlflow_server(root, port)
    argv = [
        sys.executable,
        "-m",
        "pipeline.stages.finetune",
        "--tokenized",
        str(prepared["tokenized"]),
    ]
    argv += ["--validated", str(prepared["validated"]), "--params", str(params_path)]
    argv += ["--out", str(root / "gap"), "--checkpoints", str(root / "gap-checkpoints")]
    argv += ["--report", str(root / "gap-train.json"), "--curves", str(root / "gap-curves")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    repo = Path(__file__).resolve().parents[1]
    stage = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((root / "gap-checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert stage.poll() is None, stage.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    err = stage.communicate(timeout=300)[1]
    assert stage.returncode == 1, err[-3000:]
    assert "TrackingGap" in err and "make relog" in err, err[-3000:]
    summary = json.loads((root / "gap-train.json").read_text())
    assert summary["model_sha256"] == reference["model_sha256"], "the training was not lost"
    assert summary["tracking_gap"]["skipped"] > 0

    restarted = _mlflow_server(root, port)
    try:
        os.environ["MLFLOW_TRACKING_URI"] = url  # the autouse fixture restores the environment
        first = relog.run(params_path, root / "gap-train.json", root / "gap-curves")
        again = relog.run(params_path, root / "gap-train.json", root / "gap-curves")
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.get_run(summary["mlflow_run_id"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        runs = client.search_runs([run.info.experiment_id])
    finally:
        os.killpg(restarted.pid, signal.SIGTERM)
        restarted.wait(timeout=60)
    curve = (root / "gap-curves" / "train_loss.csv").read_text().splitlines()[1:]
    assert first["added"] > 0 and again["added"] == 0
    assert sorted(steps) == sorted(int(line.split(",")[0]) for line in curve), "once each"
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.MODEL_TAG] == summary["model_sha256"]
    assert len(runs) == 1, "one run for the model, none doubled"


@pytest.mark.slow
def test_bf16_trains_where_the_cpu_has_it_and_falls_back_to_fp32_elsewhere(
    prepared: dict, tmp_path: Path
) -> None:
    import yaml

    from pipeline.core import precision

    data = yaml.safe_load(prepared["params"].read_text(encoding="utf-8"))
    data["finetune"]["precision"] = "bf16"
    data["finetune"]["epochs"] = 1
    data["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bf16_params = tmp_path / "params.yaml"
    bf16_params.write_text(yaml.safe_dump(data), encoding="utf-8")
    summary = run_finetune(prepared, "bf16-model", bf16_params)
    expected = "bf16" if precision.native_bf16_cpu() else "fp32"
    assert summary["precision"] == expected
    assert summary["train_loss"] == summary["train_loss"]  # not NaN
    assert (prepared["root"] / "bf16-model" / "model.safetensors").is_file()
    again = run_finetune(prepared, "bf16-again", bf16_params)
    assert again["model_sha256"] == summary["model_sha256"], "bf16 training is deterministic"


def test_the_precision_choice_names_why_it_falls_back(tmp_path: Path, caplog) -> None:
    from pipeline.core import precision

    amx = tmp_path / "amx"
    amx.write_text("flags\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t: fpu avx2 fma\n")
    assert precision.native_bf16_cpu(amx) and not precision.native_bf16_cpu(avx2)
    assert not precision.native_bf16_cpu(tmp_path / "missing")
    choose = precision.training_precision
    assert choose("bf16", cuda=False, cuda_bf16=False, cpu_bf16=True) == "bf16"
    assert choose("fp32", cuda=False, cuda_bf16=False, cpu_bf16=True) == "fp32"
    assert choose("bf16", cuda=True, cuda_bf16=True, cpu_bf16=False) == "bf16"
    with caplog.at_level("INFO"):
        chosen = precision.training_precision("bf16", cuda=False, cuda_bf16=False, cpu_bf16=False)
    assert chosen == "fp32"
    assert "no native bf16" in caplog.text and "training in fp32" in caplog.text


def test_one_encoding_gives_the_same_unk_rate_lengths_and_windows_as_separate_passes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import pyarrow as pa
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pipeline import tasks
    from pipeline.core import params
    from pipeline.train import vocabulary

    texts = ["a plain review", "☃ snow ☃ and [UNK] here", "", "word " * 80, "émoji 🙂 ok"]
    data = Dataset(pa.table({"text": texts, "label": ["fresh", "rotten"] * 2 + ["fresh"]}))
    path = write_params(
        tmp_path,
        {"base.model": str(tiny_model_dir), "base.max_length": 32, "tokenize.batch_size": 2},
    )
    p = params.load(path, "base", "tokenize", params.TASK_SECTION)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out, stats = tasks.get("text-classification").tokenize(
        data, tokenizer, ["fresh", "rotten"], p, "f" * 16
    )
    assert stats["unk_rate"] == round(vocabulary.unk_rate(tokenizer, texts), 6) > 0
    whole = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert stats["token_length"]["p100"] == max(whole) > 32
    assert stats["windows"] == len(out) == len(texts)  # head+tail: one window a text
    assert out["doc"] == list(range(len(texts)))
    assert all(len(ids) <= 32 for ids in out["input_ids"])
    assert [sum(m) for m in out["attention_mask"]] == [len(ids) for ids in out["input_ids"]]
    assert out.features["input_ids"].feature.dtype == "int32"


def test_a_new_head_is_one_line_not_transformers_load_report(tiny_model_dir: Path, caplog) -> None:
    """The tiny classifier (2 labels) loaded as a 5-label tagger: its head is re-initialised
    and said so in one line; transformers' own table of keys is not printed."""
    import logging

    from transformers import BertForTokenClassification

    from pipeline.train import progress

    with caplog.at_level(logging.WARNING), progress.load_report_as_one_line():
        _, info = BertForTokenClassification.from_pretrained(
            tiny_model_dir, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert not [r for r in caplog.records if progress.REPORT_TITLE in r.getMessage()]
    line = progress.describe_loading(info)
    assert "classifier.weight" in line and "classifier.bias" in line, line
    # Outside the context the report is transformers' own again.
    with caplog.at_level(logging.WARNING):
        BertForTokenClassification.from_pretrained(
            tiny_model_dir, num_labels=5, ignore_mismatched_sizes=True
        )
    assert [r for r in caplog.records if progress.REPORT_TITLE in r.getMessage()]


def test_an_evaluation_is_one_line_and_a_training_step_none() -> None:
    from pipeline.train.progress import evaluation_line

    logs = {"eval_loss": 0.39361, "eval_accuracy": 0.8217, "eval_runtime": 3.9, "epoch": 1.0}
    assert evaluation_line(logs, 1.0) == "epoch 1: validation loss 0.3936, accuracy 0.8217"
    assert evaluation_line({"loss": 0.69, "learning_rate": 1e-5, "epoch": 0.2}, 0.2) is None
    assert evaluation_line({"train_runtime": 471.3, "train_loss": 0.22}, 6.0) is None
