"""Where and how the output error of a quantised configuration is measured.

The error is taken where the quantised region hands its values over: at each graph output that is
quantised, and otherwise at the quantised tensors a float tail (a classifier's Softmax, a detector's
box decoding) reads. A Softmax turns a small change of two nearly tied logits into a large change
of probabilities, so the error of its output ranks quantisation points by noise; the logits it
reads rank them by what they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from qnnlib.graph.index import GraphIndex
from qnnlib.plan import QuantPlan


def output_error(reference: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]]) -> float:
    """``E = sum over outputs o of |y_o - r_o|^2 / |r_o|^2``, each sum taken over all samples."""
    total = 0.0
    for k in range(len(reference[0]) if reference else 0):
        noise = signal = 0.0
        for r_all, y_all in zip(reference, got, strict=True):
            r = np.asarray(r_all[k], np.float64).ravel()
            d = r - np.asarray(y_all[k], np.float64).ravel()
            noise += float(d @ d)
            signal += float(r @ r)
        total += noise / signal if signal > 0 else noise
    return total


def region_outputs(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """The tensors the error is measured at (see the module docstring), in graph-output order.

    From each graph output, producers are walked back through tensors that are not quantised; the
    quantised tensors reached are the points. A model with no quantised tensor behind its outputs
    is measured at its outputs.
    """
    index = GraphIndex(model)
    outputs = [o.name for o in model.graph.output]
    found: list[str] = []
    for output in outputs:
        stack, seen = [output], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if plan.is_quantized(tensor):
                found.append(tensor)
                continue
            producer = index.producer(tensor)
            if producer is not None:
                stack.extend(reversed([t for t in producer.input if t and not index.is_constant(t)]))
    return list(dict.fromkeys(found)) or outputs
