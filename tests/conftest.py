"""Shared fixtures: where ../shared is, and helpers that look into onnxruntime."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SHARED = Path(os.environ.get("QNNLIB_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_model(name: str) -> Path:
    """Path of a model in ../shared/models; skips the test when ../shared is absent."""
    path = SHARED / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared is only beside the repository in development and CI)")
    return path


def session(model: onnx.ModelProto, **kwargs: object) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in kwargs.items():
        setattr(options, key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def optimized_op_types(model: onnx.ModelProto) -> collections.Counter[str]:
    """Op counts of onnxruntime's optimised graph (extended level: the QDQ fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, optimized_model_filepath=path,
                graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feed)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = np.sum((ref - test.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(ref**2) / noise)


def output_errors(model: onnx.ModelProto, quantized: ort.InferenceSession,
                  feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output: ``max |y_q - y| / (max(y, 0) - min(y, 0))``, the error as a share of the float range with zero."""
    names = [o.name for o in model.graph.output]
    try:  # optimised as the quantised model is: onnxruntime 1.31 fuses a zero Pad into a MaxPool in both
        reference = session(model)
    except Exception:  # its optimiser rejects some valid graphs (Mul -> Identity output + Pad): run it as written
        reference = session(model, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    want = reference.run(names, feeds)
    got = quantized.run(names, feeds)
    errors = {}
    for name, w, g in zip(names, want, got, strict=True):
        assert w.shape == g.shape, name
        span = max(float(w.max(initial=0.0)), 0.0) - min(float(w.min(initial=0.0)), 0.0)
        errors[name] = float(np.abs(w - g).max(initial=0.0)) / max(span, 1e-12)
    return errors
