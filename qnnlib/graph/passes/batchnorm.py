"""Fold BatchNormalization into the preceding Conv."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qnnlib.graph.edit import drop_unused_initializers, replace_nodes
from qnnlib.graph.index import GraphIndex, attribute
from qnnlib.graph.names import NameAllocator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel mean and standard deviation that a tensor should have on the data a model was trained on.

    Read from a BatchNormalization node ``node``: its output ``tensor`` on its training data has mean
    ``beta`` and standard deviation ``|gamma| * sqrt(var / (var + eps))`` in every channel (axis 1).
    """

    tensor: str
    node: str
    mean: np.ndarray
    std: np.ndarray


def batchnorm_statistics(model: onnx.ModelProto) -> tuple[ChannelStatistics, ...]:
    """The expected output statistics of every inference-mode BatchNormalization with constant parameters.

    Read before :func:`fold_batchnorm` removes the nodes (the folded Conv writes the same tensor), so
    that generated calibration data can be shaped to match them (ZeroQ's idea).
    """
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if attribute(node, "training_mode", 0) or not all(n in inits for n in node.input[1:5]):
            continue
        gamma, beta, _, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[1:5])
        eps = float(attribute(node, "epsilon", 1e-5))
        std = np.abs(gamma) * np.sqrt(np.maximum(var, 0.0) / (np.maximum(var, 0.0) + eps))
        found.append(ChannelStatistics(node.output[0], node.name, beta, std))
    return tuple(found)


def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold ``Conv -> BatchNormalization`` into the Conv.

    With ``f = gamma / sqrt(var + eps)``: ``W'[c] = W[c] * f[c]`` and
    ``b'[c] = (b[c] - mean[c]) * f[c] + beta[c]``. Only when the Conv output feeds the
    BatchNormalization alone and every parameter is a constant.
    """
    graph = model.graph
    index = GraphIndex(model)
    names = NameAllocator(model)
    inits = {t.name: t for t in graph.initializer}
    removed: set[int] = set()
    folded = 0
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        if attribute(bn, "training_mode", 0) or any(o and index.uses(o) for o in bn.output[1:]):
            continue
        if not all(name in inits for name in bn.input[1:5]):
            continue
        conv = index.producer(bn.input[0])
        if conv is None or conv.op_type != "Conv" or id(conv) in removed:
            continue
        if len(index.uses(bn.input[0])) != 1 or index.is_graph_output(bn.input[0]):
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = float(attribute(bn, "epsilon", 1e-5))
        factor = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        new_w = (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        w_name = names.fresh(f"{conv.input[1]}_bnfolded")
        b_name = names.fresh(f"{conv.name}_bias_bnfolded")
        graph.initializer.append(numpy_helper.from_array(new_w, w_name))
        graph.initializer.append(numpy_helper.from_array(new_b, b_name))
        inits[w_name] = graph.initializer[-2]
        inits[b_name] = graph.initializer[-1]
        conv.input[1] = w_name
        if has_bias:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    if not folded:
        return []
    keep = [n for n in graph.node if id(n) not in removed]
    replace_nodes(model, keep)
    drop_unused_initializers(model)
    return [f"folded {folded} BatchNormalization nodes into their Conv"]
