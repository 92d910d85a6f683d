"""Each group's output error at each precision, estimated as its gain times its local error.

Measuring the output error of "only group ``g`` at precision ``p``" end to end costs one run of a
quantisation simulation per group, precision and sample. The estimate costs about one float pass
per precision, whatever the number of groups:

1. One probe pass (:mod:`qnnlib.local_error`) gives every group's *local error* ``e[g, p]``: the
   relative squared error its quantisation causes at the outputs of the layers that read it.
2. A group's *gain* is how that error grows or shrinks on the way to the region outputs
   (:func:`qnnlib.optimize.error.region_outputs`): ``gain[g] = E[g, p0] / e[g, p0]`` at the gain
   precision ``p0``, both on the first :data:`GAIN_SAMPLES` samples, where ``E[g, p0]`` is the
   output error (:func:`qnnlib.optimize.error.output_error`) with only ``g`` at ``p0``. It is
   computed exactly by one run of the perturbation model (:func:`qnnlib.local_error.build_perturbation`)
   fed the probe's differences: a reader's output on quantised inputs is its float output plus
   the difference.
3. ``E[g, p] ~ gain[g] * e[g, p]``: the gain depends on the network after ``g`` much more than on
   the precision (docs/sensitivity.md measures this against the exact figures).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from qnnlib.graph.edit import with_outputs
from qnnlib.graph.model_io import make_session
from qnnlib.local_error import Key, build_perturbation, build_probe
from qnnlib.optimize.error import output_error, region_outputs, signal_powers
from qnnlib.plan import ActivationParams, QuantPlan, WeightPlan
from qnnlib.progress import Progress

Feed = dict[str, np.ndarray]
#: Samples each group's gain is measured on (the first ones).
GAIN_SAMPLES = 1


@dataclass(frozen=True)
class ErrorEstimate:
    """Local errors over all samples, gains, and one float pass's seconds over the same samples."""

    local: dict[Key, float]
    gains: dict[int, float]
    float_pass: float

    def output_error(self, gid: int, precision: str) -> float:
        """``E[g, p] ~ gain[g] * e[g, p]`` (a group without a measured gain counts its local error)."""
        return self.gains.get(gid, 1.0) * self.local.get((gid, precision), 0.0)


def estimate_errors(float_model: onnx.ModelProto, plan: QuantPlan, samples: Sequence[Feed], *,
                    params: Mapping[str, Mapping[int, ActivationParams]],
                    weights: Mapping[str, Mapping[tuple[str, int], np.ndarray]],
                    owned: Mapping[int, Sequence[WeightPlan]], gids: Sequence[int], gain_at: str,
                    progress: bool | None = None) -> ErrorEstimate:
    """The estimate of every ``(g, p)`` for ``g`` in ``gids`` (see the module docstring).

    ``params[p][g]``, ``weights[p]`` and ``owned`` are :func:`qnnlib.local_error.build_probe`'s: each
    group's activation parameters and each owned weight's dequantised value at precision ``p``;
    ``gain_at`` is one of the keys of ``params``, the precision the gains are measured at.
    """
    points = region_outputs(float_model, plan)
    measured = with_outputs(float_model, points)
    float_session = make_session(measured, log_errors_as="float model")
    begin = time.perf_counter()
    reference = [float_session.run(points, f) for f in samples]
    float_pass = time.perf_counter() - begin
    del float_session
    probe = build_probe(float_model, plan, params=params, weights=weights, owned=owned, points=points,
                        differences_at=(gain_at,))
    # no graph optimisation: measured to save more in building the session than it costs in 8 runs
    session = make_session(probe.model, optimization="disable", log_errors_as="probe model")
    scalars = probe.outputs
    gain_samples = samples[:GAIN_SAMPLES]
    wanted = [d for g in gids for d, _ in probe.diffs.get((g, gain_at), ())]
    runs, differences = [], []
    for i, f in enumerate(samples):
        names = scalars + wanted if i < len(gain_samples) else scalars
        values = dict(zip(names, session.run(names, f), strict=True))
        runs.append(values)
        if i < len(gain_samples):
            differences.append({d: values[d] for d in wanted})
    del session
    local = probe.local_errors(runs)
    local_on_gain_samples = probe.local_errors(runs[:len(gain_samples)])
    perturbation = build_perturbation(measured, probe.perturbed)
    perturbed = make_session(perturbation.model, log_errors_as="perturbation model")
    zeros = dict.fromkeys(perturbation.inputs.values(), np.zeros((), np.float32))  # broadcast by Add
    reference_on_gain_samples = reference[:len(gain_samples)]
    signals = signal_powers(reference_on_gain_samples)
    gains: dict[int, float] = {}
    bar = Progress(len(gids), "sensitivity", enabled=progress)
    try:
        for g in gids:
            at = local_on_gain_samples.get((g, gain_at), 0.0)
            if at > 0:
                got = []
                for k, f in enumerate(gain_samples):
                    deltas = {perturbation.inputs[t]: differences[k][d] for d, t in probe.diffs[(g, gain_at)]}
                    got.append(perturbed.run(points, {**f, **zeros, **deltas}))
                gains[g] = output_error(reference_on_gain_samples, got, signals) / at
            bar.advance()
    finally:
        bar.close()
    return ErrorEstimate(local, gains, float_pass)
