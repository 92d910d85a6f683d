"""Shape and element-type inference."""

from __future__ import annotations

import logging

import onnx
from onnx import TensorProto, helper

from qnnlib.errors import first_line
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import skeleton

log = logging.getLogger(__name__)


def infer_types(model: onnx.ModelProto) -> list[str]:
    """Infer shapes and types (on the :func:`skeleton`); ask onnxruntime for element types still unknown.

    What inference adds is copied back: the graph's value_info, its outputs' shapes, and the nodes
    (whose subgraphs get annotated).
    """
    notes: list[str] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False,
                                                     data_prop=True).graph
        for name in ("value_info", "output", "node"):
            model.graph.ClearField(name)
            getattr(model.graph, name).extend(getattr(inferred, name))
    except Exception as exc:  # inference raises InferenceError or RuntimeError with custom ops
        notes.append(f"shape inference failed ({first_line(exc)}); element types come from onnxruntime")
    index = GraphIndex(model)
    unknown = [o for n in index.nodes for o in n.output if o and index.elem_type(o) is None]
    if unknown:
        notes += _types_from_onnxruntime(model, unknown)
    return notes


def _types_from_onnxruntime(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    from qnnlib.errors import SessionError
    from qnnlib.graph.model_io import make_session

    try:
        session = make_session(model, outputs=tensors, optimization="disable")
    except SessionError as exc:
        return [f"element types of {len(tensors)} tensors are unknown ({exc}); they are not quantised"]
    types = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
             "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32,
             "tensor(bool)": TensorProto.BOOL, "tensor(uint8)": TensorProto.UINT8,
             "tensor(int8)": TensorProto.INT8, "tensor(double)": TensorProto.DOUBLE}
    wanted = set(tensors)
    added = 0
    for out in session.get_outputs():
        if out.name in wanted and out.type in types:
            model.graph.value_info.append(helper.make_tensor_value_info(out.name, types[out.type], None))
            added += 1
    return [f"onnxruntime supplied the element types of {added} tensors"] if added else []
