"""The GPU check, for a GPU machine that has only its system Python's stack and what was
carried (benchmarks.gpu_carry): join and install the carried files, then run each part in its
own process under its own time limit, 8 minutes in all, writing gpu_check.json and
gpu_check.md into --out after every part, whatever failed or ran out of time before.

    python3 -m benchmarks.gpu_check --carry gpu-carry --out "$OUT"

Parts: the machine's facts; the gpu-marked tests; ONNX Runtime CUDA fp16 and fp32-optimized with
IO binding against PyTorch fp32, fp16 and bf16 at batch 1, 32 and 256 and the model alone at 128
tokens; fine-tuning, the plain recipe against this pipeline's (bf16), with MFU.

`--device cpu --strict-imports` rehearses it anywhere (the test suite does, on the tiny model):
tiny sizes, and each part in a process that sees only the GPU machine's stack and the carried
wheels (benchmarks.gpu_stack), failing on any module imported from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import gpu_carry, gpu_stack, report

BUDGET_S = 480
# Seconds each part may take at most, and never more than what is left of the budget: joining
# and installing the carried files comes first and counts too (the commands that carried the
# pieces have usually done it already).
LIMITS = {"env": 40, "tests": 100, "inference": 180, "training": 120}
PARTS = ("env", "tests", "inference", "training")
NEEDS_MODEL = ("inference", "training")
MIN_PART_S = 10  # a part is not started with less of the budget left
SIZES = {
    "cuda": {
        "batch_sizes": [1, 32, 256],
        "batches": 20,
        "model_only_batch_sizes": [32, 256, 1024],
        "model_only_runs": 30,
        "train_rows": 0,  # the whole training split: about 9,600 texts
    },
    "cpu": {
        "batch_sizes": [1, 4],
        "batches": 2,
        "model_only_batch_sizes": [2, 4],
        "model_only_runs": 2,
        "train_rows": 64,
    },
}
# What comes back from the machine: at most 8 files, 2 folders deep.
JSON_FILE, MARKDOWN_FILE, LOG_FILE = "gpu_check.json", "gpu_check.md", "gpu_check.log"
PARTS_DIR = "parts"  # each part's own results, rewritten after every step (benchmarks.gpu_parts)


def run_part(
    name: str,
    spec: dict[str, Any],
    env: dict[str, str],
    limit: float,
    python: list[str],
    workdir: Path,
) -> dict[str, Any]:
    """One part in its own process group, killed at `limit` seconds; its state and whatever
    results it wrote. Its output goes to the one log (the machine returns few files)."""
    out = Path(spec["out"])
    result_path = out / PARTS_DIR / f"{name}.json"
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps({**spec, "results": str(result_path)}), encoding="utf-8")
    log_path = out / LOG_FILE
    start = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"===== {name} (limit {limit:.0f} s) =====\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            [*python, "-m", "benchmarks.gpu_parts", name, str(spec_path)],
            cwd=gpu_stack.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code, status = None, "timeout"
    results = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    state = {
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "limit_s": round(limit),
        "exit_code": code,
    }
    if status != "ok":
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(offset)
            tail = log.read().strip().splitlines()
        state["error"] = "\n".join(tail[-15:]) if tail else "(no output)"
    return {**state, **results}


def audit(state: dict[str, Any], allowed: dict[str, list[str]], strict: bool) -> None:
    """Name the modules a part imported from outside the stack; with `strict` that fails it."""
    found = gpu_stack.outside(state.pop("modules", {}), allowed)
    if not found:
        return
    state["outside_stack"] = found
    if strict:
        state["status"] = "failed"
        named = ", ".join(f"{name} ({where})" for name, where in found.items())
        state["error"] = f"imported from outside the GPU machine's stack: {named}"


def note(part: dict[str, Any]) -> str:
    """The last line of a part's error, short enough for a table cell."""
    lines = (part.get("error") or "").strip().splitlines()
    return lines[-1][:160].replace("|", "/") if lines else ""


def markdown(data: dict[str, Any]) -> str:
    """gpu_check.md: the parts' states, the machine, the tests, then each part's section."""
    lines = [
        "# GPU check",
        "",
        f"Run {data['started']} on device `{data['device']}` with `{data['command']}`; budget "
        f"{data['budget_s']} s, {data.get('seconds', '…')} s used.",
        "",
    ]
    parts = data["parts"]
    rows = [{"part": name, **part, "note": note(part)} for name, part in parts.items()]
    columns = {"part": "part", "status": "status", "seconds": "s", "limit_s": "limit s"}
    lines += [report.table(rows, columns | {"note": "note"}).rstrip()]
    best = parts.get("inference", {}).get("headline", {})
    if "model_only" in best:
        b = best["model_only"]
        lines += [
            "",
            f"Best at {parts['inference']['inference']['fixed_tokens']} tokens, the model alone: "
            f"**{b['sequences_per_s']:,.0f} sequences/s** ({b['backend']}, batch {b['batch']}).",
        ]
    if "end_to_end" in best:
        b = best["end_to_end"]
        lines += [
            "",
            f"Best end to end (tokenising included): {b['texts_per_s']:,.0f} texts/s "
            f"({b['backend']}, batch {b['batch']}).",
        ]
    facts = parts.get("env", {}).get("facts")
    if facts:
        lines += ["", "## Machine", ""]
        lines += [f"- {key}: `{json.dumps(value)}`" for key, value in facts.items()]
    if parts.get("tests", {}).get("tests") is not None:
        lines += ["", "## gpu-marked tests", ""]
        columns = {"test": "test", "when": "phase", "outcome": "outcome", "seconds": "s"}
        tests = [
            {**t, "reason": note({"error": t.get("reason")})} for t in parts["tests"]["tests"]
        ]
        lines += [report.table(tests, columns | {"reason": "reason"}).rstrip()]
    for name, heading in (("inference", "Inference"), ("training", "Fine-tuning")):
        if parts.get(name, {}).get("markdown"):
            lines += ["", f"## {heading}", "", parts[name]["markdown"]]
    return "\n".join(lines) + "\n"


def write(out: Path, data: dict[str, Any]) -> None:
    report.write_json(out / JSON_FILE, data)
    (out / MARKDOWN_FILE).write_text(markdown(data), encoding="utf-8")


def part_env(carry: Path, mirror: Path | None) -> dict[str, str]:
    """The parts' environment: the carried wheels first, then (rehearsing) the mirror of the
    stack, then the repository; no network."""
    paths = [carry / gpu_carry.SITE, *([mirror] if mirror else []), gpu_stack.REPO]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(
    carry: Path,
    out: Path,
    device: str = "cuda",
    strict: bool = False,
    budget: float = BUDGET_S,
    parts: tuple[str, ...] = PARTS,
    command: str = "",
) -> dict[str, Any]:
    """Receive, then each part within what is left of `budget`; the report, also in `out`."""
    start = time.monotonic()
    carry, out = carry.resolve(), out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # an earlier run's
    data: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "budget_s": budget,
        "strict_imports": strict,
        "parts": {},
    }
    try:
        bundles = gpu_carry.receive(carry)
    except Exception as exc:  # reported; the parts that need nothing carried still run
        bundles = {gpu_carry.MANIFEST: exc}
    errors = [f"{name}: {e}" for name, e in bundles.items() if isinstance(e, Exception)]
    data["parts"]["receive"] = {
        "status": "failed" if errors else "ok",
        "seconds": round(time.monotonic() - start, 1),
        "bundles": {name: str(state) for name, state in bundles.items()},
        **({"error": "\n".join(errors)} if errors else {}),
    }
    if (carry / gpu_carry.MANIFEST).is_file():
        manifest = gpu_carry.load_manifest(carry)
        data["carried"] = {
            "prepared": manifest["created"],
            "bundles": [
                {k: b[k] for k in ("file", "sha256", "version", "source") if k in b}
                for b in manifest["bundles"]
            ],
        }
    write(out, data)
    model = carry / gpu_carry.MODEL
    site = carry / gpu_carry.SITE  # where the parts find the carried wheels first
    dists, missing = gpu_stack.closure(gpu_stack.STACK + gpu_stack.CARRIED, [str(site), *sys.path])
    data["stack_missing_here"] = missing
    allowed = gpu_stack.allowed_locations(dists, [*gpu_stack.PROJECT, site])
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        mirror = gpu_stack.mirror(dists, Path(tmp) / "stack") if strict else None
        env = part_env(carry, mirror)
        python = [sys.executable, *(["-S"] if strict else [])]  # -S: no site-packages
        spec = {
            "device": device,
            "out": str(out),
            "date": data["started"],
            "command": command,
            "model_dir": str(model / "onnx"),
            "finetuned": str(model / "finetuned"),
            "validated": str(model / "validated"),
            **SIZES[device],
        }
        for name in parts:
            left = budget - (time.monotonic() - start)
            limit = min(LIMITS[name], left)
            if name in NEEDS_MODEL and not (model / "onnx").is_dir():
                reason = "\n".join(errors) or f"{model} holds no model"
                data["parts"][name] = {"status": "skipped", "error": f"no model: {reason}"}
            elif left < MIN_PART_S:
                data["parts"][name] = {
                    "status": "skipped",
                    "error": f"the {budget:g} s budget is spent ({left:.0f} s left)",
                }
            else:
                state = run_part(name, spec, env, limit, python, Path(tmp))
                audit(state, allowed, strict)
                data["parts"][name] = state
            data["seconds"] = round(time.monotonic() - start, 1)
            write(out, data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, required=True, help="the carried folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown")
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda")
    parser.add_argument(
        "--strict-imports",
        action="store_true",
        help="run each part seeing only the GPU machine's stack; fail on any other import",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    used = sys.argv[1:] if argv is None else argv
    data = run(
        args.carry,
        args.out,
        args.device,
        args.strict_imports,
        args.budget,
        tuple(args.parts),
        shlex.join(["python3", "-m", "benchmarks.gpu_check", *used]),
    )
    print((args.out / MARKDOWN_FILE).read_text(encoding="utf-8"))
    failed = [name for name, part in data["parts"].items() if part["status"] != "ok"]
    if failed:
        print(f"not ok: {', '.join(failed)} (see {args.out / JSON_FILE})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
