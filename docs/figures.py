"""The docs' figure and results table, drawn from the committed pipeline reports.

- the training curves (reports/training/*.csv) as an SVG;
- the section "Results of the committed run" of docs/text-classification.md, rendered from
  reports/eval.json, reports/export.json and reports/train.json;
- the section "Decodings compared" of docs/token-classification.md, rendered from the records
  `make exp ... REPORT=reports/experiments/NAME.json` writes (one per token-classification run);
- the section "Measured" of docs/masked-lm.md, rendered from the fill-mask records among them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from pathlib import Path

import matplotlib
import yaml
from matplotlib.figure import Figure

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def read_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a numeric CSV; a missing file or column fails with its name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline (make run) first")
    with path.open(encoding="utf-8", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def draw(curves: Path, out: Path) -> None:
    """Training loss, validation loss and validation metrics per epoch, side by side."""
    train = read_csv(curves / "train_loss.csv")
    evals = read_csv(curves / "eval.csv")
    best = max(evals, key=lambda row: row["selection_score"])
    # A Figure without pyplot needs no GUI backend.
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="training loss")
    loss_ax.plot(
        [r["epoch"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss"
    )
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    metric_ax.plot(
        [r["epoch"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="accuracy"
    )
    metric_ax.plot(
        [r["epoch"] for r in evals], [r["eval_macro_f1"] for r in evals], "o-", label="macro-F1"
    )
    metric_ax.axvline(best["epoch"], color="grey", linestyle=":", label="kept: best macro-F1")
    metric_ax.set(xlabel="epoch", title="Validation")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fixed salt and no date: the same CSVs give the same SVG bytes, so a redraw diffs cleanly;
    # text stays text (smaller, searchable).
    with matplotlib.rc_context({"svg.hashsalt": "training-curves", "svg.fonttype": "none"}):
        fig.savefig(out, format="svg", metadata={"Date": None})
    log.info("%s: %d training points, %d epochs", out, len(train), len(evals))


RESULTS_HEADING = "Results of the committed run"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline (make run) first")
    return json.loads(path.read_text(encoding="utf-8"))


def results(reports: Path) -> str:
    """The quality and export gates of the committed default run, with what it ran on."""
    ev, ex, tr = (read_json(reports / name) for name in ("eval.json", "export.json", "train.json"))
    if "machine" not in tr:
        raise ValueError(f"{reports / 'train.json'} records no machine: re-run make run")
    m, test, val, cal = tr["machine"], ev["overall"], ev["validation"], ev["calibration"]
    versions = ", ".join(f"{name} {version}" for name, version in m["versions"].items())
    lines = [
        f"`make run` on the default config, finished {tr['finished']} on {m['cpu']} (flags: "
        f"{', '.join(m['cpu_flags'])}), {m['logical_cores']} cores, {m['os']}, Python "
        f"{m['python']}; {versions}. Fine-tuning: {tr['precision']}, {tr['epochs_run']:g} "
        f"epochs of {tr['train_rows']:,} rows in {tr['train_runtime_s']:.0f} s. Rendered by "
        "`make docs-figures` from `reports/eval.json`, `reports/export.json` and "
        "`reports/train.json`.",
        "",
        "| split | rows | accuracy | macro-F1 | ECE, uncalibrated | ECE, calibrated |",
        "|---|---|---|---|---|---|",
        f"| test | {test['rows']:,} | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | "
        f"{cal['ece_before']:.4f} | {cal['ece_after']:.4f} |",
        f"| validation | {val['rows']:,} | {val['accuracy']:.4f} | {val['macro_f1']:.4f} | "
        f"{val['ece']:.4f} | – (the temperature is fitted on it) |",
        "",
        f"Temperature {cal['temperature']:.3f}; test NLL {cal['nll_before']:.3f} before, "
        f"{cal['nll_after']:.3f} after. The exported graphs against the fine-tuned model on the "
        f"{ex['parity']['texts']:,} test texts ({ex['gate_metric']} drop and label agreement "
        "gate each variant):",
        "",
        "| graph | label agreement | accuracy drop | MB | shipped |",
        "|---|---|---|---|---|",
    ]
    for name, gate in ex["variants"].items():
        if "agreement" not in gate:  # the reference graph: checked for parity, not gated
            lines.append(
                f"| {name} | parity: {gate['label_mismatches']} label mismatches, max logit "
                f"difference {gate['max_abs_logit_diff']:.1e} | – | – | "
                f"{'yes' if gate['passed'] else 'no'} |"
            )
            continue
        lines.append(
            f"| {name} | {gate['agreement']:.4f} | {gate['metric_drop']:+.4f} | "
            f"{gate['bytes'] / 2**20:.1f} | {'yes' if gate['passed'] else 'no'} |"
        )
    for name, why in ex.get("rejected_variants", {}).items():
        lines.append(f"| {name} | – | – | – | no: {why} |")
    return "\n".join(lines) + "\n"


EXPERIMENTS_HEADING = "Decodings compared"
DECODINGS = ("argmax", "viterbi", "crf")


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def experiments(folder: Path) -> str:
    """Entity scores of every decoding of every token-classification experiment recorded in
    `folder`, with what each ran on and the command that ran it."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if "decoding" in record.get("eval", {}):
            records.append((path, record))
    if not records:
        raise FileNotFoundError(
            f"no token-classification experiment recorded in {folder}: run "
            "`make exp CONFIG=configs/ner-en.yaml REPORT=reports/experiments/ner-en.json`"
        )
    lines = [
        "Each experiment is one `make exp` of a config (ingest to export, in a temporary copy of "
        "the repo); every decoding it allows is scored on the same test logits. Rendered by "
        "`make docs-figures` from `reports/experiments/*.json`.",
        "",
        "| experiment | decoding | test entity F1 (P / R) | F1 per type | test sentences with an "
        "invalid tag sequence | validation F1 | fine-tuning | whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for path, r in records:
        ev, tr = r["eval"], r["train"]
        rows = ev["overall"]["rows"]
        for mode in (m for m in DECODINGS if m in ev["decoding"]):
            d = ev["decoding"][mode]
            types = sorted(
                ((k[3:], v) for k, v in d.items() if k.startswith("f1_")), key=lambda kv: -kv[1]
            )
            per_type = ", ".join(f"{kind} {value:.2f}" for kind, value in types) or "–"
            shipped = " (shipped)" if d.get("shipped") else ""
            validation = ev.get("validation", {}).get(f"{mode}_f1")
            lines.append(
                f"| `{r['experiment']}` | {mode}{shipped} | {d['f1']:.3f} ({d['precision']:.3f} "
                f"/ {d['recall']:.3f}) | {per_type} | {d['invalid_sequences']:,} of {rows:,} | "
                f"{'–' if validation is None else f'{validation:.3f}'} | "
                f"{_minutes(tr['train_runtime_s'])} | {_minutes(r['wall_seconds'])} |"
            )
        m = r["machine"]
        notes.append(
            f"- `{r['experiment']}` (`{path.name}`): `{r['command']}`, finished "
            f"{r['finished']} on {m['cpu']} (flags: {', '.join(m['cpu_flags'])}), "
            f"{m['logical_cores']} cores; {tr['precision']}, {_epochs(tr['epochs_run'])} of "
            f"{tr['train_rows']:,} training windows."
            + (
                f" CRF scores after training (all start at 0): largest |transition| "
                f"{r['crf']['max_abs_transition']:g}, largest |start or end| "
                f"{r['crf']['max_abs_start_end']:g}."
                if "crf" in r
                else ""
            )
        )
    return "\n".join([*lines, "", *notes]) + "\n"


MASKED_LM_HEADING = "Measured"


def _ran_with(path: Path, record: dict) -> dict:
    """The params an experiment ran with: the record's own copy, else its config file (from the
    repo root) with the record's --set values (records written before they kept params)."""
    if "params" in record:
        return record["params"]
    values = yaml.safe_load((ROOT / record["config"]).read_text(encoding="utf-8")) or {}
    for key, value in _set_values(record).items():
        section_name, _, name = key.partition(".")
        values.setdefault(section_name, {})[name] = value
    return values


def _set_values(record: dict) -> dict[str, object]:
    """The record's `--set section.key=value` items, by dotted key."""
    values = {}
    for item in record.get("set", []):
        key, _, value = str(item).partition("=")
        values[key.strip()] = yaml.safe_load(value)
    return values


def _base_model(record: dict, ran: dict) -> str:
    """base.model as the command named it (`--set base.model=...`) or else the config. A model
    saved in the repo is passed to the experiment by its absolute path (its temporary copy lacks
    git-ignored folders), which names only the machine that ran it."""
    model = str(ran["base"]["model"])
    if Path(model).is_absolute():
        given = _set_values(record).get("base.model")
        if given is not None:
            return str(given)
        config = yaml.safe_load((ROOT / record["config"]).read_text(encoding="utf-8")) or {}
        model = str((config.get("base") or {}).get("model", model))
    return model


def _epochs(count: float) -> str:
    return f"{count:g} epoch" if count == 1 else f"{count:g} epochs"


def _count(right: int, total: int) -> str:
    return f"{right}/{total}"


def _probes(overall: dict) -> str:
    """Probe results as the runtime fills them (beam search): per kind where the probe file
    names kinds, with controls that bring in the avoided text; else the share right."""
    if "probes" not in overall:
        return "none"
    kinds = sorted(k[len("probes_") :] for k in overall if k.startswith("probes_"))
    kinds = [k for k in kinds if k != "guarded"]
    if not kinds:
        return (
            f"{overall['probe_top1_beam_before']:.1%} → {overall['probe_top1_beam']:.1%} "
            f"of {overall['probes']}"
        )
    parts = [
        f"{kind} {overall[f'probe_right_{kind}_before']} → "
        f"{_count(overall[f'probe_right_{kind}'], overall[f'probes_{kind}'])}"
        for kind in kinds
    ]
    if "probes_guarded" in overall:
        parts.append(
            f"controls filled with the taught text: {overall['probe_brings_in_avoided']} of "
            f"{overall['probes_guarded']}"
        )
    return "; ".join(parts)


def masked_lm(folder: Path) -> str:
    """Held-out perplexity, masked top-1 and probe fills of every fill-mask experiment recorded
    in `folder`, with what each ran on and the command that ran it."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if "perplexity" in record.get("eval", {}).get("overall", {}):
            records.append((path, record))
    if not records:
        raise FileNotFoundError(
            f"no fill-mask experiment recorded in {folder}: run `make exp "
            "CONFIG=configs/pretrain-zh.yaml REPORT=reports/experiments/pretrain-zh.json`"
        )
    lines = [
        "Each row is one `make exp` of a config (ingest to export, in a temporary copy of the "
        "repo), rendered by `make docs-figures` from `reports/experiments/*.json`. Probes are "
        "filled as the runtime fills them by default (beam search): right before → after, per "
        "kind of probe.",
        "",
        "| experiment | base.model | held-out blocks | perplexity before → after | masked top-1 "
        "before → after | probes right (beam) | fine-tuning | whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for path, r in records:
        o, tr, ran = r["eval"]["overall"], r["train"], _ran_with(path, r)
        before = o.get("perplexity_before")
        change = f" ({o['perplexity_change']:+.1%})" if "perplexity_change" in o else ""
        perplexity = (
            f"{before:,.1f} → {o['perplexity']:,.1f}{change}"
            if before is not None
            else f"(new tokens: none before) → {o['perplexity']:,.1f}"
        )
        accuracy = (
            f"{o['masked_accuracy_before']:.1%} → {o['masked_accuracy']:.1%}"
            if "masked_accuracy_before" in o
            else f"→ {o['masked_accuracy']:.1%}"
        )
        base = _base_model(r, ran)
        lines.append(
            f"| `{r['experiment']}` | `{base if len(base) < 40 else base[:37] + '...'}` | "
            f"{o['rows']:,} | {perplexity} | {accuracy} | {_probes(o)} | "
            f"{_minutes(tr['train_runtime_s'])} | {_minutes(r['wall_seconds'])} |"
        )
        m = r["machine"]
        notes.append(
            f"- `{r['experiment']}` (`{path.name}`): `{r['command']}`, finished "
            f"{r['finished']} on {m['cpu']} (flags: {', '.join(m['cpu_flags'])}), "
            f"{m['logical_cores']} cores; {tr['precision']}, {_epochs(tr['epochs_run'])} of "
            f"{tr['train_rows']:,} training blocks; base.model `{base}`."
        )
    return "\n".join([*lines, "", *notes]) + "\n"


def section(page: str, heading: str) -> str | None:
    found = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    return found.group(1).strip() if found else None


def write_section(page: Path, heading: str, body: str, source: Path) -> None:
    """Replace the body of `## heading` in `page` with `body`."""
    text = page.read_text(encoding="utf-8")
    old = section(text, heading)
    if old is None:
        raise ValueError(f"{page} has no section '## {heading}' to fill")
    start = text.index(f"## {heading}")
    end = text.index(old, start) + len(old)
    page.write_text(f"{text[:start]}## {heading}\n\n{body.strip()}{text[end:]}", "utf-8")
    log.info("%s: section %r rendered from %s", page, heading, source)


def write_results(reports: Path, page: Path) -> None:
    write_section(page, RESULTS_HEADING, results(reports), reports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--curves", type=Path, required=True, help="the finetune stage's CSVs")
    parser.add_argument("--out", type=Path, required=True, help="the SVG to write")
    parser.add_argument("--reports", type=Path, help="the pipeline reports (reports/)")
    parser.add_argument("--page", type=Path, help="the page with the results section")
    parser.add_argument(
        "--experiments", type=Path, help="the experiment records (reports/experiments/)"
    )
    parser.add_argument(
        "--experiments-page", type=Path, help=f"the page with the section {EXPERIMENTS_HEADING!r}"
    )
    parser.add_argument(
        "--masked-lm-page", type=Path, help=f"the page with the section {MASKED_LM_HEADING!r}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    draw(args.curves, args.out)
    if args.reports and args.page:
        write_results(args.reports, args.page)
    if args.experiments and args.experiments_page:
        body = experiments(args.experiments)
        write_section(args.experiments_page, EXPERIMENTS_HEADING, body, args.experiments)
    if args.experiments and args.masked_lm_page:
        body = masked_lm(args.experiments)
        write_section(args.masked_lm_page, MASKED_LM_HEADING, body, args.experiments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
