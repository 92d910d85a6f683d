"""Load, check, normalise and select: what every entry point does to a model before calibrating it."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from qnnlib.calibration.feeds import GENERATED_SAMPLES, FeedSource, InputSpec, input_specs
from qnnlib.calibration.generate import generate_inputs
from qnnlib.config import QuantConfig
from qnnlib.errors import ConfigError, InvalidModelError
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import ModelLike, check_model, load_model
from qnnlib.graph.normalize import NormalizedModel, normalize
from qnnlib.graph.rules import ALREADY_QUANTISED_ADVICE
from qnnlib.graph.select import Selection, log_input_cones, match_excluded, select
from qnnlib.graph.tying import TiedGroup, narrow_ties, tie_groups
from qnnlib.plan import QuantPlan
from qnnlib.planner import build_plan

log = logging.getLogger(__name__)


class Timer:
    """Wall time per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Add the time spent inside the ``with`` block to ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PreparedModel:
    """The normalised float model and what selection made of it."""

    specs: tuple[InputSpec, ...]
    normalized: NormalizedModel
    index: GraphIndex
    selection: Selection
    groups: tuple[TiedGroup, ...]

    @property
    def float_model(self) -> onnx.ModelProto:
        """The normalised float model everything is planned on."""
        return self.normalized.model


def prepare(model: ModelLike, config: QuantConfig, timer: Timer) -> PreparedModel:
    """Load and check ``model`` (never modified), normalise it, select what is quantised, tie groups."""
    with timer("load"):
        proto = load_model(model)
        check_model(proto)
        specs = input_specs(proto)
    with timer("normalize"):
        normalized = normalize(proto, fold_batchnorm_nodes=config.fold_batchnorm)
    with timer("select"):
        index = GraphIndex(normalized.model)
        excluded = excluded_nodes(index, config)
        selection = select(index, excluded=excluded,
                           kept_float=log_input_cones(index) if config.float_log_inputs else None,
                           per_channel=config.per_channel and normalized.per_channel_ok)
        if selection.already_quantised:
            log.warning("the model is already quantised: %d nodes of its own quantisation or wrapped by it are "
                        "left as they are; %s", len(selection.already_quantised), ALREADY_QUANTISED_ADVICE)
        check_overrides(index, selection, config)
        check_weights(index, selection)
        groups = tie_groups(selection.activations, selection.ties)
    return PreparedModel(specs, normalized, index, selection, groups)


def retie(m: PreparedModel, ranges: Mapping[str, tuple[float, float]]) -> PreparedModel:
    """``m`` with the narrow Concat inputs untied (:func:`qnnlib.graph.tying.narrow_ties`) once ranges are known."""
    drop = set(narrow_ties(m.groups, ranges))
    if not drop:
        return m
    groups = tie_groups(m.selection.activations, [t for t in m.selection.ties if t not in drop])
    group_of = {member: g.id for g in groups for member in g.members}
    for tie in sorted(drop, key=lambda t: (t.node, t.a)):
        if group_of[tie.a] != group_of[tie.b]:  # another path may still tie them
            log.info("Concat %r: input %r keeps its own parameters (its range is under 1/16 of the Concat's "
                     "and another node reads it)", tie.node, tie.a)
    return replace(m, groups=groups)


def calibrated_plan(m: PreparedModel, ranges: Mapping[str, tuple[float, float]],
                    config: QuantConfig) -> tuple[PreparedModel, QuantPlan]:
    """``m`` re-tied by the calibrated ``ranges`` (:func:`retie`) and its plan: what every entry point plans first."""
    m = retie(m, ranges)
    return m, build_plan(m.index, m.selection, m.groups, ranges, config)


def open_feeds(m: PreparedModel, calib: Any, config: QuantConfig, timer: Timer, *, replay: int | None = None,
               holdout: int = 0) -> FeedSource:
    """The calibration feeds: ``calib`` validated, or for None inputs generated from what the model implies.

    Generated inputs are fitted to the model's BatchNormalization statistics where it has any
    (:mod:`qnnlib.calibration.generate`); the FeedSource's ``generation`` says how they were drawn.
    """
    if calib is not None:
        return FeedSource(calib, m.specs, max_samples=config.max_calibration_samples, replay=replay,
                          holdout=holdout)
    with timer("generate"):
        generated = generate_inputs(m.float_model, m.specs, GENERATED_SAMPLES, np.random.default_rng(config.seed),
                                    batchnorm=m.normalized.batchnorm, ranges=config.input_ranges)
    return FeedSource(generated.feeds, m.specs, max_samples=config.max_calibration_samples, replay=replay,
                      holdout=holdout, generation=generated.notes)


def excluded_nodes(index: GraphIndex, config: QuantConfig) -> set[str]:
    """Nodes ``config.exclude`` and ``exclude_op_types`` keep in float; ConfigError for a pattern matching none."""
    excluded, unmatched = match_excluded(index, config.exclude, config.exclude_op_types)
    if unmatched:
        names = [n.name for n in index.nodes]
        close = difflib.get_close_matches(unmatched[0], names, n=3)
        hint = f"; did you mean {close}?" if close else f"; nodes are named like {names[:3]}"
        raise ConfigError(f"exclude pattern {unmatched[0]!r} matches no node of the model{hint}")
    return excluded


def check_weights(index: GraphIndex, selection: Selection) -> None:
    """InvalidModelError for a constant to be quantised that holds NaN or inf, before any calibration.

    Weights and biases, and the constants quantised as activations (an Add's constant operand, an
    embedding table), whose range would otherwise come out NaN.
    """
    slots = [(slot.kind, slot.tensor, slot.node) for slot in selection.weights]
    slots += [("constant", t, index.consumers(t)[0].name) for t in selection.activations if index.is_constant(t)]
    for kind, tensor, node in slots:
        value = index.constant(tensor)
        if not np.isfinite(value).all():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise InvalidModelError(
                f"{kind} {tensor!r} of node {node!r} holds NaN or inf ({bad} of {value.size} values); "
                f"fix the model, or keep the node in float with QuantConfig(exclude=({node!r},))"
            )


def check_overrides(index: GraphIndex, selection: Selection, config: QuantConfig) -> None:
    """ConfigError for an override naming a tensor that does not exist or is not quantised."""
    quantized = set(selection.activations)
    for name in config.overrides:
        if name in quantized:
            continue
        known = index.producer(name) is not None or name in index.graph_inputs or index.is_constant(name)
        if known:
            raise ConfigError(
                f"override for tensor {name!r}: it is not quantised (no quantised layer reads or writes it); "
                "overrides apply to quantised activations"
            )
        close = difflib.get_close_matches(name, list(quantized), n=3)
        raise ConfigError(f"override for tensor {name!r}: the model has no such tensor" +
                          (f"; did you mean {close}?" if close else ""))
