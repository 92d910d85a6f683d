"""The built-in example: quantise a real MNIST CNN with its own calibration digits.

The model is CNTK's MNIST classifier from Microsoft's Windows-Machine-Learning samples (MIT
licence, ``LICENSE.mnist-cntk``); the 200 digits were rendered by ``tools/make_demo_digits.py``.
The first 100 calibrate, the other 100 are held out to compare float and int8 accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qnnlib.api import quantize
from qnnlib.config import QuantConfig
from qnnlib.result import QuantResult

log = logging.getLogger(__name__)

INPUT = "Input3"


def model_path() -> Path:
    """Path of the demo model inside the installed package."""
    return Path(str(resources.files("qnnlib.demo") / "mnist-cntk.onnx"))


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 N x 1 x 28 x 28 in 0..255, labels)."""
    with resources.as_file(resources.files("qnnlib.demo") / "digits.npz") as path, np.load(path) as data:
        return data["images"].astype(np.float32)[:, None], data["labels"].astype(np.int64)


@dataclass(frozen=True)
class DemoResult:
    """The quantisation result and the held-out accuracies of the float and int8 models."""

    result: QuantResult
    float_accuracy: float
    int8_accuracy: float
    agreement: float

    def summary(self) -> str:
        """The report followed by the held-out comparison."""
        return (f"{self.result.report.to_text(max_layers=None)}\n\n"
                f"held-out digits: float accuracy {self.float_accuracy:.3f}, int8 accuracy "
                f"{self.int8_accuracy:.3f}, int8 agrees with float on {self.agreement:.3f}")


def run(config: QuantConfig | None = None) -> DemoResult:
    """Quantise the demo model on 100 digits; measure float and int8 accuracy on the other 100."""
    from qnnlib.graph.model_io import make_session

    images, labels = digits()
    calib = [{INPUT: x[None]} for x in images[:100]]
    result = quantize(model_path(), calib, config=config)
    float_session = make_session(result_float_model(), log_errors_as="demo model")
    int8_session = result.session()
    held, truth = images[100:], labels[100:]
    float_pred = np.array([np.argmax(float_session.run(None, {INPUT: x[None]})[0]) for x in held])
    int8_pred = np.array([np.argmax(int8_session.run(None, {INPUT: x[None]})[0]) for x in held])
    return DemoResult(result, float((float_pred == truth).mean()), float((int8_pred == truth).mean()),
                      float((float_pred == int8_pred).mean()))


def result_float_model():  # type: ignore[no-untyped-def]
    """The float demo model as an onnx.ModelProto."""
    import onnx

    return onnx.load(str(model_path()))
