"""Run one accuracy-aware quantiser on one benchmark task in a fresh process; print JSON.

    python -m benchmarks.threshold_worker qnnlib-threshold|qnnlib-threshold-float|qnnlib-raise|nncf|nncf-ac TASK OUT
        [--max-drop 0.02]

``qnnlib-raise`` is the threshold without the range search, weight clipping and bias correction
(``QuantConfig(optimize=False)``): calibration, then raising alone, to compare with NNCF's reverting.
``qnnlib-threshold-float`` is the threshold with ``precisions=("int8", "float")``: raised groups go
straight to float, as NNCF's accuracy control reverts layers to float.

``nncf`` and ``nncf-ac`` must run under NNCF's own venv (``bench_threshold`` makes it). The task is
rebuilt from ``benchmarks.tasks`` with the seeds ``bench_threshold`` uses: samples ``0..CALIB-1``
calibrate, the next ``VALIDATION`` validate. The validation score is the task metric against the
float model's answers, higher is better (CER enters as ``1 - CER``), so the float model scores 1 and
``--max-drop`` is an absolute drop from 1 for both tools. Models below opset 13 are converted to 13
for NNCF, as for onnxruntime's quantiser. The reported time covers the quantiser call only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_quantize import HELD
from benchmarks.tasks import TASKS, Task

#: Calibration and validation samples for the accuracy-aware runs.
CALIB = 32
VALIDATION = 32


def build_task(name: str) -> Task:
    """The task with ``CALIB + VALIDATION`` calibration-side samples and its held-out samples."""
    return TASKS[name](CALIB + VALIDATION, HELD.get(name, 64))


def score(task: Task, reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """Task metric against the float answers, oriented so that higher is better and float scores 1."""
    value = task.metric(reference, outputs)
    return value if task.higher_is_better else 1.0 - value


def _scorer(task: Task, feeds: list[dict[str, np.ndarray]],
            reference: list[list[np.ndarray]]) -> Callable[[Any], float]:
    def evaluate(session: Any) -> float:
        return score(task, reference, [session.run(None, f) for f in feeds])
    return evaluate


def run_qnnlib(task: Task, out: Path, max_drop: float, optimize: bool | None = None,
               precisions: tuple[str, ...] = ("int8", "int16", "float")) -> dict[str, Any]:
    import qnnlib
    from qnnlib.graph.model_io import load_model, make_session

    calib = [{task.input_name: x} for x in task.calib[:CALIB]]
    validation = [{task.input_name: x} for x in task.calib[CALIB:CALIB + VALIDATION]]
    float_session = make_session(load_model(str(task.model_path)))
    evaluate = _scorer(task, validation, [float_session.run(None, f) for f in validation])
    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(eval_fn=evaluate, max_drop=max_drop), optimize=optimize,
                                precisions=precisions)
    start = time.perf_counter()
    result = qnnlib.quantize(str(task.model_path), calib, validation=validation, config=config)
    elapsed = time.perf_counter() - start
    result.save(out)
    threshold = result.report.threshold
    return {"time": elapsed, "met": result.report.threshold_met,
            "validation_score": None if threshold is None else threshold.value,
            "layers_raised_report": len(result.report.layers_above_int8),
            "layer_precisions": dict(Counter(layer.precision for layer in result.plan.layers)),
            "curve_points": None if result.report.mixed is None else len(result.report.mixed.curve),
            "group_precisions": None if result.report.mixed is None or result.report.mixed.chosen is None
            else result.report.mixed.chosen.counts,
            "measured_points": None if result.report.mixed is None else
            sum(1 for p in result.report.mixed.curve if p.value is not None)}


def run_nncf(task: Task, out: Path, max_drop: float, accuracy_control: bool) -> dict[str, Any]:
    import nncf
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(task.model_path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        model = onnx.version_converter.convert_version(model, 13)
    calib = [{task.input_name: x} for x in task.calib[:CALIB]]
    validation = [{task.input_name: x} for x in task.calib[CALIB:CALIB + VALIDATION]]
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def session_of(candidate: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(candidate.SerializeToString(), options, providers=["CPUExecutionProvider"])

    float_session = session_of(model)
    evaluate = _scorer(task, validation, [float_session.run(None, f) for f in validation])
    reached: list[float] = []

    def validate(candidate: onnx.ModelProto, data: object) -> tuple[float, None]:
        value = evaluate(session_of(candidate))
        reached.append(value)
        return value, None

    start = time.perf_counter()
    if accuracy_control:
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calib), nncf.Dataset(validation), validate, max_drop=max_drop,
            subset_size=len(calib))
    else:
        quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib))
    elapsed = time.perf_counter() - start
    onnx.save(quantized, str(out))
    final = evaluate(session_of(quantized))
    return {"time": elapsed, "met": final >= 1.0 - max_drop, "validation_score": final,
            "validations": len(reached)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=("qnnlib-threshold", "qnnlib-threshold-float", "qnnlib-raise", "qnnlib-mixed",
                                         "nncf", "nncf-ac"))
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-drop", type=float, default=0.02)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    task = build_task(args.task)
    if args.tool.startswith("qnnlib"):
        precisions = {"qnnlib-mixed": ("int4", "int8", "int16", "float"),
                      "qnnlib-threshold-float": ("int8", "float")}.get(args.tool, ("int8", "int16", "float"))
        stats = run_qnnlib(task, args.out, args.max_drop, optimize=False if args.tool == "qnnlib-raise" else None,
                           precisions=precisions)
    else:
        stats = run_nncf(task, args.out, args.max_drop, accuracy_control=args.tool == "nncf-ac")
    print(json.dumps(stats, default=float))


if __name__ == "__main__":
    main()
