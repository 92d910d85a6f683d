"""qnnlib: post-training quantisation of ONNX models for onnxruntime.

result = qnnlib.quantize("model.onnx", calib)
result.save("model.int8.onnx")
print(result.report)
"""

from qnnlib.api import quantize
from qnnlib.calibration.methods import MSE, Entropy, MinMax, Percentile
from qnnlib.config import QuantConfig, TensorOverride
from qnnlib.errors import (
    CalibrationDataError,
    CalibrationError,
    ConfigError,
    EmptyCalibrationError,
    InternalError,
    InvalidModelError,
    ModelError,
    ModelLoadError,
    QnnlibError,
    SessionError,
    ThresholdError,
    UnsupportedModelError,
)
from qnnlib.plan import QuantPlan
from qnnlib.report import Report
from qnnlib.result import QuantResult
from qnnlib.sensitivity import SensitivityReport, analyze_sensitivity
from qnnlib.threshold import Threshold
from qnnlib.version import __version__

__all__ = [
    "MSE",
    "CalibrationDataError",
    "CalibrationError",
    "ConfigError",
    "EmptyCalibrationError",
    "Entropy",
    "InternalError",
    "InvalidModelError",
    "MinMax",
    "ModelError",
    "ModelLoadError",
    "Percentile",
    "QnnlibError",
    "QuantConfig",
    "QuantPlan",
    "QuantResult",
    "Report",
    "SensitivityReport",
    "SessionError",
    "TensorOverride",
    "Threshold",
    "ThresholdError",
    "UnsupportedModelError",
    "__version__",
    "analyze_sensitivity",
    "quantize",
]
