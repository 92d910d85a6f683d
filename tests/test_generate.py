"""Generated calibration data: priors implied by the graph, fitted to BatchNormalization statistics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qnnlib
from qnnlib.calibration.feeds import input_specs
from qnnlib.calibration.generate import FIT_MIN_EVALUATIONS, fit_evaluations, generate_inputs
from qnnlib.errors import ConfigError
from qnnlib.graph.index import GraphIndex, model_macs
from qnnlib.graph.passes.batchnorm import batchnorm_statistics
from tests import builders
from tests.builders import GraphBuilder


def _image(name: str = "x", elem: int = TensorProto.FLOAT, size: int = 16) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [1, 3, size, size])


def _bn_model(data_mean: float, data_std: float, seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv -> BatchNormalization, with the BN statistics of the
    training data ``x ~ data_mean + data_std * smooth noise`` (channels shared)."""
    b = GraphBuilder(seed)
    rng = np.random.default_rng(seed + 1)
    smooth = rng.standard_normal((64, 1, 20, 20)).cumsum(axis=2).cumsum(axis=3)[:, :, 2:18, 2:18]
    smooth = (smooth - smooth.mean()) / smooth.std()
    train = (data_mean + data_std * (np.repeat(smooth, 3, axis=1) + 0.3 * rng.standard_normal((64, 3, 16, 16))))
    train = train.astype(np.float32)
    x, stages = "x", []
    for c_in, c_out in ((3, 8), (8, 8)):
        y = b.conv(x, c_in, c_out, relu=False)
        stages.append((y, c_out))
        x = b.op("Relu", [b.op("BatchNormalization", [y, *(b.const(np.zeros(c_out, np.float32)) for _ in range(4))],
                               epsilon=1e-5)])
    model = b.model([_image()], [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 16, 16])])
    # fill gamma=1, beta=0 and the running statistics from the conv outputs on the training data, layer by layer
    inits = {t.name: t for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for bn, (y, _) in zip(bns, stages, strict=True):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(onnx.ValueInfoProto(name=y))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = np.concatenate([session.run([y], {"x": t[None]})[0] for t in train])
        mean, var = values.mean(axis=(0, 2, 3)), values.var(axis=(0, 2, 3))
        for name, value in zip(bn.input[1:5], (np.ones_like(mean), np.zeros_like(mean), mean, var), strict=True):
            inits[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    return model


def test_batchnorm_statistics_are_beta_and_gamma() -> None:
    b = GraphBuilder()
    gamma, beta = np.array([2.0, -0.5], np.float32), np.array([1.0, 3.0], np.float32)
    var = np.array([4.0, 1e-6], np.float32)
    y = b.op("BatchNormalization", ["x", b.const(gamma), b.const(beta), b.const(np.zeros(2, np.float32)),
                                    b.const(var)], epsilon=1e-5)
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                    [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 2, 4, 4])])
    (stats,) = batchnorm_statistics(model)
    assert stats.tensor == y
    np.testing.assert_allclose(stats.mean, beta)
    np.testing.assert_allclose(stats.std, np.abs(gamma) * np.sqrt(var / (var + 1e-5)), rtol=1e-6)


@pytest.mark.parametrize(("data_mean", "data_std"), [(3.0, 2.0), (-0.5, 0.25)])
def test_fit_recovers_the_training_data_scale(data_mean: float, data_std: float) -> None:
    model = _bn_model(data_mean, data_std)
    stats = batchnorm_statistics(model)
    generated = generate_inputs(model, input_specs(model), 8, np.random.default_rng(0), batchnorm=stats)
    x = np.concatenate([f["x"] for f in generated.feeds])
    assert abs(x.mean() - data_mean) < 0.35 * data_std
    assert 0.6 < x.std() / data_std < 1.6
    assert "fitted to the statistics of 2 BatchNormalization layers" in generated.notes[-1]


def test_quantize_generated_data_fits_batchnorm_and_says_so() -> None:
    model = _bn_model(3.0, 2.0)
    result = qnnlib.quantize(model, None)
    generation = result.report.calibration.generation
    assert any("fitted to BatchNormalization statistics" in line for line in generation)
    assert "generated x:" in result.report.to_text()
    # better than the declared-shape guess (standard normal) on data like the training data
    rng = np.random.default_rng(5)
    feeds = [{"x": (3.0 + 2.0 * rng.standard_normal((1, 3, 16, 16))).astype(np.float32)} for _ in range(4)]
    naive = qnnlib.quantize(model, generate_inputs(model, input_specs(model), 16, np.random.default_rng(0)).feeds)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def error(r: qnnlib.QuantResult) -> float:
        session = r.session()
        return float(sum(np.mean((session.run(None, f)[0] - reference.run(None, f)[0]) ** 2) for f in feeds))

    assert error(result) < error(naive)


def test_leading_normalisation_implies_the_input_scale() -> None:
    b = GraphBuilder()
    mean = np.array([100.0, 120.0, 140.0], np.float32).reshape(1, 3, 1, 1)
    std = np.array([50.0, 60.0, 70.0], np.float32).reshape(1, 3, 1, 1)
    y = b.conv(b.op("Div", [b.op("Sub", ["x", b.const(mean)]), b.const(std)]), 3, 4)
    model = b.model([_image()], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 16, 16])])
    generated = generate_inputs(model, input_specs(model), 16, np.random.default_rng(0))
    x = np.concatenate([f["x"] for f in generated.feeds])
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), mean.ravel(), rtol=0.1)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), std.ravel(), rtol=0.25)
    assert "normalisation at node" in generated.notes[0]


def test_scaling_alone_implies_a_range() -> None:
    b = GraphBuilder()
    y = b.conv(b.op("Div", ["x", b.const(np.array(255.0, np.float32))]), 3, 4)
    model = b.model([_image()], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 16, 16])])
    x = np.concatenate([f["x"] for f in generate_inputs(model, input_specs(model), 8,
                                                          np.random.default_rng(0)).feeds])
    assert x.min() >= 0.0 and x.max() <= 255.0 and x.max() > 200.0


def test_embedding_indices_cover_the_table() -> None:
    b = GraphBuilder()
    table = b.const(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    y = b.op("Gather", [table, "ids"])
    model = b.model([helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 32]),
                     helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 32])],
                    [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 32, 8]),
                     helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 32])])
    feeds = generate_inputs(model, input_specs(model), 8, np.random.default_rng(0)).feeds
    ids = np.concatenate([f["ids"] for f in feeds])
    assert ids.min() >= 0 and ids.max() == 49
    assert all((f["attention_mask"] == 1).all() for f in feeds)


def test_input_ranges_shape_generated_data_and_are_checked() -> None:
    b = GraphBuilder()
    y = b.conv("x", 3, 4)
    model = b.model([_image()], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 16, 16])])
    result = qnnlib.quantize(model, None, config=qnnlib.QuantConfig(input_ranges={"x": (0, 255)}))
    assert "stated range [0, 255]" in result.report.calibration.generation[0]
    assert result.report.groups[0].range[1] > 100.0
    with pytest.raises(ConfigError, match=r"'image'.*not a model input"):
        qnnlib.quantize(model, None, config=qnnlib.QuantConfig(input_ranges={"image": (0, 1)}))
    with pytest.raises(ConfigError, match="low < high"):
        qnnlib.QuantConfig(input_ranges={"x": (1, 0)})
    with pytest.raises(ConfigError, match="pair"):
        qnnlib.QuantConfig(input_ranges={"x": "0-255"})


def test_generation_is_deterministic() -> None:
    model = _bn_model(1.0, 0.5)
    first = qnnlib.quantize(model, None).model.SerializeToString()
    assert qnnlib.quantize(model, None).model.SerializeToString() == first


def test_model_macs_counts_weights_times_positions() -> None:
    b = GraphBuilder()
    y = b.conv("x", 3, 8, k=3)  # 8*3*3*3 weights over 16x16 positions
    z = b.op("Flatten", [y])
    b.op("MatMul", [z, b.const(np.zeros((8 * 16 * 16, 10), np.float32))])  # type: ignore[list-item]
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                    [helper.make_tensor_value_info(b.nodes[-1].output[0], TensorProto.FLOAT, [1, 10])])
    model = onnx.shape_inference.infer_shapes(model)
    assert model_macs(GraphIndex(model)) == 8 * 3 * 3 * 3 * 16 * 16 + 8 * 16 * 16 * 10


def test_the_fit_spends_less_on_large_models() -> None:
    """Small models keep the whole budget (so their generated data is unchanged); large ones get less."""
    small = model_macs(GraphIndex(onnx.shape_inference.infer_shapes(builders.conv_net())))
    assert fit_evaluations(4, small) == FIT_MIN_EVALUATIONS + 30 * 4
    budgets = [fit_evaluations(4, macs) for macs in (10**8, 10**9, 3 * 10**9, 10**11)]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == FIT_MIN_EVALUATIONS + 30 * 4 and budgets[-1] == FIT_MIN_EVALUATIONS
