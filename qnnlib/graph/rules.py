"""How each op type is quantised: one table, read by the selection and the tied-group builder.

Kinds:

* ``WEIGHTED``: Conv, MatMul, Gemm. Activation inputs and outputs are quantised, a constant
  weight per output channel, a constant bias to int32 (onnxruntime: QLinearConv,
  QLinearMatMul, QGemm).
* ``QUANTIZED_IO``: ops with an integer kernel of their own (QLinearAdd, QLinearMul,
  QLinearAveragePool, QLinearGlobalAveragePool, QLinearSoftmax, QLinearSigmoid,
  QLinearLeakyRelu): every float input and output is quantised, each with its own parameters.
* ``TIE_ALL``: Concat. All inputs and the output share one set of parameters, so no input is
  requantised (QLinearConcat copies bytes).
* ``PASS_THROUGH``: ops that only move or select values (MaxPool, Reshape, Transpose, ...). In the
  quantised region their data input and outputs share parameters; onnxruntime then runs them on
  uint8 and drops their Q/DQ pair.
* ``FOLDABLE_ACTIVATION``: Relu, Clip. Tied to their producer's output when they are its only
  reader; the emitter drops the node where clipping at the quantisation range is the same
  function (zero point at qmin for Relu; range inside the Clip bounds for Clip).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx

from qnnlib.graph.index import GraphIndex, attribute


class Kind(enum.Enum):
    """How an op type takes part in quantisation."""

    WEIGHTED = "weighted"
    QUANTIZED_IO = "quantized_io"
    TIE_ALL = "tie_all"
    PASS_THROUGH = "pass_through"
    FOLDABLE_ACTIVATION = "foldable_activation"


@dataclass(frozen=True)
class OpRule:
    """The quantisation rule of one op type.

    ``data_inputs``: indices of inputs that carry activations (None: every input).
    ``data_outputs``: indices of outputs that carry activations (None: every output).
    ``weight_input`` / ``bias_input``: for WEIGHTED ops, the constant weight and bias slots.
    """

    kind: Kind
    data_inputs: tuple[int, ...] | None = None
    data_outputs: tuple[int, ...] | None = (0,)
    weight_input: int | None = None
    bias_input: int | None = None


_IO = OpRule(Kind.QUANTIZED_IO)
_IO0 = OpRule(Kind.QUANTIZED_IO, data_inputs=(0,))
_PASS = OpRule(Kind.PASS_THROUGH, data_inputs=(0,))

RULES: dict[str, OpRule] = {
    "Conv": OpRule(Kind.WEIGHTED, data_inputs=(0,), weight_input=1, bias_input=2),
    "MatMul": OpRule(Kind.WEIGHTED, data_inputs=(0, 1), weight_input=1),
    "Gemm": OpRule(Kind.WEIGHTED, data_inputs=(0, 1), weight_input=1, bias_input=2),
    "Add": _IO,
    "Mul": _IO,
    "AveragePool": _IO0,
    "GlobalAveragePool": _IO0,
    "Softmax": _IO0,
    "Sigmoid": _IO0,
    "LeakyRelu": _IO0,
    "Concat": OpRule(Kind.TIE_ALL),
    "MaxPool": _PASS,
    "GlobalMaxPool": _PASS,
    "Reshape": _PASS,
    "Flatten": _PASS,
    "Transpose": _PASS,
    "Squeeze": _PASS,
    "Unsqueeze": _PASS,
    "Slice": _PASS,
    "Split": OpRule(Kind.PASS_THROUGH, data_inputs=(0,), data_outputs=None),
    "Gather": _PASS,
    "Resize": _PASS,
    "Pad": _PASS,
    "DepthToSpace": _PASS,
    "SpaceToDepth": _PASS,
    "Identity": _PASS,
    "Relu": OpRule(Kind.FOLDABLE_ACTIVATION, data_inputs=(0,)),
    "Clip": OpRule(Kind.FOLDABLE_ACTIVATION, data_inputs=(0,)),
}


#: The reason given to every node of a model's own quantisation and to the nodes it wraps.
ALREADY_QUANTISED = "already quantised"
#: What the warning and the report note on an already quantised model advise.
ALREADY_QUANTISED_ADVICE = "pass the float model for qnnlib to choose every parameter"
#: Standard ops that quantise, dequantise or compute on integers.
_QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                               "QLinearMatMul", "ConvInteger", "MatMulInteger"})
#: onnxruntime's contrib ops of that kind that the name patterns below miss.
_CONTRIB_QUANTIZATION_OPS = frozenset({"QGemm", "QAttention", "QEmbedLayerNormalization", "MatMulNBits",
                                       "MatMulBnb4", "GatherBlockQuantized"})


def is_quantization_op(node: onnx.NodeProto) -> bool:
    """Whether ``node`` belongs to an already quantised model (Q/DQ, an integer kernel, a dynamic quantiser)."""
    op = node.op_type
    if node.domain in ("", "ai.onnx"):
        return op in _QUANTIZATION_OPS
    return node.domain == "com.microsoft" and (
        op in _CONTRIB_QUANTIZATION_OPS or op.startswith(("QLinear", "QOrdered")) or "Quantize" in op
        or "Integer" in op)


def _already_quantised(node: onnx.NodeProto, index: GraphIndex) -> str:
    """Why ``node`` is part of the model's own quantisation, or ``""``: a quantisation op, or it reads a DQ."""
    if is_quantization_op(node):
        return f"{ALREADY_QUANTISED}: {node.op_type} is part of the model's own quantisation"
    for tensor in node.input:
        producer = index.producer(tensor) if tensor else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            return f"{ALREADY_QUANTISED}: reads {tensor!r} from DequantizeLinear {producer.name!r}"
    return ""


def rule_for(node: onnx.NodeProto, index: GraphIndex) -> tuple[OpRule | None, str]:
    """The rule that applies to ``node``, or None with the reason it stays float."""
    quantised = _already_quantised(node, index)
    if quantised:
        return None, quantised
    if node.domain not in ("", "ai.onnx"):
        return None, f"op of domain {node.domain!r} has no integer kernel"
    rule = RULES.get(node.op_type)
    if rule is None:
        return None, f"{node.op_type} has no integer kernel in onnxruntime"
    check = _CHECKS.get(node.op_type)
    reason = check(node, index) if check is not None else ""
    if reason:
        return None, reason
    return _VARIANTS.get(node.op_type, lambda n, i, r: r)(node, index, rule), ""


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _check_conv(node: onnx.NodeProto, index: GraphIndex) -> str:
    if not index.is_constant(_input(node, 1)):
        return "Conv weight is not a constant"
    bias = _input(node, 2)
    return "Conv bias is not a constant" if bias and not index.is_constant(bias) else ""


def _check_gemm(node: onnx.NodeProto, index: GraphIndex) -> str:
    bias = _input(node, 2)
    if not bias:
        return ""
    shape = index.shape(bias) or ()
    vector = len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
    return "" if index.is_constant(bias) and vector else "Gemm bias C is not a constant vector of N values"


def _check_resize(node: onnx.NodeProto, index: GraphIndex) -> str:
    mode = attribute(node, "mode", b"nearest")
    return "" if mode in (b"nearest", b"linear", "nearest", "linear") else "cubic Resize can overshoot its input range"


def _check_pad(node: onnx.NodeProto, index: GraphIndex) -> str:
    return "" if _pad_with_zero(node, index) else "Pad with a non-zero or non-constant value"


def _check_maxpool(node: onnx.NodeProto, index: GraphIndex) -> str:
    with_indices = len(node.output) > 1 and bool(node.output[1])
    return "MaxPool with an Indices output" if with_indices else ""


def _check_clip(node: onnx.NodeProto, index: GraphIndex) -> str:
    constant = all(index.is_constant(n) for n in node.input[1:] if n)
    return "" if constant else "Clip bounds are not constants"


def _activation_weights(node: onnx.NodeProto, index: GraphIndex, rule: OpRule) -> OpRule:
    """MatMul or Gemm whose B is not a constant 2-D weight: both operands are activations."""
    weight = _input(node, 1)
    if index.is_constant(weight) and len(index.shape(weight) or ()) >= 2:
        return rule
    return OpRule(Kind.WEIGHTED, data_inputs=(0, 1), bias_input=rule.bias_input)


#: Per-op conditions under which the table's rule applies ("" when it does, else why not).
_CHECKS = {"Conv": _check_conv, "Gemm": _check_gemm, "Resize": _check_resize, "Pad": _check_pad,
           "MaxPool": _check_maxpool, "Clip": _check_clip}
#: Per-op adjustments of the table's rule to the node at hand.
_VARIANTS = {"MatMul": _activation_weights, "Gemm": _activation_weights}


def data_inputs(node: onnx.NodeProto, rule: OpRule) -> list[tuple[int, str]]:
    """The (index, tensor) pairs of the inputs that carry activations under ``rule``."""
    picks = range(len(node.input)) if rule.data_inputs is None else rule.data_inputs
    return [(i, node.input[i]) for i in picks if i < len(node.input) and node.input[i]]


def data_outputs(node: onnx.NodeProto, rule: OpRule) -> list[str]:
    """The outputs that carry activations under ``rule``."""
    picks = range(len(node.output)) if rule.data_outputs is None else rule.data_outputs
    return [node.output[i] for i in picks if i < len(node.output) and node.output[i]]


def weight_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The output-channel axis of a weight: Conv 0; MatMul last; Gemm 0 if transB else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return weight_rank - 1


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float]:
    """The (min, max) of a Clip node, from attributes (opset < 11) or constant inputs."""
    lo, hi = float("-inf"), float("inf")
    if attribute(node, "min") is not None:
        lo = float(attribute(node, "min"))
    if attribute(node, "max") is not None:
        hi = float(attribute(node, "max"))
    if len(node.input) > 1 and node.input[1]:
        lo = float(index.constant(node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        hi = float(index.constant(node.input[2]))
    return lo, hi


def _pad_with_zero(node: onnx.NodeProto, index: GraphIndex) -> bool:
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        return False
    if attribute(node, "value") not in (None, 0.0):
        return False
    if len(node.input) > 2 and node.input[2]:
        return index.is_constant(node.input[2]) and float(index.constant(node.input[2]).reshape(-1)[0]) == 0.0
    return True
