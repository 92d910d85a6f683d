"""``qnnlib.analyze_sensitivity``: what each tied group's precision costs at the model's outputs.

One float calibration pass gives every group's parameters at every precision
(:mod:`qnnlib.precision`: a group's precision covers its activations and the weights of the layers
that read it). For each group ``g`` and candidate precision ``p`` the report holds

* ``only[p]``: the metric with ``g`` at ``p`` and everything else float;
* ``all_but[p]``: the metric with every group at ``p`` except ``g``, which stays float;

and ``all_lowered[p]``, everything at ``p``; and beside each metric the output error

    E = sum over outputs o of |y_o - y_o_float|^2 / |y_o_float|^2   (each sum over all samples)

which adds up over groups when their errors are independent: the quantity a mixed-precision
assignment is estimated with. Two methods fill them in:

* ``method="estimate"`` (default): :mod:`qnnlib.optimize.estimate`: one probe pass gives every
  group's local error ``e[g, p]`` at its readers' outputs, one perturbation run per group its gain
  to the outputs, and ``only_error[p] = gain[g] * e[g, p]``, ``all_but_error[p] = sum of those``
  over ``h != g``, ``all_lowered_error[p] = sum over all h``; each metric is the SQNR
  ``-10 log10(E)`` in dB. About ``3 + len(precisions)`` float passes and one short run per group;
  measured against ``"measure"`` on the benchmark models the estimate is within a small
  factor of the measured error (docs/sensitivity.md), and :func:`qnnlib.quantize` checks what it
  chooses from it by real runs.
* ``method="measure"``: one simulation model (:mod:`qnnlib.emit.simulation`, weights as switchable
  quantisation points), built once, evaluates every configuration through its inputs alone, with
  the threshold's metric when ``config`` has one (an ``eval_fn`` receives a session on the
  simulation model with the configuration fed in), else the SQNR of all outputs in dB. Exact, and
  ``2 * groups * precisions + precisions`` simulation runs.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from qnnlib.assign import WEIGHT_BITS, Assignment, assign_milp, weight_bytes
from qnnlib.calibration.collect import CalibrationStats, collect
from qnnlib.calibration.feeds import Feed
from qnnlib.config import QuantConfig
from qnnlib.emit.simulation import Simulation, WeightKey, build_simulation
from qnnlib.errors import ConfigError
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.index import GraphIndex, layer_macs
from qnnlib.graph.model_io import ModelLike, make_session
from qnnlib.numerics.metrics import sqnr_of_error
from qnnlib.numerics.qtypes import qtype
from qnnlib.optimize.error import output_error, region_outputs
from qnnlib.optimize.estimate import estimate_errors
from qnnlib.plan import ActivationParams, QuantPlan
from qnnlib.precision import BITS, fake_quantize_weight, group_params, owned_weights, weight_scales_at
from qnnlib.prepare import PreparedModel, Timer, calibrated_plan, open_feeds, prepare
from qnnlib.progress import Progress
from qnnlib.threshold import LOWER_IS_BETTER, output_metric

log = logging.getLogger(__name__)

#: Precisions analysed when none are given.
DEFAULT_PRECISIONS = ("int4", "int8", "int16")
#: Calibration samples each configuration is measured on, when not given.
DEFAULT_SAMPLES = 8
#: Levels of the 4-bit ranges the calibration pass gives.
LOW_BIT_LEVELS = 16
#: Cost per bit added to every precision's weight bytes (see :meth:`SensitivityReport.cost_table`).
TIE_BREAK = 1e-6


@dataclass(frozen=True)
class GroupSensitivity:
    """One tied group: what it holds, and the metric and output error per precision (see the module docstring)."""

    group: int
    tensor: str
    members: tuple[str, ...]
    layers: tuple[str, ...]
    #: Values stored at the group's precision: its owned weights and its constant members (a table).
    weights: int
    only: dict[str, float]
    all_but: dict[str, float]
    only_error: dict[str, float]
    all_but_error: dict[str, float]
    #: Multiply-accumulates of the layers whose weights the group owns, per sample (dynamic dims as 1).
    macs: int = 0
    #: Weighted layers writing one of the members: they leave int8 too when the group does.
    writers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SensitivityReport:
    """Per-group sensitivities, the whole model at each precision, and what the analysis cost.

    ``higher_is_better`` orients ``metric``; ``float_pass_seconds`` is one float pass over the same
    samples, so ``seconds / float_pass_seconds`` is the analysis's cost in float passes; ``method``
    says how the entries were found (module docstring); ``timings`` splits ``seconds`` into phases
    (load, normalize, select, calibrate, analyse).
    """

    metric: str
    higher_is_better: bool
    precisions: tuple[str, ...]
    groups: tuple[GroupSensitivity, ...]
    all_lowered: dict[str, float]
    all_lowered_error: dict[str, float]
    samples: int
    generated: bool
    unowned_layers: tuple[str, ...]
    seconds: float
    float_pass_seconds: float
    method: str = "measure"
    timings: dict[str, float] = field(default_factory=dict)
    #: For generated data: how each input was drawn (:mod:`qnnlib.calibration.generate`).
    generation: tuple[str, ...] = ()

    @property
    def float_passes(self) -> float:
        """The analysis's wall time as a multiple of one float pass over the same samples."""
        return self.seconds / self.float_pass_seconds if self.float_pass_seconds > 0 else math.inf

    def ranking(self, precision: str) -> list[GroupSensitivity]:
        """Groups from most to least sensitive at ``precision``: worst metric when only that group is lowered."""
        if precision not in self.precisions:
            raise ConfigError(f"precision {precision!r} was not analysed; analysed: {self.precisions}")

        def badness(g: GroupSensitivity) -> tuple[float, float]:
            value = g.only[precision]
            return (-value if self.higher_is_better else value), g.only_error[precision]

        return sorted(self.groups, key=badness, reverse=True)

    def error_table(self) -> dict[int, dict[str, float]]:
        """Per group, the output error with only it at each precision (float: 0), for :mod:`qnnlib.assign`."""
        return {g.group: {**g.only_error, "float": 0.0} for g in self.groups}

    def cost_table(self, cost: str = "bytes") -> dict[int, dict[str, float]]:
        """Per group and precision, the cost that :mod:`qnnlib.assign` minimises.

        ``"bytes"``: its owned weights' bytes (float 4 bytes each); ``"bitops"``: its bit-operations
        ``macs * bits^2`` (weights and activations at the group's precision, float as 32 bits).
        Each precision also costs ``TIE_BREAK * bits``, so that among equal costs (a group without
        weights) the narrower activations win.
        """
        def of(g: GroupSensitivity, p: str) -> float:
            base = weight_bytes(g.weights, p) if cost == "bytes" else float(g.macs) * WEIGHT_BITS[p] ** 2
            return base + TIE_BREAK * WEIGHT_BITS[p]

        return {g.group: {p: of(g, p) for p in (*self.precisions, "float")} for g in self.groups}

    def assign(self, max_error: float) -> Assignment | None:
        """The least weight bytes whose additive error estimate is at most ``max_error`` (None: none is)."""
        return assign_milp(self.error_table(), self.cost_table(), max_error)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "float_passes": self.float_passes}

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), default=float, **kwargs)

    def _rows(self) -> list[list[str]]:
        head = ["group", "layers", *[f"{p} only" for p in self.precisions], *[f"{p} all but" for p in self.precisions]]
        rows = [head]
        for g in self.ranking(self.precisions[0]):
            rows.append([g.tensor, str(len(g.layers)), *[f"{g.only[p]:.4g}" for p in self.precisions],
                         *[f"{g.all_but[p]:.4g}" for p in self.precisions]])
        return rows

    def to_text(self) -> str:
        """A readable table, most sensitive group first (at the lowest precision analysed)."""
        data = "generated inputs" if self.generated else "calibration samples"
        lines = [f"sensitivity ({self.metric}, {HOW.get(self.method, self.method)}) on {self.samples} {data}; "
                 f"{self.seconds:.1f}s = {self.float_passes:.1f} float passes",
                 *([ESTIMATE_NOTE] if self.method == "estimate" else []),
                 *[f"  generated {line}" for line in self.generation],
                 "all lowered: " + ", ".join(f"{p} {self.all_lowered[p]:.4g}" for p in self.precisions)]
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            cells = zip(r, widths, strict=True)
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if self.unowned_layers:
            lines.append(f"weights left float in every configuration (no quantised input or output): "
                         f"{list(self.unowned_layers)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        rows = self._rows()
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        title = html.escape(self.to_text().splitlines()[0])
        return f"<p>{title}</p><table><tr>{head}</tr>{cells}</table>"


class SimulatedSession:
    """An onnxruntime-like session on the simulation model with one configuration's parameters fed.

    What a user's ``eval_fn`` receives: ``run``, ``get_inputs`` (the model's own inputs only) and
    ``get_outputs`` behave as on the quantised model.
    """

    def __init__(self, session: Any, switches: Mapping[str, np.ndarray], inputs: Sequence[str],
                 outputs: Sequence[str]) -> None:
        self._session = session
        self._switches = dict(switches)
        self._inputs = set(inputs)
        self._outputs = set(outputs)

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        """``InferenceSession.run`` with the configuration's parameters added to the feeds."""
        names = [o.name for o in self.get_outputs()] if output_names is None else output_names
        return self._session.run(names, {**input_feed, **self._switches}, run_options)

    def get_inputs(self) -> list[Any]:
        """The model's inputs (the configuration's parameter inputs are hidden)."""
        return [i for i in self._session.get_inputs() if i.name in self._inputs]

    def get_outputs(self) -> list[Any]:
        """The model's outputs (the error's measuring points are hidden)."""
        return [o for o in self._session.get_outputs() if o.name in self._outputs]


#: How :func:`analyze_sensitivity` can measure: see the module docstring.
METHODS = ("estimate", "measure")
#: What each method's numbers are, as the report's text says it.
HOW = {"estimate": "estimated", "measure": "measured"}
#: The report text's line on how estimates are made and how to get exact numbers.
ESTIMATE_NOTE = ("  estimated: local errors times one gain per group, measured at int8 (least reliable at int4); "
                 "method='measure' runs every configuration")
#: The precision each group's gain is measured at (``method="estimate"``).
GAIN_PRECISION = "int8"


def analyze_sensitivity(model: ModelLike, calib: Any = None, *, config: QuantConfig | None = None,
                        precisions: Sequence[str] = DEFAULT_PRECISIONS, samples: int = DEFAULT_SAMPLES,
                        method: str = "estimate", progress: bool | None = None) -> SensitivityReport:
    """Measure each tied group's sensitivity at each precision; see the module docstring.

    ``calib``: the forms :func:`qnnlib.quantize` takes, or None for generated inputs. ``samples``:
    the calibration samples each configuration is measured on (the first ones). ``method``:
    ``"estimate"`` (local errors, one probe pass) or ``"measure"`` (every configuration run).
    ``progress``: a progress bar on stderr (default: when stderr is a terminal).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a qnnlib.QuantConfig, got {type(config).__name__}")
    precisions = tuple(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in BITS]
    if unknown or not precisions:
        raise ConfigError(f"precisions must be a non-empty subset of {tuple(BITS)}, got {precisions!r}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    timer = Timer()
    m = prepare(model, config, timer)
    with open_feeds(m, calib, config, timer, replay=samples) as feeds, timer("calibrate"):
        stats = collect(m.float_model, m.selection.observed(m.index), feeds, config.calibration,
                        levels=qtype(config.activation_type).levels, symmetric=config.activation_symmetric,
                        low_bit_levels=LOW_BIT_LEVELS, constants=m.selection.constants(m.index))
        m, plan = calibrated_plan(m, stats.ranges, config)
        chosen = list(feeds.take(samples))
        generation = feeds.generation
    return analyse_plan(m, plan, stats, chosen, config=config, precisions=precisions, method=method,
                        progress=progress, generation=generation, timer=timer, start=start)


def analyse_plan(m: PreparedModel, plan: QuantPlan, stats: CalibrationStats, samples: list[Feed], *,
                 config: QuantConfig, precisions: Sequence[str], method: str = "estimate",
                 progress: bool | None = None, generation: tuple[str, ...] | None = None,
                 timer: Timer | None = None,
                 start: float | None = None) -> SensitivityReport:
    """The analysis of an already calibrated ``plan`` (``stats`` with its low-bit ranges) on ``samples``.

    What :func:`analyze_sensitivity` does after calibrating, and what :func:`qnnlib.quantize` calls
    for mixed precision. ``timer`` and ``start`` carry the caller's timings into the report.
    """
    timer = timer if timer is not None else Timer()
    start = start if start is not None else time.perf_counter()
    with timer("analyse"):
        configs = _Configurations(m.float_model, plan, config, stats,
                                  tuple(dict.fromkeys((*precisions, GAIN_PRECISION))) if method == "estimate"
                                  else precisions)
        gids = [g.id for g in plan.groups if any(configs.params[p].get(g.id) for p in precisions)]
        metric, higher, results, float_pass = _analyse(m.float_model, configs, gids, samples, config=config,
                                                       precisions=precisions, method=method, progress=progress)
    only, all_but, all_lowered = results
    weighted = {wp.node for wp in plan.weights if wp.kind == "weight"}
    groups = tuple(
        GroupSensitivity(gid, plan.groups[gid].members[0], plan.groups[gid].members,
                         tuple(dict.fromkeys(wp.node for wp in configs.owned.get(gid, ()))),
                         sum(int(np.prod(configs.weight_shape(wp.tensor))) for wp in configs.owned.get(gid, ()))
                         + _constant_values(m.index, plan.groups[gid].members),
                         {p: v[0] for p, v in only[gid].items()}, {p: v[0] for p, v in all_but[gid].items()},
                         {p: v[1] for p, v in only[gid].items()}, {p: v[1] for p, v in all_but[gid].items()},
                         sum(layer_macs(m.index, wp.node, configs.weight_shape(wp.tensor))
                             for wp in configs.owned.get(gid, ())),
                         tuple(sorted(n for n in weighted
                                      if set(m.index.node(n).output) & set(plan.groups[gid].members))))
        for gid in gids
    )
    owned_nodes = {wp.node for ws in configs.owned.values() for wp in ws}
    unowned = tuple(dict.fromkeys(wp.node for wp in plan.weights if wp.kind == "weight" and wp.node not in owned_nodes))
    return SensitivityReport(metric, higher, tuple(precisions), groups,
                             {p: v[0] for p, v in all_lowered.items()}, {p: v[1] for p, v in all_lowered.items()},
                             len(samples), generation is not None, unowned, time.perf_counter() - start, float_pass,
                             method, dict(timer.times), generation or ())


def _constant_values(index: GraphIndex, members: Sequence[str]) -> int:
    """Values of a group's constant members (an embedding table), stored at the group's precision."""
    return sum(math.prod(index.initializers[t].dims) for t in members if index.is_constant(t))


def _analyse(float_model: onnx.ModelProto, configs: _Configurations, gids: list[int], samples: list[Feed], *,
             config: QuantConfig, precisions: Sequence[str], method: str,
             progress: bool | None) -> tuple[str, bool, _Results, float]:
    """The metric's name and orientation, the results and one float pass's seconds, by ``method``."""
    if method == "estimate":
        return "sqnr", True, *_estimate(float_model, configs, gids, samples, precisions=precisions, progress=progress)
    metric = config.threshold.name if config.threshold is not None else "sqnr"
    return metric, metric not in LOWER_IS_BETTER, *_measure(float_model, configs, gids, samples, config=config,
                                                            progress=progress)


#: Per configuration, its metric and output error.
_Scores = tuple[float, float]
#: Per group and precision, ``only`` and ``all_but``; per precision, ``all_lowered``.
_Results = tuple[dict[int, dict[str, _Scores]], dict[int, dict[str, _Scores]], dict[str, _Scores]]


def _estimate(float_model: onnx.ModelProto, configs: _Configurations, gids: list[int], samples: list[Feed], *,
              precisions: Sequence[str], progress: bool | None) -> tuple[_Results, float]:
    """Every entry from :func:`qnnlib.optimize.estimate.estimate_errors`, gains at :data:`GAIN_PRECISION`.

    ``only_error[p] = gain[g] * e[g, p]``; ``all_but`` and ``all_lowered`` add these up.
    Returns the results and one float pass over ``samples`` in seconds.
    """
    estimate = estimate_errors(float_model, configs.plan, samples, params=configs.params,
                               weights=configs.dequantised, owned=configs.owned, gids=gids,
                               gain_at=GAIN_PRECISION, progress=progress)
    only: dict[int, dict[str, _Scores]] = {g: {} for g in gids}
    all_but: dict[int, dict[str, _Scores]] = {g: {} for g in gids}
    all_lowered: dict[str, _Scores] = {}
    for p in precisions:
        errors = {g: estimate.output_error(g, p) for g in gids}
        total = sum(errors.values())
        all_lowered[p] = (sqnr_of_error(total), total)
        for g in gids:
            rest = total - errors[g]
            only[g][p] = (sqnr_of_error(errors[g]), errors[g])
            all_but[g][p] = (sqnr_of_error(rest), rest)
    return (only, all_but, all_lowered), estimate.float_pass


def _measure(float_model: onnx.ModelProto, configs: _Configurations, gids: list[int], samples: list[Feed], *,
             config: QuantConfig, progress: bool | None) -> tuple[_Results, float]:
    """Every entry from a run of the simulation model with its configuration fed in.

    Returns the results and one float pass over ``samples`` in seconds.
    """
    outputs = [o.name for o in float_model.graph.output]
    points = region_outputs(float_model, configs.plan)
    measured = with_outputs(float_model, points)
    sim = build_simulation(measured, configs.plan, weight_switches=True)
    score = _scorer(measured, sim, samples, config, outputs=outputs, points=points)
    precisions = tuple(configs.params)
    bar = Progress(len(precisions) * (2 * len(gids) + 1), "sensitivity", enabled=progress)
    all_lowered: dict[str, _Scores] = {}
    only: dict[int, dict[str, _Scores]] = {g: {} for g in gids}
    all_but: dict[int, dict[str, _Scores]] = {g: {} for g in gids}
    try:
        for p in precisions:
            all_lowered[p] = score(configs.feeds(sim, dict.fromkeys(gids, p)))
            bar.advance()
            for gid in gids:
                only[gid][p] = score(configs.feeds(sim, {gid: p}))
                bar.advance()
                all_but[gid][p] = score(configs.feeds(sim, {g: p for g in gids if g != gid}))
                bar.advance()
    finally:
        bar.close()
    return (only, all_but, all_lowered), score.float_pass_seconds


class _Configurations:
    """Every group's parameters and owned weights' scales at every precision, as simulation feeds."""

    def __init__(self, float_model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, stats: CalibrationStats,
                 precisions: Sequence[str]) -> None:
        self.plan = plan
        self.owned = owned_weights(plan)
        index = GraphIndex(float_model)
        self._values = {wp.tensor: index.constant(wp.tensor).astype(np.float32)
                        for ws in self.owned.values() for wp in ws}
        self.params: dict[str, dict[int, ActivationParams]] = {}
        self.weights: dict[str, dict[WeightKey, tuple[np.ndarray, int]]] = {}
        for p in precisions:
            self.params[p] = {}
            for g in plan.groups:
                params = group_params(g, p, activation_type=config.activation_type,
                                      symmetric=config.activation_symmetric,
                                      power_of_two=config.power_of_two_scales, extremes=stats.extremes,
                                      low_bit_ranges=stats.low_bit_ranges)
                if params is not None:
                    self.params[p][g.id] = params
            self.weights[p] = {(wp.node, wp.input_index): weight_scales_at(wp, self._values[wp.tensor], p,
                                                                           power_of_two=config.power_of_two_scales)
                               for ws in self.owned.values() for wp in ws}

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """The shape of owned weight ``name``."""
        return self._values[name].shape

    @property
    def dequantised(self) -> dict[str, dict[WeightKey, np.ndarray]]:
        """Per precision, each owned weight's value after quantisation at that precision."""
        out: dict[str, dict[WeightKey, np.ndarray]] = {}
        for p, chosen in self.weights.items():
            out[p] = {}
            for ws in self.owned.values():
                for wp in ws:
                    value = self._values[wp.tensor]
                    scales, qmax = chosen[(wp.node, wp.input_index)]
                    out[p][(wp.node, wp.input_index)] = fake_quantize_weight(value, scales, wp.axis, qmax)
        return out

    def feeds(self, sim: Simulation, levels: Mapping[int, str]) -> dict[str, np.ndarray]:
        """Simulation inputs with each group in ``levels`` (and its owned weights) at its precision, the rest float."""
        params = {g.id: g.params for g in self.plan.groups}
        enabled = set()
        for gid, p in levels.items():
            if gid in self.params[p]:
                params[gid] = self.params[p][gid]
                enabled.add(gid)
        weights = {(wp.node, wp.input_index): self.weights[p][(wp.node, wp.input_index)]
                   for gid, p in levels.items() for wp in self.owned.get(gid, ())}
        return {**sim.feeds(params, enabled), **sim.weight_feeds(weights)}


@dataclass(frozen=True)
class _Scorer:
    """The metric (at the graph outputs) and the output error (at the region outputs) of one configuration."""

    metric: Callable[[dict[str, np.ndarray], list[list[np.ndarray]]], float]
    session: Any
    samples: list[Feed]
    reference: list[list[np.ndarray]]
    outputs: list[str]
    points: list[str]
    float_pass_seconds: float

    @property
    def names(self) -> list[str]:
        """What each run fetches: the graph outputs, then the region outputs that are not among them."""
        return list(dict.fromkeys(self.outputs + self.points))

    def split(self, values: list[list[np.ndarray]]) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """Per sample, the graph outputs' values and the region outputs' values."""
        at = {name: i for i, name in enumerate(self.names)}
        return ([v[:len(self.outputs)] for v in values], [[v[at[p]] for p in self.points] for v in values])

    def __call__(self, switches: dict[str, np.ndarray]) -> tuple[float, float]:
        got, at_points = self.split([self.session.run(self.names, {**f, **switches}) for f in self.samples])
        return float(self.metric(switches, got)), output_error(self.split(self.reference)[1], at_points)


def _scorer(measured: onnx.ModelProto, sim: Simulation, samples: list[Feed], config: QuantConfig, *,
            outputs: list[str], points: list[str]) -> _Scorer:
    """Time one float pass over ``samples`` (its values are the reference) and make the scorer.

    ``measured`` is the float model that also outputs the region outputs ``points``.
    """
    float_session = make_session(measured, log_errors_as="float model")
    names = list(dict.fromkeys(outputs + points))
    begin = time.perf_counter()
    reference = [float_session.run(names, f) for f in samples]
    float_pass = time.perf_counter() - begin
    session = make_session(sim.model, optimization="basic", log_errors_as="simulation model")
    threshold = config.threshold
    inputs = [i.name for i in measured.graph.input]
    graph_reference = [r[:len(outputs)] for r in reference]

    def metric(switches: dict[str, np.ndarray], got: list[list[np.ndarray]]) -> float:
        if threshold is not None and threshold.eval_fn is not None:
            return float(threshold.eval_fn(SimulatedSession(session, switches, inputs, outputs)))
        return output_metric(threshold.metric if threshold is not None else "sqnr",  # type: ignore[arg-type]
                             graph_reference, got)

    return _Scorer(metric, session, samples, reference, outputs, points, float_pass)
