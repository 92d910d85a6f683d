"""Fidelity of the quantised model against the float one, on the first calibration samples.

The float references (evenly spread subsets of each layer output and graph output) were kept by
the calibration pass (:mod:`qnnlib.calibration.collect`); here only the quantised model runs. A
quantised tensor is read as its integer (QuantizeLinear) output and dequantised with the plan's
parameters, so what is measured is what onnxruntime's fused integer kernels produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qnnlib.calibration.collect import CAPTURE_VALUES, OUTPUT_VALUES, Reference
from qnnlib.calibration.feeds import Feed
from qnnlib.numerics import affine
from qnnlib.numerics.metrics import ErrorAccumulator, reference_positions
from qnnlib.plan import QuantPlan

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass
class Fidelity:
    """Error accumulators per quantised tensor and per graph output, and the samples used."""

    tensors: dict[str, ErrorAccumulator]
    outputs: dict[str, ErrorAccumulator]
    samples: int


def measure(session: ort.InferenceSession, quantized_names: dict[str, str], plan: QuantPlan, *,
            feeds: Iterable[Feed], references: Sequence[Reference], tensors: Sequence[str],
            outputs: Sequence[str]) -> Fidelity:
    """Run the quantised ``session`` on ``feeds`` and compare with the float ``references``.

    ``session`` must output ``outputs`` and the integer tensors ``quantized_names[t]`` of ``tensors``.
    """
    tensors = [t for t in tensors if t in quantized_names]
    outputs = [o for o in outputs if references and o in references[0].outputs]
    q_names = [quantized_names[t] for t in tensors]
    result = Fidelity({t: ErrorAccumulator() for t in tensors}, {o: ErrorAccumulator() for o in outputs}, 0)
    for feed, ref in zip(feeds, references, strict=False):  # feeds replays at least as many samples
        got = session.run(outputs + q_names, feed)
        for name, value in zip(outputs, got[:len(outputs)], strict=True):
            flat = np.asarray(value).reshape(-1)
            result.outputs[name].update(ref.outputs[name], flat[reference_positions(flat.size, OUTPUT_VALUES)])
        for name, value in zip(tensors, got[len(outputs):], strict=True):
            flat = np.asarray(value).reshape(-1)
            params = plan.params(name)
            picked = flat[reference_positions(flat.size, CAPTURE_VALUES)]
            result.tensors[name].update(ref.tensors[name], affine.dequantize(picked, params.scale, params.zero_point))
        result.samples += 1
    return result
