"""Stage finetune: HF Trainer on the tokenized data, tracked in MLflow, resumable."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.core import entry, imports, layout, lineage, params, precision, tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import from_pretrained, load_options, quiet_load_bars, resolve_model
from pipeline.train import optim, tracking_gaps
from pipeline.train.train_files import (
    FINGERPRINT,
    checkpoint_state,
    drop_load_options,
    write_curves,
)
from pipeline.train.vocabulary import TOKENIZER_DIR

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
# And its task's section where training reads it (the masking), as tokenize recorded it beside
# the tokenized data (task_params.json).
SECTIONS = ("base", "finetune", "tracking")


def world_size() -> int:
    """Processes of a torchrun / accelerate launch (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(p: params.Params, checkpoints: Path, task: tasks.Task) -> Any:
    import torch
    from transformers import TrainingArguments

    cfg = p.finetune
    cuda = torch.cuda.is_available()
    bf16 = precision.precision_here(p.finetune.precision) == "bf16"
    # Under torchrun the processes share finetune.batch_size, so the optimisation is the same.
    world = world_size()
    if cfg.batch_size % world:
        raise ValueError(
            f"finetune.batch_size {cfg.batch_size} is not divisible by the {world} processes; "
            "pick a multiple of the process count"
        )
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=cfg.eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=task.selection_metric,
        greater_is_better=task.greater_is_better,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=task.remove_unused_columns,
        seed=p.base.seed,
        data_seed=p.base.seed,
        bf16=bf16,
        # Without a GPU, torchrun's processes join over gloo only when told they are CPU ones.
        use_cpu=not cuda,
        tf32=cuda and torch.cuda.get_device_capability()[0] >= 8,
        report_to="none",  # MLflow logging goes through tracking_gaps.mlflow_callback
        run_name=None,  # the MLflow run is started (and named) by this stage
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


# MLflow's warnings when the training table is logged as a dataset, neither actionable here: the
# integer columns are counts that are never missing, and the parquet path is a local file, which
# two of MLflow's source types both claim.
DATASET_WARNINGS = (
    r"Hint: Inferred schema contains integer column",
    r"The specified dataset source can be interpreted in multiple ways",
)


@contextmanager
def quiet_dataset_logging() -> Iterator[None]:
    """While the training table is logged: MLflow's two DATASET_WARNINGS dropped; others pass."""
    with warnings.catch_warnings():
        for message in DATASET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def run(
    tokenized_dir: Path,
    validated_dir: Path,
    p: params.Params,
    out_dir: Path,
    checkpoints: Path,
    report: Path,
    curves_dir: Path,
) -> dict[str, Any]:
    """Fine-tune `base.model` and save it (safetensors, tokenizer, id2label) to `out_dir`."""
    import mlflow
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer, set_seed
    from transformers.trainer_callback import ProgressCallback

    from pipeline.train import progress

    started = time.perf_counter()
    quiet_load_bars()
    p = p.select(*SECTIONS)
    # Under torchrun only rank 0 tracks and writes; every rank trains (the Trainer's DDP).
    main = int(os.environ.get("RANK", "0")) == 0
    tracking_gaps.short_retries()
    uri = tracking.connect(p.tracking) if main else ""  # an unreachable store stops us first
    if p.finetune.threads:
        torch.set_num_threads(max(1, p.finetune.threads // world_size()))
    set_seed(p.base.seed)
    labels = json.loads(layout.labels_file(validated_dir).read_text(encoding="utf-8"))
    recorded = layout.task_params_file(tokenized_dir)
    if not recorded.is_file():
        raise FileNotFoundError(f"{recorded}: missing; re-run the tokenize stage first")
    for name, section in json.loads(recorded.read_text(encoding="utf-8")).items():
        p = p.with_section(name, section, recorded)  # the masking, for a masked LM
    data = load_from_disk(str(tokenized_dir))
    train = data["train"]
    if p.finetune.max_train_samples and len(train) > p.finetune.max_train_samples:
        train = train.shuffle(seed=p.base.seed).select(range(p.finetune.max_train_samples))
    data_digest = lineage.file_digest(validated_dir)
    # Checkpoints are only resumed by the same code on the same data with the same params.
    task = tasks.get(p.base.task)
    code = imports.code_digest(__spec__.name)
    fingerprint = hashlib.sha256(
        json.dumps(
            {"params": p.as_dict(), "data": data_digest, "code": code}, sort_keys=True
        ).encode()
    ).hexdigest()
    args = training_arguments(p, checkpoints, task)  # starts the process group under torchrun
    with args.main_process_first(local=False, desc="checkpoint state"):
        resume, run_id = checkpoint_state(checkpoints, fingerprint, main)

    source = resolve_model(p.base.model)
    extended = tokenized_dir / TOKENIZER_DIR  # the tokenize stage's, when it added characters
    trust = p.base.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(
        str(extended) if extended.is_dir() else source, **load_options(trust, weights=False)
    )
    # A checkpoint that already has a head of another size (e.g. a classifier fine-tuned on other
    # labels) gets a new one; the encoder's weights are what is reused.
    kwargs = {
        "ignore_mismatched_sizes": True,
        **task.model_kwargs(labels),
        **task.model_settings(p),
    }
    with progress.load_report_as_one_line():
        model, loading = from_pretrained(
            task.model_class(), source, trust, output_loading_info=True, **kwargs
        )
    log.info("base %s: %s", p.base.model, progress.describe_loading(loading))
    base_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > base_vocab:
        log.info("resizing embeddings %d -> %d for the added tokens", base_vocab, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    task.prepare_training(model)
    cfg = p.finetune
    own_rates = task.learning_rates(p)
    custom = (
        optim.optimizer(model, cfg.learning_rate, cfg.layer_lr_decay, cfg.weight_decay, own_rates)
        if cfg.layer_lr_decay < 1.0 or own_rates
        else None  # the Trainer's own AdamW
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer, p),
        compute_metrics=task.compute_metrics(labels),
        preprocess_logits_for_metrics=task.reduce_logits(),
        optimizers=(custom, None),
        callbacks=[  # patience 0: every epoch runs
            EarlyStoppingCallback(early_stopping_patience=patience)
            for patience in [p.finetune.early_stopping_patience]
            if patience > 0
        ],
    )
    trainer.remove_callback(ProgressCallback)  # its per-step dicts: MLflow and curves have them
    trainer.add_callback(progress.StageProgress())
    if not main:  # the other ranks train in step with rank 0, which tracks and saves
        trainer.train(resume_from_checkpoint=resume)
        return {"rank": int(os.environ["RANK"])}
    gap = tracking_gaps.Gap()
    trainer.add_callback(tracking_gaps.mlflow_callback(gap))
    name = None if run_id else tracking.run_name(p.tracking)
    active = mlflow.start_run(run_id=run_id, run_name=name)  # the store answered connect()
    try:
        marker = {"fingerprint": fingerprint, "run_id": active.info.run_id}
        write_json(checkpoints / FINGERPRINT, marker)
        gap.call(
            "tags", mlflow.set_tags, {**tracking.provenance_tags(), "data_sha256": data_digest}
        )
        gap.call(
            "params",
            tracking.log_params_once,
            {
                **p.flat(),
                "data_sha256": data_digest,
                "train_rows": len(train),
                "added_tokens": len(tokenizer) - base_vocab,
            },
        )
        summary_table = task.training_summary(train)
        with quiet_dataset_logging():
            dataset = mlflow.data.from_pandas(
                summary_table,
                source=str(layout.split_file(validated_dir, layout.TRAIN)),
                name="train",
                targets="labels" if "labels" in summary_table else None,
            )
            gap.call("training data", mlflow.log_input, dataset, context="training")
        result = trainer.train(resume_from_checkpoint=resume)
        with atomic_dir(out_dir) as tmp:
            trainer.save_model(str(tmp))
            # A pickle of the arguments: not shipped, so that nothing loads it (params.yaml and
            # MLflow hold them).
            (tmp / "training_args.bin").unlink(missing_ok=True)
            drop_load_options(tmp / "tokenizer_config.json")
    except BaseException:
        gap.call("end of the failed run", mlflow.end_run, status="FAILED")
        raise
    model_hash = lineage.model_digest(out_dir)
    best = trainer.state.best_metric
    summary = {
        "model_sha256": model_hash,
        "mlflow_run_id": active.info.run_id,
        "tracking_uri": tracking.portable_uri(uri),
        "train_rows": len(train),
        "epochs_run": round(trainer.state.epoch or 0, 4),
        "global_steps": trainer.state.global_step,
        "selection_metric": task.selection_metric,
        f"best_validation_{task.selection_metric}": best,
        "vocab_size": len(tokenizer),
        "added_tokens": max(0, len(tokenizer) - base_vocab),
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name,
        "train_loss": result.training_loss,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "seconds": round(time.perf_counter() - started, 1),  # the whole stage, loads included
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "resumed": bool(resume),
        "torch_threads": torch.get_num_threads(),
        "processes": world_size(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": "bf16" if trainer.args.bf16 else "fp32",
        "machine": lineage.machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_curves(trainer.state.log_history, curves_dir, task.selection_metric)
    gap.call("model tag", mlflow.set_tag, tracking.MODEL_TAG, model_hash)
    gap.call(
        "best metric",
        mlflow.log_metric,
        f"best_validation_{task.selection_metric}",
        best or 0.0,
    )
    gap.call("curves", mlflow.log_artifacts, str(curves_dir), artifact_path="training_curves")
    gap.call("end of the run", mlflow.end_run)
    summary["tracking_gap"] = gap.as_dict()
    write_json(report, summary)
    log.info(
        "model %s saved to %s (best validation %s %.4f)",
        model_hash[:12],
        out_dir,
        task.selection_metric,
        best or 0.0,
    )
    if summary["tracking_gap"]:
        # Saved, but not all of it tracked: stop `dvc repro` here, so that the next stages do
        # not open a second run for this model; the re-run resumes from the last checkpoint.
        raise tracking_gaps.TrackingGap(
            f"the model is saved to {out_dir} and the report to {report}, but MLflow ({uri}) "
            f"stopped answering at {gap.failed_at} ({gap.first_failure}); {gap.skipped} "
            "logging call(s) were skipped. Once the store answers: `make relog` fills the run "
            f"in from {report}, then `dvc repro` goes on"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--validated", type=Path, required=True, help="for labels and digest")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="fine-tuned model folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="persisted across runs")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--curves", type=Path, required=True, help="folder for curve CSVs")
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(
            args.tokenized,
            args.validated,
            params.load(args.params, *SECTIONS),
            args.out,
            args.checkpoints,
            args.report,
            args.curves,
        ),
        writes=[args.out, args.checkpoints, args.report, args.curves],
    )


if __name__ == "__main__":
    raise SystemExit(main())
