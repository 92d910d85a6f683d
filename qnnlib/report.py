"""What quantisation did: per layer, per tied group, per output, per phase.

``Report.to_json()`` for pipelines, ``str(report)`` (``to_text()``) for terminals, and an HTML
table (``_repr_html_``) for notebooks.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from qnnlib.numerics.metrics import error_of_sqnr


@dataclass(frozen=True)
class LayerReport:
    """One node of the model: its precision and, when quantised, its output's parameters and SQNR.

    With optimisation: ``range`` is the output group's chosen range, and ``error_before_db`` /
    ``error_after_db`` the range search's error E at the readers of that group, as ``10 log10(1/E)``
    for the calibrated and the chosen range. ``raised`` says why the layer was raised, if it was.
    """

    node: str
    op_type: str
    precision: str
    output: str = ""
    scale: float | None = None
    zero_point: int | None = None
    group: int | None = None
    sqnr_db: float | None = None
    note: str = ""
    range: tuple[float, float] | None = None
    error_before_db: float | None = None
    error_after_db: float | None = None
    raised: str = ""
    #: Where the measured error comes from (:mod:`qnnlib.diagnosis`): per source, its SQNR in dB.
    error_sources: dict[str, float] = field(default_factory=dict)
    #: The dominant source (or ``"amplification"``) and a sentence on it with what to change.
    cause: str = ""
    explanation: str = ""


@dataclass(frozen=True)
class GroupReport:
    """A tied group: members share ``scale``/``zero_point``; the nodes that tied them."""

    id: int
    members: tuple[str, ...]
    tied_by: tuple[str, ...]
    scale: float
    zero_point: int
    range: tuple[float, float]
    requantizations_avoided: int


@dataclass(frozen=True)
class OutputReport:
    """A graph output compared with the float model on the report samples."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float


@dataclass(frozen=True)
class CalibrationReport:
    """Where the calibration data came from and what was seen."""

    method: str
    samples: int
    generated: bool
    nonfinite_tensors: dict[str, int] = field(default_factory=dict)
    #: For generated data: per input, the distribution it was drawn from, and the fit to the model's statistics.
    generation: tuple[str, ...] = ()


@dataclass(frozen=True)
class FusionReport:
    """What onnxruntime made of the QDQ model.

    ``integer_kernels``: op counts of integer kernels in its optimised graph.
    ``float_compute_left``: float Conv/MatMul/Gemm (and fused variants) left there.
    ``float_compute_expected``: how many of those qnnlib kept in float on purpose.
    """

    integer_kernels: dict[str, int]
    float_compute_left: dict[str, int]
    float_compute_expected: int

    @property
    def complete(self) -> bool:
        """True when onnxruntime left no float compute op beyond those qnnlib kept in float."""
        return sum(self.float_compute_left.values()) <= self.float_compute_expected


@dataclass(frozen=True)
class ThresholdStep:
    """One candidate measured while meeting the threshold: groups raised, their level, layers above int8."""

    raised: int
    level: str
    value: float
    met: bool
    layers: int = 0


@dataclass(frozen=True)
class ThresholdReport:
    """The threshold, the figure reached on validation data, and how it was reached.

    ``raised_tensors`` maps each raised tied group (named by its first tensor) to its level and
    ``raised`` each layer that reads or writes one of them (so runs above int8) to its level.
    """

    requirement: str
    value: float
    met: bool
    initial_value: float
    float_score: float | None
    validation: str
    raised: dict[str, str]
    steps: tuple[ThresholdStep, ...]
    seconds: float
    raised_tensors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CurvePointReport:
    """One point of the mixed-precision curve.

    Its cost, estimated output error, groups per precision, the threshold's metric when it was
    measured, and each group's (first tensor's) precision.
    """

    cost: float
    estimate: float
    counts: dict[str, int]
    value: float | None
    met: bool | None
    chosen: bool
    precisions: dict[str, str]


@dataclass(frozen=True)
class MixedReport:
    """The accuracy/cost curve of a mixed-precision search, cheapest first, the chosen point marked."""

    curve: tuple[CurvePointReport, ...]
    sensitivity_seconds: float
    sensitivity_float_passes: float
    sensitivity_method: str
    #: The refinement's trials after the search: one group lowered a step each, measured.
    refined: tuple[CurvePointReport, ...] = ()

    @property
    def chosen(self) -> CurvePointReport | None:
        """The point the model was built from (on the curve or among the refinement's trials)."""
        return next((p for p in (*self.curve, *self.refined) if p.chosen), None)

    def to_text(self) -> str:
        """The curve as a table: cost, estimate, groups per precision, measured value."""
        lines = [f"mixed precision: {len(self.curve)} curve points; sensitivity {self.sensitivity_method} in "
                 f"{self.sensitivity_seconds:.1f}s ({self.sensitivity_float_passes:.1f} float passes)",
                 f"  {'cost':>12} {'estimate':>10} {'int4':>5} {'int8':>5} {'int16':>5} {'float':>5} {'measured':>10}"]
        for p in (*self.curve, *self.refined):
            value = "" if p.value is None else f"{p.value:.6g}" + (" met" if p.met else "")
            counts = " ".join(f"{p.counts.get(k, 0):>5}" for k in ("int4", "int8", "int16", "float"))
            mark = "  <- chosen" if p.chosen else ""
            lines.append(f"  {p.cost:>12.0f} {p.estimate:>10.3g} {counts} {value:>10}{mark}")
            if p is self.curve[-1] and self.refined:
                lines.append("  refinement (one group a step cheaper each, kept while met):")
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """The curve (estimate and measured values against cost) on a matplotlib axis (``pip install qnnlib[plot]``)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("MixedReport.plot needs matplotlib: pip install 'qnnlib[plot]'") from exc
        if ax is None:
            _, ax = plt.subplots()
        ax.plot([p.cost for p in self.curve], [p.estimate for p in self.curve], "o-", label="estimated output error")
        ax.set_xlabel("cost (weight bytes)")
        ax.set_ylabel("estimated output error")
        ax.set_yscale("symlog", linthresh=1e-6)
        measured = [p for p in self.curve if p.value is not None]
        if measured:
            twin = ax.twinx()
            twin.plot([p.cost for p in measured], [p.value for p in measured], "s", color="tab:red", label="measured")
            twin.set_ylabel("threshold metric (measured)")
        chosen = self.chosen
        if chosen is not None:
            ax.axvline(chosen.cost, color="tab:green", linestyle="--", label="chosen")
        ax.legend(loc="upper right")
        return ax


@dataclass(frozen=True)
class Report:
    """Everything :func:`qnnlib.quantize` did and measured."""

    qnnlib_version: str
    config: dict[str, Any]
    calibration: CalibrationReport
    layers: tuple[LayerReport, ...]
    groups: tuple[GroupReport, ...]
    outputs: tuple[OutputReport, ...]
    timings: dict[str, float]
    fusion: FusionReport | None
    notes: tuple[str, ...]
    evaluation_samples: int
    threshold: ThresholdReport | None = None
    mixed: MixedReport | None = None

    @property
    def threshold_met(self) -> bool | None:
        """Whether the threshold was met on validation data; None when none was set."""
        return None if self.threshold is None else self.threshold.met

    @property
    def layers_above_int8(self) -> tuple[LayerReport, ...]:
        """Quantised-capable layers that run in 16 bits or were raised (or put by mixed precision) to float."""
        return tuple(x for x in self.layers if x.precision == "int16" or (x.raised and x.precision == "float"))

    @property
    def requantizations_avoided(self) -> int:
        """Requantisations that tying removed, over all groups."""
        return sum(g.requantizations_avoided for g in self.groups)

    @property
    def quantized_layers(self) -> tuple[LayerReport, ...]:
        """The layers running on integer kernels."""
        return tuple(layer for layer in self.layers if layer.precision != "float")

    def layer(self, node: str) -> LayerReport:
        """The entry of one node; KeyError naming close matches otherwise."""
        for layer in self.layers:
            if layer.node == node:
                return layer
        raise KeyError(f"no node {node!r} in the report")

    def explain(self, node: str) -> str:
        """Why ``node`` loses accuracy: its SQNR, each error source in dB, the cause and what to change."""
        layer = self.layer(node)
        if layer.sqnr_db is None:
            return f"{node}: not measured ({layer.precision}{'; ' + layer.note if layer.note else ''})"
        sources = ", ".join(f"{k} {_db(v)}" for k, v in layer.error_sources.items()) or "none measurable"
        return (f"{node} ({layer.op_type}, {layer.precision}): {_db(layer.sqnr_db)} at {layer.output!r}; "
                f"sources: {sources}\n  {layer.explanation}")

    def growing_layers(self, n: int = 5) -> tuple[LayerReport, ...]:
        """The ``n`` diagnosed layers that add the most error: measured minus inherited relative error.

        A layer's relative error is ``10^(-SQNR/10)`` at its output, and what it inherits the same at
        its worst input (:mod:`qnnlib.diagnosis`); layers adding nothing are left out.
        """
        def added(layer: LayerReport) -> float:
            assert layer.sqnr_db is not None
            return error_of_sqnr(layer.sqnr_db) - error_of_sqnr(layer.error_sources.get("inputs", math.inf))

        diagnosed = [x for x in self.layers if x.cause and x.sqnr_db is not None and added(x) > 0]
        return tuple(sorted(diagnosed, key=added, reverse=True)[:n])

    def worst_layers(self, n: int = 5) -> tuple[LayerReport, ...]:
        """The ``n`` quantised layers with the lowest output SQNR."""
        measured = [x for x in self.quantized_layers if x.sqnr_db is not None]
        return tuple(sorted(measured, key=lambda x: x.sqnr_db)[:n])  # type: ignore[arg-type, return-value]

    # -- renderings --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; infinities become the strings "inf" / "-inf"."""
        data = asdict(self)
        data["requantizations_avoided"] = self.requantizations_avoided
        return _finite(data)

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON (``kwargs`` go to :func:`json.dumps`)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_text(self, max_layers: int | None = 60) -> str:
        """A readable summary: outputs, worst layers, the layer table, groups and timings."""
        lines = [f"qnnlib {self.qnnlib_version}: {len(self.quantized_layers)} of {len(self.layers)} nodes quantised"]
        cal = self.calibration
        source = "GENERATED from what the model implies (no data given)" if cal.generated else "given by the user"
        lines.append(f"calibration: {cal.method}, {cal.samples} samples, {source}")
        lines += [f"  generated {line}" for line in cal.generation]
        for out in self.outputs:
            lines.append(f"output {out.name!r}: SQNR {_db(out.sqnr_db)}, cosine {out.cosine:.5f}, "
                         f"max |error| {out.max_abs_error:.4g} (on {self.evaluation_samples} samples)")
        if self.fusion is not None:
            kernels = ", ".join(f"{op} x{n}" for op, n in self.fusion.integer_kernels.items()) or "none"
            lines.append(f"onnxruntime integer kernels: {kernels}")
            left = ", ".join(f"{op} x{n}" for op, n in self.fusion.float_compute_left.items())
            if left:
                lines.append(f"float compute ops left by onnxruntime: {left}")
        if self.threshold is not None:
            t = self.threshold
            verdict = "MET" if t.met else "NOT MET"
            lines.append(f"threshold {t.requirement}: {verdict} with {t.value:.6g} on {t.validation} "
                         f"(int8 gave {t.initial_value:.6g}; {len(t.raised_tensors)} tensors raised, "
                         f"{len(t.raised)} layers above int8; {t.seconds:.1f}s)")
            for tensor, level in t.raised_tensors.items():
                lines.append(f"  {'lowered' if level == 'int4' else 'raised'} {tensor} to {level}")
        if self.mixed is not None:
            lines.append(self.mixed.to_text())
        lines.append(f"tied groups: {len(self.groups)}; requantisations avoided: {self.requantizations_avoided}")
        worst = self.worst_layers(3)
        if worst:
            lines.append("lowest-SQNR layers: " + ", ".join(f"{w.node} ({_db(w.sqnr_db)})" for w in worst))
        growing = self.growing_layers(3)
        if growing:
            lines.append("where the error grows most (report.explain(node) for any layer):")
            lines += [f"  {g.node}: {_db(g.error_sources.get('inputs', math.inf))} in, {_db(g.sqnr_db)} out; "
                      f"{g.explanation}" for g in growing]
        lines.append("")
        header = f"{'node':<32} {'op':<18} {'prec':<6} {'scale':>10} {'zp':>4} {'group':>5} {'SQNR dB':>8}"
        lines.append(header)
        lines.append("-" * len(header))
        shown = self.layers if max_layers is None else self.layers[:max_layers]
        for layer in shown:
            scale = f"{layer.scale:.4g}" if layer.scale is not None else ""
            zp = str(layer.zero_point) if layer.zero_point is not None else ""
            group = str(layer.group) if layer.group is not None else ""
            sqnr = _db(layer.sqnr_db) if layer.sqnr_db is not None else ""
            lines.append(f"{layer.node[:32]:<32} {layer.op_type[:18]:<18} {layer.precision:<6} {scale:>10} {zp:>4} "
                         f"{group:>5} {sqnr:>8}" + (f"  {layer.note}" if layer.note else ""))
        if max_layers is not None and len(self.layers) > max_layers:
            lines.append(f"... {len(self.layers) - max_layers} more nodes (report.to_text(max_layers=None) shows all)")
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = "".join(
            f"<tr><td>{esc(x.node)}</td><td>{esc(x.op_type)}</td><td>{esc(x.precision)}</td>"
            f"<td>{'' if x.scale is None else f'{x.scale:.4g}'}</td>"
            f"<td>{'' if x.zero_point is None else x.zero_point}</td>"
            f"<td>{'' if x.group is None else x.group}</td>"
            f"<td>{'' if x.sqnr_db is None else _db(x.sqnr_db)}</td><td>{esc(x.note)}</td>"
            f"<td title=\"{esc(x.explanation)}\">{esc(x.cause)}</td></tr>"
            for x in self.layers
        )
        outs = "".join(
            f"<li><b>{esc(o.name)}</b>: SQNR {_db(o.sqnr_db)}, cosine {o.cosine:.5f}</li>" for o in self.outputs
        )
        gen = " <b>(generated data)</b>" if self.calibration.generated else ""
        return (
            f"<div><p>qnnlib {esc(self.qnnlib_version)}: {len(self.quantized_layers)} of {len(self.layers)} "
            f"nodes quantised; calibration {esc(self.calibration.method)} on {self.calibration.samples} "
            f"samples{gen}; {len(self.groups)} tied groups, {self.requantizations_avoided} requantisations "
            f"avoided.</p><ul>{outs}</ul><table><thead><tr><th>node</th><th>op</th><th>precision</th>"
            f"<th>scale</th><th>zero point</th><th>group</th><th>SQNR dB</th><th>note</th><th>cause</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf dB" if value > 0 else "-inf dB"
    return f"{value:.1f} dB"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
