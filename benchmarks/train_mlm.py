"""Masked-LM training step: the vocabulary-wide head on every position against only on the masked
ones (what the fill-mask task trains with), in one process on the same batch.

    python -m benchmarks.train_mlm --model package:cognition/model --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import measure, report

HEADING = "Masked-LM training step (CPU)"


def step_seconds(model: Any, batch: dict[str, Any], steps: int) -> list[float]:
    """Wall time of `steps` forward + backward + AdamW steps, after one warm-up step."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:
            times.append(time.perf_counter() - start)
    return times


def run(model_spec: str, batch_size: int, length: int, probability: float, steps: int) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM

    from pipeline.core.sources import resolve_model
    from pipeline.tasks.masked_lm import sparse_head

    torch.manual_seed(0)
    torch.set_num_threads(measure.machine()["physical_cores"] or 1)
    model = AutoModelForMaskedLM.from_pretrained(resolve_model(model_spec))
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch_size, length))  # no special tokens
    labels = torch.full_like(ids, sparse_head.IGNORE)
    chosen = torch.rand(ids.shape) < probability
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():  # both losses on the same weights, before any step changes them
        dense_loss = float(model(**batch).loss)
        handles = sparse_head.install(model)
        sparse_loss = float(model(**batch).loss)
        for handle in handles:
            handle.remove()
    dense = step_seconds(model, batch, steps)
    handles = sparse_head.install(model)
    sparse = step_seconds(model, batch, steps)
    for handle in handles:
        handle.remove()
    return {
        "model": model_spec,
        "vocab": vocab,
        "batch": f"{batch_size} x {length}, {int(chosen.sum())} masked ({probability:.0%})",
        "dense_s": statistics.median(dense),
        "sparse_s": statistics.median(sparse),
        "speedup": statistics.median(dense) / statistics.median(sparse),
        "loss_dense": dense_loss,
        "loss_sparse": sparse_loss,
        "threads": torch.get_num_threads(),
    }


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    rows = [
        {"head": "every position (stock)", "s": data["dense_s"], "x": 1.0},
        {"head": "masked positions only (ours)", "s": data["sparse_s"], "x": data["speedup"]},
    ]
    return "\n".join(
        [
            f"Measured {data['date']} with",
            "",
            f"    {command}",
            "",
            f"- Machine: {machine['cpu']} (flags: {', '.join(machine['cpu_flags'])}), "
            f"{data['threads']} threads.",
            f"- Model: `{data['model']}` ({data['vocab']} tokens); batch {data['batch']}; median "
            "of the timed steps (forward, backward, AdamW); the same batch for both. Loss on it: "
            f"{data['loss_dense']:.6f} (every position) and {data['loss_sparse']:.6f} "
            "(masked only).",
            "",
            report.table(rows, {"head": "output layer", "s": "s / step", "x": "× stock"}),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="package:cognition/model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--probability", type=float, default=0.15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_train_mlm.json"))
    args = parser.parse_args(argv)
    data = run(args.model, args.batch_size, args.length, args.probability, args.steps)
    report.publish(
        "benchmarks.train_mlm", argv, HEADING, data, measure.machine(), args.out, args.json
    )
    print(
        f"masked-LM step: {data['dense_s']:.3f} s (every position) vs {data['sparse_s']:.3f} s "
        f"(masked only): {data['speedup']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
