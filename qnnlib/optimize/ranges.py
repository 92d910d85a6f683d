"""Choose each tied group's activation range by the error it causes at the layers that read it.

Groups are visited in topological order, a chunk at a time. For a chunk, one run of the simulation
model (:mod:`qnnlib.emit.simulation`) with every earlier group quantised at its chosen range
captures, on a few samples, the values ``x`` entering the chunk's groups (their upstream is
quantised) and the other inputs of the layers that read them. For each group a small local model
(its fake quantisation and its reading layers, with quantised weights) compares each reading
layer's float output ``L(x, ...)`` with its fixed-point output for candidate ranges, and the range
of least error

    E(range) = sum over reading layers L of |L(fq(x; range), ...) - L(x, ...)|^2 / |L(x, ...)|^2

(or ``sum (1 - cosine)`` with ``objective="cosine"``) is kept. Both sides see the same quantised
upstream, so E is the damage this group's quantisation does where its values are used, not the
error accumulated before it (with that, shrinking a range towards zero can look like a gain).

Candidates scale the group's observed ``[min, max]`` by one factor (a grid, then scipy's bounded
scalar search around the best point), then move each end alone. The calibrated range stays unless
a candidate lowers E by ``MIN_GAIN``; a group whose calibrated range costs less than ``NEGLIGIBLE``
is not searched.

Reading layers are the nodes that read a member of the group without writing another member, so a
range is judged where its values are used: after a MaxPool or a Concat, and at an SE block's Mul,
whose gate decides which channels matter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qnnlib.emit.simulation import Simulation, build_simulation, fake_quant_nodes
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.index import GraphIndex, subgraphs
from qnnlib.graph.model_io import make_session
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, qtype
from qnnlib.plan import SOFTMAX_SOURCE, ActivationParams, GroupPlan, QuantPlan
from qnnlib.progress import Progress

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: Groups optimised per simulation run.
CHUNK = 16
#: Scale factors tried first, as fractions of the observed range.
GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
#: Half-width of the refinement around the best grid factor.
REFINE_STEP = 0.15
#: Evaluations of each bounded scalar search.
SEARCH_STEPS = 5
#: A searched range replaces the calibrated one only if it lowers E by at least this share: smaller
#: gains on a few samples are noise, and keeping the calibrated range changes nothing not needed.
MIN_GAIN = 0.1
#: A group whose calibrated range already costs less than this E (a local SQNR above 35 dB) is kept.
NEGLIGIBLE = 10 ** -3.5


@dataclass(frozen=True)
class RangeChoice:
    """The range chosen for one group, and the error E before (calibrated range) and after."""

    group: int
    range: tuple[float, float]
    before: float
    after: float
    readers: tuple[str, ...]


@dataclass(frozen=True)
class _Reader:
    """A node reading members of a group: itself, which members it reads, its other inputs."""

    node: onnx.NodeProto
    members: tuple[str, ...]
    others: tuple[str, ...]


def optimize_ranges(float_model: onnx.ModelProto, plan: QuantPlan, extremes: Mapping[str, tuple[float, float]],
                    feeds: Sequence[Feed], *, objective: str = "mse", symmetric: bool = False,
                    power_of_two: bool = False, skip: frozenset[int] = frozenset(),
                    progress: bool | None = None) -> dict[int, RangeChoice]:
    """Layer-wise range search for every group of ``plan`` not in ``skip``; see the module docstring.

    ``extremes`` are the observed ``(min, max)`` of calibrated tensors; ``feeds`` a few samples;
    ``progress``: a bar per group searched (:class:`~qnnlib.progress.Progress`; None: on a terminal).
    """
    sim = build_simulation(float_model, plan)
    float_index = GraphIndex(float_model)
    sim_nodes = {n.name: n for n in sim.model.graph.node}
    constants = {t.name for t in sim.model.graph.initializer}
    todo = [g for g in plan.groups if g.id not in skip and g.params.qtype != FLOAT
            and g.params.source not in ("override", SOFTMAX_SOURCE) and _extent(g, extremes) is not None]
    readers = {g.id: _readers(g, float_index, sim, sim_nodes, constants) for g in todo}
    todo = [g for g in todo if readers[g.id]]
    if not todo:
        return {}
    captured = sorted({n for g in todo for r in readers[g.id] for n in (*r.members, *r.others)})
    sim_session = make_session(with_outputs(sim.model, captured), optimization="basic",
                               log_errors_as="simulation model")
    params = {g.id: g.params for g in plan.groups}
    done: set[int] = set()
    choices: dict[int, RangeChoice] = {}
    bar = Progress(len(todo), "range search", enabled=progress)
    try:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            names = sorted({n for g in chunk for r in readers[g.id] for n in (*r.members, *r.others)})
            values = [dict(zip(names, sim_session.run(names, {**f, **sim.feeds(params, done)}), strict=True))
                      for f in feeds]
            for group in chunk:
                local = _LocalModel(group, readers[group.id], sim, constants, objective=objective,
                                    symmetric=symmetric, power_of_two=power_of_two)
                choice = _search(local, values, _extent(group, extremes))  # type: ignore[arg-type]
                choices[group.id] = choice
                params[group.id] = _params(group.params, choice.range, symmetric=symmetric,
                                           power_of_two=power_of_two)
                done.add(group.id)
                bar.advance()
    finally:
        bar.close()
    return choices


def _extent(group: GroupPlan, extremes: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The union of the observed ``[min, max]`` of the group's calibrated members."""
    seen = [extremes[m] for m in group.members if m in extremes]
    if not seen:
        return None
    lo, hi = min(s[0] for s in seen), max(s[1] for s in seen)
    return (lo, hi) if hi > lo else None


def _readers(group: GroupPlan, index: GraphIndex, sim: Simulation, sim_nodes: dict[str, onnx.NodeProto],
             constants: set[str]) -> list[_Reader]:
    """Nodes that read a member of ``group`` and write nothing in it (their outputs are where it is judged)."""
    members = set(group.members)
    found: dict[str, _Reader] = {}
    for member in group.members:
        for use in index.uses(member):
            node = use.node
            if use.index < 0 or node.name in found or any(True for _ in subgraphs(node)):
                continue
            if node.output and all(o in members for o in node.output if o):
                continue
            sim_node = sim_nodes[node.name]
            read = tuple(dict.fromkeys(m for m in node.input if m in members))
            simulated = {sim.simulated.get(m, m) for m in read}
            others = tuple(dict.fromkeys(n for n in sim_node.input if n and n not in simulated and n not in constants))
            found[node.name] = _Reader(sim_node, read, others)
    return list(found.values())


def _params(base: ActivationParams, rng: tuple[float, float], *, symmetric: bool,
            power_of_two: bool) -> ActivationParams:
    qt = qtype(base.qtype)
    scale, zp = affine.activation_qparams(rng[0], rng[1], qt, symmetric=symmetric, power_of_two=power_of_two)
    return ActivationParams(base.qtype, float(scale), int(zp), (float(rng[0]), float(rng[1])), "optimized")


class _LocalModel:
    """A group's fake quantisation feeding its readers; evaluates E for a candidate range."""

    def __init__(self, group: GroupPlan, readers: list[_Reader], sim: Simulation, constants: set[str], *,
                 objective: str, symmetric: bool, power_of_two: bool) -> None:
        self.group = group
        self.readers = tuple(r.node.name for r in readers)
        self.objective = objective
        self.symmetric = symmetric
        self.power_of_two = power_of_two
        param_names = sim.inputs[group.id]
        nodes: list[onnx.NodeProto] = []
        rename: dict[str, str] = {}
        members = tuple(dict.fromkeys(m for r in readers for m in r.members))
        taken: set[str] = set()

        def fresh(base: str) -> str:
            name = f"local/{base}"
            while name in taken:
                name += "_"
            taken.add(name)
            return name

        for m in members:
            chain, out = fake_quant_nodes(m, param_names, fresh)
            nodes.extend(chain)
            rename[sim.simulated.get(m, m)] = out
        needed_constants: set[str] = set()
        for r in readers:
            copy = onnx.NodeProto()
            copy.CopyFrom(r.node)
            for i, name in enumerate(copy.input):
                copy.input[i] = rename.get(name, name)
                if name in constants:
                    needed_constants.add(name)
            nodes.append(copy)
        produced = {o for r in readers for o in r.node.output}  # one reader may feed another (LayerNorm's mean)
        self.feed_names = tuple(dict.fromkeys([*members, *(o for r in readers for o in r.others if o not in produced)]))
        self.outputs = tuple(dict.fromkeys(o for r in readers for o in r.node.output if o))
        inputs = [onnx.ValueInfoProto(name=n) for n in self.feed_names]
        inputs += [onnx.ValueInfoProto(name=n) for n in param_names]
        inits = [t for t in sim.model.graph.initializer if t.name in needed_constants]
        graph = helper.make_graph(nodes, f"local_{group.id}", inputs,
                                  [onnx.ValueInfoProto(name=o) for o in self.outputs], inits)
        for vi in graph.input:
            source = next((v for v in sim.model.graph.input if v.name == vi.name), None)
            if source is not None:
                vi.CopyFrom(source)
            else:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        model = helper.make_model(graph, opset_imports=list(sim.model.opset_import), ir_version=sim.model.ir_version)
        self.session = make_session(model, optimization="basic", log_errors_as=f"local model of group {group.id}")
        self.param_names = param_names

    def run(self, value: Feed, rng: tuple[float, float] | None) -> list[np.ndarray]:
        """The readers' outputs on one sample: fixed-point at ``rng``, or float when ``rng`` is None."""
        p = _params(self.group.params, rng or (0.0, 1.0), symmetric=self.symmetric, power_of_two=self.power_of_two)
        qt = qtype(p.qtype)
        values = (p.scale, p.zero_point, qt.qmin, qt.qmax)
        params = {name: np.array(v, np.float32) for name, v in zip(self.param_names, values, strict=False)}
        params[self.param_names[4]] = np.array(rng is not None)
        return self.session.run(list(self.outputs), {**{n: value[n] for n in self.feed_names}, **params})

    def error(self, rng: tuple[float, float], values: Sequence[Feed], targets: Sequence[list[np.ndarray]]) -> float:
        """E at ``rng`` against the readers' float outputs ``targets`` (one list per sample)."""
        total = 0.0
        noise = dict.fromkeys(self.outputs, 0.0)
        signal = dict.fromkeys(self.outputs, 0.0)
        for value, target in zip(values, targets, strict=True):
            got = self.run(value, rng)
            for name, out, t in zip(self.outputs, got, target, strict=True):
                ref = np.asarray(t, np.float32).reshape(-1)
                y = np.asarray(out, np.float32).reshape(-1)
                if self.objective == "cosine":
                    denom = float(np.linalg.norm(ref) * np.linalg.norm(y))
                    total += 1.0 - (float(ref @ y) / denom if denom else 1.0)
                else:
                    d = ref - y
                    noise[name] += float(d @ d)
                    signal[name] += float(ref @ ref)
        if self.objective == "cosine":
            return total / max(len(values), 1)
        return sum(noise[o] / signal[o] if signal[o] > 0 else noise[o] for o in self.outputs)


def _stacked(local: _LocalModel, values: Sequence[Feed]) -> list[Feed]:
    """The samples as one batch along axis 0 when the local model accepts it, else one feed each.

    Reference and candidates run on the same batch, so E stays a like-for-like comparison even
    where a reader mixes the batch (a Reshape); where a reader rejects it, samples run one by one.
    """
    if len(values) < 2:
        return list(values)
    batch: Feed = {}
    for name in local.feed_names:
        arrays = [np.asarray(v[name]) for v in values]
        if all(np.array_equal(a, arrays[0]) for a in arrays[1:]):
            batch[name] = arrays[0]  # the same in every sample (a computed constant): not a batch axis
        elif arrays[0].ndim and arrays[0].shape[0] == 1 and all(a.shape == arrays[0].shape for a in arrays):
            batch[name] = np.concatenate(arrays, axis=0)
        else:
            return list(values)
    try:
        local.run(batch, None)
    except Exception:
        return list(values)
    return [batch]


def _search(local: _LocalModel, values: Sequence[Feed], extent: tuple[float, float]) -> RangeChoice:
    """The range of least E for ``local``'s group (the calibrated one unless a candidate gains enough)."""
    from scipy.optimize import minimize_scalar  # imported here: scipy costs 0.4 s to import

    group = local.group
    values = _stacked(local, values)
    targets = [local.run(v, None) for v in values]
    lo_x, hi_x = min(extent[0], 0.0), max(extent[1], 0.0)
    cache: dict[tuple[float, float], float] = {}

    def error(lo: float, hi: float) -> float:
        key = (float(lo), float(hi))
        if key not in cache:
            cache[key] = local.error(key, values, targets)
        return cache[key]

    calibrated = tuple(group.params.range)
    before = error(*calibrated)
    if before < NEGLIGIBLE:
        return RangeChoice(group.id, (float(calibrated[0]), float(calibrated[1])), before, before, local.readers)
    best = min(((a * lo_x, a * hi_x) for a in GRID), key=lambda r: error(*r))
    alpha = best[1] / hi_x if hi_x > 0 else best[0] / lo_x
    step = REFINE_STEP
    bounds = (max(alpha - step, 0.01), min(alpha + step, 1.0))
    refined = minimize_scalar(lambda a: error(a * lo_x, a * hi_x), bounds=bounds, method="bounded",
                              options={"maxiter": SEARCH_STEPS, "xatol": 1e-3})
    lo, hi = refined.x * lo_x, refined.x * hi_x
    if error(lo, hi) > error(*best):
        lo, hi = best
    if hi > 0:  # each end alone
        top = minimize_scalar(lambda h: error(lo, h), bounds=(0.5 * hi, min(1.5 * hi, hi_x)), method="bounded",
                              options={"maxiter": SEARCH_STEPS, "xatol": 1e-3 * hi})
        hi = float(top.x) if error(lo, top.x) < error(lo, hi) else hi
    if lo < 0:
        bottom = minimize_scalar(lambda v: error(v, hi), bounds=(max(1.5 * lo, lo_x), 0.5 * lo), method="bounded",
                                 options={"maxiter": SEARCH_STEPS, "xatol": 1e-3 * -lo})
        lo = float(bottom.x) if error(bottom.x, hi) < error(lo, hi) else lo
    gain = error(lo, hi) < (1.0 - MIN_GAIN) * before
    chosen = (float(lo), float(hi)) if gain else (float(calibrated[0]), float(calibrated[1]))
    return RangeChoice(group.id, chosen, before, error(*chosen), local.readers)
