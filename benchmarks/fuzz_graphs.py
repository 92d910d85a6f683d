"""A long fuzzing run: random valid graphs (tests/fuzz.py) quantised and checked against float.

    python -m benchmarks.fuzz_graphs [--count 3000] [--seed 0] [--json out.json] [--save-failures DIR]

Each drawn model is quantised with the default config on 8 calibration samples (batch 1) and checked
as tests/test_fuzz.py does: the user's model is unchanged, the result passes onnx.checker and runs
in onnxruntime at batch 8, and at every output the largest error is within ``BOUND`` of the float
range, or the excess is the 8-bit grid's limit ("grid limit": onnxruntime's integer kernels add
nothing to the model's float-Q/DQ error and onnxruntime's own quantiser does as badly; see
tests/test_fuzz.py). Printed: graphs drawn, how many passed, typed qnnlib errors by type, other exceptions
(bugs), bound violations, grid limits, quantiles of the worst relative error per graph, the ops
drawn, and the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hypothesis import HealthCheck, given, seed, settings

import qnnlib
from tests import fuzz
from tests.test_fuzz import BOUND, beyond_the_grid, relative_errors


def run(count: int, rng_seed: int, save: Path | None) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    worst: list[float] = []
    failures: list[dict[str, Any]] = []

    def record(kind: str, case: fuzz.FuzzCase, detail: str) -> None:
        outcomes[kind] += 1
        failures.append({"kind": kind, "ops": list(case.ops), "detail": detail})
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            onnx.save(case.model, str(save / f"{kind.replace(' ', '_')}-{len(failures)}.onnx"))

    @seed(rng_seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz.graphs())
    def check(case: fuzz.FuzzCase) -> None:
        ops.update(case.ops)
        before = case.model.SerializeToString()
        try:
            result = qnnlib.quantize(case.model, case.feeds(8, batch=1, seed=1))
        except qnnlib.QnnlibError as exc:
            record(f"typed {type(exc).__name__}", case, str(exc)[:500])
            return
        except Exception:  # any other exception is what this run looks for
            record("untyped exception", case, traceback.format_exc()[-1500:])
            return
        if case.model.SerializeToString() != before:
            record("model modified", case, "")
        try:
            onnx.checker.check_model(result.model)
            errors = relative_errors(case, result)
        except Exception:  # a result onnx or onnxruntime rejects
            record("invalid result", case, traceback.format_exc()[-1500:])
            return
        value = max(errors.values(), default=0.0)
        worst.append(value)
        if value <= BOUND:
            outcomes["passed"] += 1
            return
        try:
            failing = beyond_the_grid(case, result, errors)
        except Exception:  # onnxruntime's quantiser failing on the graph: no peer to compare with
            failing = {"?": (value, float("nan"), float("nan"))}
        name = max(errors, key=errors.__getitem__)
        if failing:
            record("over bound", case, f"{name}: {value:.3f}; (qnnlib, float Q/DQ, onnxruntime) {failing}")
        else:  # the 8-bit grid's limit, not a fault (beyond_the_grid)
            record("grid limit", case, f"{name}: {value:.3f}")

    start = time.perf_counter()
    check()
    quantiles = dict(zip(("median", "p90", "p99", "max"),
                         (float(v) for v in np.quantile(worst, [0.5, 0.9, 0.99, 1.0])), strict=True)) if worst else {}
    return {"graphs": sum(outcomes.values()), "outcomes": dict(outcomes), "bound": BOUND,
            "worst_relative_error": quantiles, "ops": dict(ops.most_common()), "seconds": time.perf_counter() - start,
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save-failures", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    row = run(args.count, args.seed, args.save_failures)
    print(f"qnnlib {qnnlib.__version__}: {row['graphs']} graphs in {row['seconds']:.0f} s; outcomes {row['outcomes']}")
    print("worst relative error per graph (bound " + f"{row['bound']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in row["worst_relative_error"].items()))
    print("ops drawn: " + ", ".join(f"{k} {v}" for k, v in row["ops"].items()))
    for failure in row["failures"][:10]:
        print(f"  {failure['kind']}: {failure['ops']}: {failure['detail'][:300]}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
