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


def signal_powers(reference: Sequence[Sequence[np.ndarray]]) -> list[float]:
    """Per output ``o``, ``|r_o|^2`` summed over all samples: the denominators of :func:`output_error`."""
    count = len(reference[0]) if reference else 0
    return [sum(_square_sum(np.asarray(r[k])) for r in reference) for k in range(count)]


def output_error(reference: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]],
                 signals: Sequence[float] | None = None) -> float:
    """``E = sum over outputs o of |y_o - r_o|^2 / |r_o|^2``, each sum taken over all samples.

    ``signals``: the reference's :func:`signal_powers`, when the same reference is compared often.
    Differences are taken in the outputs' own precision and squared-summed in float64.
    """
    signals = signal_powers(reference) if signals is None else signals
    total = 0.0
    for k, signal in enumerate(signals):
        noise = sum(_square_sum(np.subtract(r[k], y[k], dtype=np.result_type(r[k], y[k], np.float32)))
                    for r, y in zip(reference, got, strict=True))
        total += noise / signal if signal > 0 else noise
    return total


def _square_sum(x: np.ndarray) -> float:
    """``sum(x^2)``, the products in ``x``'s float type, accumulated by BLAS."""
    flat = np.ravel(x)
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    return float(np.dot(flat, flat))


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
