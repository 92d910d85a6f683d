"""The model's default opset, and its upgrade to the one per-channel quantisation needs."""

from __future__ import annotations

import logging

import onnx

from qnnlib.errors import UnsupportedModelError, first_line

log = logging.getLogger(__name__)

#: Per-channel DequantizeLinear (the ``axis`` attribute) needs this opset.
PER_CHANNEL_OPSET = 13
#: QuantizeLinear and DequantizeLinear exist from this opset on.
MIN_QDQ_OPSET = 10


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise UnsupportedModelError(
        "the model imports no default ONNX domain opset; re-export it with an opset_import for ''"
    )


def upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[list[str], bool]:
    """Convert a model below ``target`` with onnx.version_converter.

    Returns the notes and whether per-channel quantisation is possible. A model that cannot be
    converted keeps its opset when that still has QuantizeLinear (>= 10; weights are then
    quantised per tensor), and is refused otherwise.
    """
    opset = default_opset(model)
    if opset >= target:
        return [], True
    try:
        converted = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError/... on failure
        if opset >= MIN_QDQ_OPSET:
            note = (f"opset {opset} could not be upgraded to {target} ({first_line(exc)}); weights are "
                    "quantised per tensor, which this opset allows")
            log.warning(note)
            return [note], False
        raise UnsupportedModelError(
            f"the model uses opset {opset}, which has no QuantizeLinear, and onnx.version_converter "
            f"could not upgrade it to {target}: {first_line(exc)}. Convert it yourself "
            f"(onnx.version_converter.convert_version(model, {target})) and fix what it reports"
        ) from exc
    converted.ir_version = max(converted.ir_version, model.ir_version, 7)
    model.CopyFrom(converted)
    return [f"upgraded opset {opset} to {target} so that per-channel DequantizeLinear is valid"], True
