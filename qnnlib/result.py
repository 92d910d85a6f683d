"""The value :func:`qnnlib.quantize` returns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from qnnlib.emit.integer import IntegerModel, to_integer
from qnnlib.graph.model_io import make_session, save_model
from qnnlib.plan import QuantPlan
from qnnlib.report import Report

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class QuantResult:
    """The quantised QDQ model, the plan that produced it and the report of what was done."""

    model: onnx.ModelProto
    report: Report
    plan: QuantPlan

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
        """Write the model to ``path``; weights go to ``<name>.data`` beside it when over ~1.8 GB or asked."""
        save_model(self.model, path, external_data=external_data)

    def session(self, **session_kwargs: Any) -> ort.InferenceSession:
        """An onnxruntime CPU InferenceSession on the quantised model.

        ``threads=`` and ``optimization=`` ("disable", "basic", "extended", "all") are accepted.
        """
        return make_session(self.model, log_errors_as="quantised model", **session_kwargs)

    def integer_model(self) -> onnx.ModelProto:
        """The model with its 8-bit layers as integer operators (QLinearConv, QLinearMatMul, ...).

        Each operator's requantisation as an int32 multiplier and shift is in the model's metadata
        (see :mod:`qnnlib.emit.integer`); :meth:`integer_details` also names the nodes left as they were.
        """
        return self.integer_details().model

    def integer_details(self) -> IntegerModel:
        """The integer-operator model, each operator's requantisation and the compute nodes left as they were."""
        return to_integer(self.model)

    def _repr_html_(self) -> str:
        return self.report._repr_html_()
