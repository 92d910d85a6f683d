"""Passes that bring a float model into the form the planner expects.

Each pass edits qnnlib's private copy of the model in place and returns notes for the report.
They run in :func:`normalize` in this order:

1. ``weight_inputs_to_initializers``: graph inputs that carry an initializer (UltraFace) are weights.
2. ``upgrade_opset``: opsets below 13 are converted, since per-channel DequantizeLinear needs 13.
3. ``constants_to_initializers``: Constant nodes (Paddle exports, and those the converter adds)
   become initializers.
4. ``name_nodes``: every node gets a unique, deterministic name.
5. ``eliminate_identities``: Identity and inference-mode Dropout nodes are bypassed.
6. ``float16_to_float32``: float16 weights and tensors become float32 inside, with Casts at the
   model's inputs and outputs so that its interface stays float16.
   (shape inference runs here, so that the next pass knows static shapes)
6b. ``fold_constants``: nodes whose inputs are all constants, and Shape of statically shaped
   tensors, become initializers (evaluated with onnx's reference evaluator).
7. ``fold_batchnorm``: (after reading every BatchNormalization's statistics for generated data)
   BatchNormalization after a Conv is folded into the Conv's weight and bias.
8. ``fold_conv_add``: a constant per-channel Add after a Conv (CNTK's bias) joins the Conv's bias.
8b. ``constant_softmax``: a Softmax over an axis of size 1 (always 1) becomes ``x * 0 + 1``, since
   onnxruntime's QLinearSoftmax returns 0 there.
9. ``matmul_add_to_gemm``: a 2-D MatMul with constant weights followed by a constant bias Add
   becomes a Gemm, whose bias is quantised to int32 (onnxruntime would otherwise fuse the pair
   into a float Gemm before its QDQ fusions).
10. ``infer_types``: shape inference, with onnxruntime filling element types that it misses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx.defs import onnx_opset_version

from qnnlib.errors import UnsupportedModelError
from qnnlib.graph.passes.batchnorm import ChannelStatistics, batchnorm_statistics, fold_batchnorm
from qnnlib.graph.passes.bias_fusion import fold_conv_add, matmul_add_to_gemm
from qnnlib.graph.passes.constants import constants_to_initializers, fold_constants
from qnnlib.graph.passes.float16 import float16_to_float32
from qnnlib.graph.passes.identities import eliminate_identities
from qnnlib.graph.passes.naming import name_nodes
from qnnlib.graph.passes.opset import PER_CHANNEL_OPSET, default_opset, upgrade_opset
from qnnlib.graph.passes.shapes import infer_types
from qnnlib.graph.passes.softmax import constant_softmax
from qnnlib.graph.passes.weight_inputs import weight_inputs_to_initializers

__all__ = ["PER_CHANNEL_OPSET", "NormalizedModel", "default_opset", "normalize"]


@dataclass
class NormalizedModel:
    """The normalised private copy of the model and what normalisation did to it."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    original_opset: int = 0
    per_channel_ok: bool = True
    float16_interface: bool = False
    #: What BatchNormalization outputs should look like on training data (read before folding).
    batchnorm: tuple[ChannelStatistics, ...] = ()


def normalize(model: onnx.ModelProto, *, fold_batchnorm_nodes: bool = True) -> NormalizedModel:
    """Run every normalisation pass on ``model`` (qnnlib's own copy) and collect notes."""
    result = NormalizedModel(model=model, original_opset=default_opset(model))
    opset = result.original_opset
    newest = onnx_opset_version()
    if opset > newest:
        raise UnsupportedModelError(
            f"the model uses opset {opset}, newer than the {newest} that the installed onnx "
            f"{onnx.__version__} knows; upgrade onnx and onnxruntime, or export at opset <= {newest}"
        )
    notes = result.notes
    notes += weight_inputs_to_initializers(model)
    upgrade_notes, result.per_channel_ok = upgrade_opset(model, PER_CHANNEL_OPSET)
    notes += upgrade_notes
    notes += constants_to_initializers(model)
    notes += name_nodes(model)
    notes += eliminate_identities(model)
    fp16_notes = float16_to_float32(model)
    result.float16_interface = bool(fp16_notes)
    notes += fp16_notes
    notes += infer_types(model)
    if fold_constants(model):
        notes.append("folded constant subgraphs into initializers")
        notes += infer_types(model)
    result.batchnorm = batchnorm_statistics(model)
    if fold_batchnorm_nodes:
        notes += fold_batchnorm(model)
        notes += infer_types(model)
    fused = fold_conv_add(model) + constant_softmax(model) + matmul_add_to_gemm(model)
    if fused:
        notes += fused
        notes += infer_types(model)
    return result
