"""A model over 2 GB with external data: peak memory and time of qnnlib and onnxruntime's quantizer.

    python -m benchmarks.bench_large [--gb 2.2] [--dim 4096] [--json PATH] [--workdir DIR]

The model is a stack of ``dim x dim`` MatMul + bias + Relu layers on a ``[1, 16, dim]`` input,
enough layers to pass ``--gb`` of float32 weights, saved with its weights in one external-data file
(protobuf cannot hold 2 GB in one message). Each tool quantises it in a fresh process
(:mod:`benchmarks.quantize_worker`, ``--large``) from 8 calibration samples and saves the result
with external data; the worker reports its peak resident memory (VmHWM). A third process loads
both quantised models in onnxruntime and compares them with float on one sample.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.bench_quantize import run_worker

SEQ = 16
SAMPLES = 8


def build(path: Path, gb: float, dim: int, seed: int = 0) -> int:
    """Write the layer stack to ``path`` with external data; returns its number of layers."""
    layers = math.ceil(gb * 1e9 / (dim * dim * 4))
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((dim, dim), dtype=np.float32) * np.float32(dim ** -0.5 * 1.4))
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.05, dim).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"MatMul{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"Add{i}"),
                  helper.make_node("Relu", [f"add{i}"], [f"y{i}"], name=f"Relu{i}")]
        x = f"y{i}"
        del w
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, SEQ, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return layers


def files_size(path: Path) -> int:
    """Bytes of a model file and the external-data files beside it that start with its name."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))




_CHECK = """
import json, sys
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
def run(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
want = run(sys.argv[2])
span = float(want.max()) - min(float(want.min()), 0.0)
print(json.dumps({p: float(np.abs(run(p) - want).max() / span) for p in sys.argv[3:]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temp directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=args.workdir) as tmp:
        work = Path(tmp)
        model = work / "large.onnx"
        layers = build(model, args.gb, args.dim)
        calib = work / "calib"
        calib.mkdir()
        rng = np.random.default_rng(1)
        for i in range(SAMPLES):
            np.save(calib / f"{i:05d}.npy", rng.standard_normal((1, SEQ, args.dim)).astype(np.float32))
        size = files_size(model)
        print(f"model: {layers} MatMul layers of {args.dim}x{args.dim}, {size / 1e9:.2f} GB with external data",
              flush=True)
        row: dict[str, Any] = {"gb": size / 1e9, "layers": layers, "dim": args.dim}
        outputs = {}
        for tool in ("qnnlib", "ort"):
            out = work / f"{tool}.onnx"
            stats = row[tool] = run_worker(tool, model, "x", calib, out, method="minmax", large=True)
            if "error" in stats:
                print(f"  {tool:7s} failed: {stats['error']}", flush=True)
                continue
            stats["output_bytes"] = files_size(out)
            outputs[tool] = str(out)
            print(f"  {tool:7s} peak {stats['peak_rss_mb'] / 1024:.2f} GB = {stats['peak_rss_mb'] * 2**20 / size:.2f}x "
                  f"the model; {stats['time']:.1f} s; output {stats['output_bytes'] / 1e9:.2f} GB", flush=True)
        if outputs:
            check = subprocess.run([sys.executable, "-c", _CHECK, str(calib / "00000.npy"), str(model),
                                    *outputs.values()], capture_output=True, text=True, check=True)
            errors = json.loads(check.stdout)
            for tool, path in outputs.items():
                row[tool]["max_error_of_range"] = errors[path]
                print(f"  {tool:7s} loads in onnxruntime; max error {errors[path]:.4f} of the float output's range")
        if "peak_rss_mb" in row.get("qnnlib", {}) and "peak_rss_mb" in row.get("ort", {}):
            ratio = row["qnnlib"]["peak_rss_mb"] / row["ort"]["peak_rss_mb"]
            print(f"  qnnlib peak / onnxruntime peak = {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
