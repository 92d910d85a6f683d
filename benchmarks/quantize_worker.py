"""Quantise one model with one tool in a fresh process; print time and peak memory as JSON.

    python -m benchmarks.quantize_worker qnnlib|ort MODEL CALIB_DIR OUT [--method M] [--samples N]

``--large``: the model has external data and is over 2 GB: onnxruntime skips the opset upgrade and
``quant_pre_process`` (both serialise the model into one protobuf) and writes external data
(``use_external_data_format=True``); qnnlib saves with external data as it does for large models.

``--method optimized`` (qnnlib only) runs qnnlib's default calibration followed by its layer-wise
range search and weight clipping search (``QuantConfig(optimize=True)``), without a threshold.
``--threshold-sqnr DB --validation DIR`` (qnnlib only) asks for an output SQNR of at least DB on the
samples in DIR (``Threshold(metric="sqnr", min=DB)``); the stats add whether it was met and the
compute layers left above int8.

CALIB_DIR holds one ``NNNNN.npy`` per sample; both tools read it lazily through a generator (qnnlib)
or a CalibrationDataReader (onnxruntime), so peak memory shows what each tool itself keeps.
The onnxruntime run happens in a private working directory, since its calibrator writes there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB.

    ``getrusage().ru_maxrss`` is not used: Linux carries it across exec, so a child started by a
    large parent reports the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_megabytes(path: Path) -> float:
    """The size of a saved model with its external data files, in MB."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / entry.value for tensor in model.graph.initializer
                      for entry in tensor.external_data if entry.key == "location"}
    return sum(f.stat().st_size for f in files) / 1e6


def _samples(calib_dir: Path, limit: int | None) -> list[Path]:
    files = sorted(calib_dir.glob("*.npy"))
    return files[:limit] if limit else files


def _feeds(files: list[Path], input_name: str) -> Iterator[dict[str, np.ndarray]]:
    for f in files:
        yield {input_name: np.load(f)}


def run_qnnlib(model: Path, files: list[Path], input_name: str, out: Path, method: str, *,
               large: bool = False, threshold_sqnr: float | None = None,
               validation_dir: Path | None = None) -> dict[str, float]:
    import qnnlib

    start = time.perf_counter()
    # the defaults a user gets, report and fusion check included
    threshold = None if threshold_sqnr is None else qnnlib.Threshold(metric="sqnr", min=threshold_sqnr)
    config = (qnnlib.QuantConfig(optimize=True, threshold=threshold) if method == "optimized"
              else qnnlib.QuantConfig(method=method, threshold=threshold))
    validation = list(_feeds(_samples(validation_dir, None), input_name)) if validation_dir else None
    result = qnnlib.quantize(str(model), _feeds(files, input_name), validation=validation, config=config)
    elapsed = time.perf_counter() - start
    result.save(out)
    stats = {"time": elapsed, "time_with_save": time.perf_counter() - start, "size_mb": saved_megabytes(out)}
    if threshold is not None:
        from benchmarks.bench_threshold import layers_above_int8

        stats |= {"met": bool(result.report.threshold_met), "above_int8": layers_above_int8(out)}
    return stats


def run_ort(model: Path, files: list[Path], input_name: str, out: Path, method: str, *,
            large: bool = False) -> dict[str, float]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = _feeds(files, input_name)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    work = Path(tempfile.mkdtemp(prefix="ort-bench-"))
    os.chdir(work)
    start = time.perf_counter()
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if large:
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], use_external_data_format=True)
        elapsed = time.perf_counter() - start
        return {"time": elapsed, "time_with_save": elapsed, "size_mb": saved_megabytes(out)}
    proto = onnx.load(str(model))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        proto = onnx.version_converter.convert_version(proto, 13)
    upgraded = work / "upgraded.onnx"
    onnx.save(proto, str(upgraded))
    prep_start = time.perf_counter()
    pre = work / "pre.onnx"
    try:
        quant_pre_process(str(upgraded), str(pre))
    except Exception as exc:
        print(f"quant_pre_process failed: {exc}", file=sys.stderr)
        pre = upgraded
    prep = time.perf_counter() - prep_start
    q_start = time.perf_counter()
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method])
    quant = time.perf_counter() - q_start
    return {"time": time.perf_counter() - start, "time_quantize_static": quant, "time_preprocess": prep,
            "size_mb": saved_megabytes(out)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=("qnnlib", "ort"))
    parser.add_argument("model", type=Path)
    parser.add_argument("calib_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--input", required=True)
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--threshold-sqnr", type=float, default=None)
    parser.add_argument("--validation", type=Path, default=None)
    args = parser.parse_args()
    files = _samples(args.calib_dir, args.samples)
    baseline = peak_rss_mb()
    if args.tool == "qnnlib":
        stats = run_qnnlib(args.model.resolve(), files, args.input, args.out.resolve(), args.method,
                           large=args.large, threshold_sqnr=args.threshold_sqnr, validation_dir=args.validation)
    else:
        stats = run_ort(args.model.resolve(), files, args.input, args.out.resolve(), args.method, large=args.large)
    stats["peak_rss_mb"] = peak_rss_mb()
    stats["start_rss_mb"] = baseline
    stats["samples"] = len(files)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
