"""The one error hierarchy of qnnlib.

Every error a user can meet derives from :class:`QnnlibError`; each message names the node or
tensor at fault and says how to fix it.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for quoting in ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class QnnlibError(Exception):
    """Base class of every error qnnlib raises on purpose."""


class ConfigError(QnnlibError, ValueError):
    """A QuantConfig value, or a name in it, is invalid."""


class ModelError(QnnlibError):
    """The model cannot be read, is not valid ONNX, or uses something qnnlib cannot handle."""


class ModelLoadError(ModelError):
    """The model file or bytes cannot be read or parsed."""


class InvalidModelError(ModelError):
    """The model parses but is not a valid ONNX model."""


class UnsupportedModelError(ModelError):
    """The model is valid but uses an opset, type or construct that qnnlib does not support."""


class CalibrationError(QnnlibError):
    """Calibration data is missing, empty, or does not fit the model."""


class CalibrationDataError(CalibrationError, ValueError):
    """A calibration feed has a wrong name, shape or dtype, or holds NaN or inf."""


class EmptyCalibrationError(CalibrationError):
    """The calibration source yielded no sample."""


class ThresholdError(QnnlibError):
    """The accuracy threshold could not be met and ``Threshold(strict=True)`` asked for an error."""


class SessionError(QnnlibError):
    """onnxruntime could not load or run a model qnnlib built or was given; the message carries its words."""


class InternalError(QnnlibError):
    """qnnlib built something wrong (a model that fails onnx.checker): a bug in qnnlib, to be reported."""


class InputError(QnnlibError, ValueError):
    """Feeds or output names given to a session do not match the model's inputs and outputs."""
