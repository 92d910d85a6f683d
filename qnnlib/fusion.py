"""Which integer kernels onnxruntime made of a QDQ model, and which compute ops stayed float.

onnxruntime's optimised graph (``SessionOptions.optimized_model_filepath``, written to a private
temp directory) is the ground truth: a Conv, MatMul or Gemm that qnnlib quantised must appear
there as QLinearConv, QLinearMatMul, QGemm or MatMulInteger(ToFloat), not as a float op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from qnnlib.graph.model_io import make_session, temporary_directory

if TYPE_CHECKING:
    import onnxruntime as ort

#: Float ops that do the heavy arithmetic; left in float they cost what quantisation should save.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose")
INTEGER_OPS = ("QGemm", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class FusionSummary:
    """Op counts of onnxruntime's optimised graph: integer kernels and the float compute ops left."""

    integer_kernels: dict[str, int]
    float_compute: dict[str, int]


def summarize(optimized: onnx.ModelProto) -> FusionSummary:
    """Count integer kernels and float compute ops in an optimised graph."""
    counts = Counter(n.op_type for n in optimized.graph.node)
    integer = {op: n for op, n in sorted(counts.items()) if op.startswith("QLinear") or op in INTEGER_OPS}
    compute = {op: counts[op] for op in COMPUTE_OPS if counts.get(op)}
    return FusionSummary(integer, compute)


def checked_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), *,
                    verify: bool = True) -> tuple[ort.InferenceSession, FusionSummary | None]:
    """A session on ``model`` (plus ``extra_outputs``) and, when ``verify``, what onnxruntime fused in it."""
    if not verify:
        return make_session(model, outputs=extra_outputs, log_errors_as="quantised model"), None
    with temporary_directory() as tmp:
        path = tmp / "optimized.onnx"
        session = make_session(model, outputs=extra_outputs, optimized_model_path=str(path),
                               log_errors_as="quantised model")
        # only op types are counted; a large model's weights stay where onnxruntime left them, which may
        # be the external-data file of a temp directory make_session has already removed
        optimized = onnx.load(str(path), load_external_data=False)
    return session, summarize(optimized)
