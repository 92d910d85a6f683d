"""Graph inputs that carry an initializer (UltraFace) are weights."""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)


def weight_inputs_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Drop graph inputs that have an initializer of the same name: qnnlib treats them as weights.

    IR version 4 is the first where initializers need not be graph inputs, so older models move to it.
    """
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in init_names]
    dropped = len(graph.input) - len(real)
    if dropped:
        del graph.input[:]
        graph.input.extend(real)
        model.ir_version = max(model.ir_version, 4)
        return [f"treated {dropped} graph inputs that have initializers as constant weights"]
    return []
