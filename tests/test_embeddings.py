"""Embedding tables: a Gather from a constant table joins its output's tied group and is stored quantised."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qnnlib
from qnnlib.calibration.collect import collect
from qnnlib.calibration.feeds import FeedSource
from qnnlib.config import QuantConfig
from qnnlib.coprocessor import InferenceSession
from qnnlib.emit.qdq import emit_qdq
from qnnlib.errors import InvalidModelError
from qnnlib.graph.model_io import make_session, temporary_directory
from qnnlib.mixed import plan_with_precisions
from qnnlib.planner import build_plan
from qnnlib.prepare import Timer, prepare
from qnnlib.threshold import output_metric
from tests import builders

VOCAB, DIM = 500, 32
TABLE_TYPES = {"int4": onnx.TensorProto.UINT4, "int8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.UINT16,
               "float": onnx.TensorProto.FLOAT}


def _tables(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if tuple(i.dims) == (VOCAB, DIM)}


def _sqnr(reference: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    want, got = make_session(reference), make_session(model)
    return output_metric("sqnr", [want.run(None, f) for f in feeds], [got.run(None, f) for f in feeds])


def test_an_embedding_table_is_stored_quantised_and_gathered_as_integers() -> None:
    model = builders.embedding_encoder()
    before = model.SerializeToString()
    result = qnnlib.quantize(model, builders.token_ids(model))
    assert model.SerializeToString() == before
    tables = _tables(result.model)
    assert [t.data_type for t in tables.values()] == [onnx.TensorProto.UINT8]
    assert len(result.model.SerializeToString()) < 0.4 * len(before)
    gather = next(layer for layer in result.report.layers if layer.op_type == "Gather")
    assert gather.precision == "int8"
    with temporary_directory() as tmp:  # onnxruntime drops the Q/DQ pair and gathers from the uint8 table
        make_session(result.model, optimized_model_path=str(tmp / "optimized.onnx"))
        optimized = onnx.load(str(tmp / "optimized.onnx"))
    gathers = [n for n in optimized.graph.node if n.op_type == "Gather"]
    initializers = {i.name: i for i in optimized.graph.initializer}
    assert len(gathers) == 1 and initializers[gathers[0].input[0]].data_type == onnx.TensorProto.UINT8
    assert _sqnr(model, result.model, builders.token_ids(model, 8, seed=7)) > 30


def test_a_table_shared_with_a_gemm_weight_serves_both() -> None:
    """The Gather reads the table per tensor on its group's grid, the tied output head per channel."""
    model = builders.embedding_encoder(tied_head=True)
    result = qnnlib.quantize(model, builders.token_ids(model))
    types = sorted(t.data_type for t in _tables(result.model).values())
    assert types == sorted([onnx.TensorProto.INT8, onnx.TensorProto.UINT8])
    assert _sqnr(model, result.model, builders.token_ids(model, 8, seed=7)) > 30


@pytest.mark.parametrize("precision", ["int4", "int8", "int16", "float"])
def test_an_embedding_group_at_every_precision_loads_and_runs(precision: str) -> None:
    model = builders.embedding_encoder()
    config = QuantConfig(optimize=False)
    calib = builders.token_ids(model, 8)
    m = prepare(model, config, Timer())
    with FeedSource(calib, m.specs) as feeds:
        stats = collect(m.float_model, m.selection.observed(m.index), feeds, config.calibration, levels=256,
                        symmetric=False, low_bit_levels=16, constants=m.selection.constants(m.index))
    base = build_plan(m.index, m.selection, m.groups, stats.ranges, config)
    table_group = next(g.id for g in base.groups if any(m.index.is_constant(t) and m.index.shape(t) == (VOCAB, DIM)
                                                         for t in g.members))
    plan = plan_with_precisions(m, base, stats, config, {table_group: precision})
    emitted = emit_qdq(m.float_model, plan).model
    assert [t.data_type for t in _tables(emitted).values()] == [TABLE_TYPES[precision]]
    sqnr = _sqnr(m.float_model, emitted, calib)  # default optimisation: what a user's session does
    assert sqnr > {"int4": 15, "int8": 30, "int16": 30, "float": 30}[precision], sqnr


def test_the_analysis_prices_and_probes_the_table() -> None:
    model = builders.embedding_encoder()
    report = qnnlib.analyze_sensitivity(model, builders.token_ids(model), progress=False)
    group = next(g for g in report.groups if any(t.startswith("table") for t in g.members))
    assert group.weights >= VOCAB * DIM
    assert group.only_error["int4"] > group.only_error["int8"] > group.only_error["int16"] > 0


def test_the_integer_model_gathers_from_the_integer_table() -> None:
    model = builders.embedding_encoder()
    result = qnnlib.quantize(model, builders.token_ids(model))
    integer = result.integer_model()
    initializers = {i.name: i for i in integer.graph.initializer}
    gather = next(n for n in integer.graph.node if n.op_type == "Gather")
    assert initializers[gather.input[0]].data_type == onnx.TensorProto.UINT8
    feeds = builders.token_ids(model, 2, seed=5)
    qdq, ints = make_session(result.model), make_session(integer)
    session = InferenceSession(integer)
    for feed in feeds:
        want = qdq.run(None, feed)
        for got in (ints.run(None, feed), session.run(None, feed)):
            assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    # the Gather falls back to onnxruntime; everything else but the float-output Reshape is claimed, the
    # Reshape after the Relu's lookup table included (its integer type comes from the table)
    on_cpu = [n for n, place in session.placement().items() if place == "CPUExecutionProvider"]
    assert on_cpu == [gather.name, integer.graph.node[-1].name]


def test_a_table_holding_nan_is_refused_before_calibration() -> None:
    model = builders.embedding_encoder()
    table = next(i for i in model.graph.initializer if i.name.startswith("table"))
    values = numpy_helper.to_array(table).copy()
    values[3, 4] = np.nan
    table.CopyFrom(numpy_helper.from_array(values, table.name))
    with pytest.raises(InvalidModelError, match=r"constant 'table1' of node 'Gather3' holds NaN or inf \(1 of"):
        qnnlib.quantize(model, builders.token_ids(model))
