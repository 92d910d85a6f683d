"""Every bad input gets a typed qnnlib error that names the culprit and says how to fix it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnlib
from tests import builders


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return builders.conv_net()


def good_feed() -> dict[str, np.ndarray]:
    return {"input": np.zeros((1, 3, 16, 16), np.float32)}


# -- unreadable or invalid models -----------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(qnnlib.ModelLoadError, match="does not exist"):
        qnnlib.quantize(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(qnnlib.ModelLoadError, match="corrupt"):
        qnnlib.quantize(path)


def test_truncated_file(tmp_path: Path, model: onnx.ModelProto) -> None:
    path = tmp_path / "truncated.onnx"
    path.write_bytes(model.SerializeToString()[:500])
    with pytest.raises(qnnlib.ModelLoadError):
        qnnlib.quantize(path)


def test_bytes_that_are_not_a_model() -> None:
    with pytest.raises(qnnlib.ModelLoadError, match="not an ONNX model"):
        qnnlib.quantize(b"\x00\x01\x02 garbage \xff" * 7)


def test_wrong_object_type() -> None:
    with pytest.raises(qnnlib.ModelLoadError, match="cannot read a model from a int"):
        qnnlib.quantize(42)  # type: ignore[arg-type]


def test_invalid_model_names_the_problem() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])  # z never produced
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(qnnlib.InvalidModelError, match="not valid ONNX"):
        qnnlib.quantize(bad, [{"x": np.ones(2, np.float32)}])


def test_missing_external_data_file(tmp_path: Path, model: onnx.ModelProto) -> None:
    path = tmp_path / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save(copy, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(qnnlib.ModelLoadError, match=r"weights\.bin"):
        qnnlib.quantize(path)


# -- opsets -------------------------------------------------------------------------------------------
def test_too_new_opset(model: onnx.ModelProto) -> None:
    newer = onnx.ModelProto()
    newer.CopyFrom(model)
    newer.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    with pytest.raises(qnnlib.UnsupportedModelError, match="newer than"):
        qnnlib.quantize(newer, [good_feed()])


def test_missing_default_opset(model: onnx.ModelProto) -> None:
    odd = onnx.ModelProto()
    odd.CopyFrom(model)
    del odd.opset_import[:]
    odd.opset_import.add(domain="com.example", version=1)
    with pytest.raises(qnnlib.QnnlibError):
        qnnlib.quantize(odd, [good_feed()])


# -- calibration data -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("feed", "match"),
    [
        ({"inptu": np.zeros((1, 3, 16, 16), np.float32)}, "'inptu', which the model does not have"),
        ({}, "lacks input 'input'"),
        ({"input": np.zeros((1, 3, 8, 8), np.float32)}, r"shape \[1, 3, 8, 8\].*declares"),
        ({"input": np.zeros((1, 3, 16, 16), np.float64)}, r"dtype float64.*astype\(np.float32\)"),
        ({"input": np.full((1, 3, 16, 16), np.nan, np.float32)}, "NaN or inf"),
        ({"input": np.full((1, 3, 16, 16), np.inf, np.float32)}, "NaN or inf"),
        ("not a feed", "give a dict"),
    ],
    ids=["wrong-name", "missing-name", "wrong-shape", "wrong-dtype", "nan", "inf", "not-a-dict"],
)
def test_bad_calibration_feed(model: onnx.ModelProto, feed: object, match: str) -> None:
    with pytest.raises(qnnlib.CalibrationDataError, match=match):
        qnnlib.quantize(model, [good_feed(), feed])


def test_bad_feed_names_the_sample(model: onnx.ModelProto) -> None:
    feeds = [good_feed(), good_feed(), {"input": np.full((1, 3, 16, 16), np.nan, np.float32)}]
    with pytest.raises(qnnlib.CalibrationDataError, match="sample 2"):
        qnnlib.quantize(model, iter(feeds))


@pytest.mark.parametrize("empty", [[], iter([]), np.zeros((0, 1, 3, 16, 16), np.float32)],
                         ids=["list", "iterator", "array"])
def test_empty_calibration(model: onnx.ModelProto, empty: object) -> None:
    with pytest.raises(qnnlib.EmptyCalibrationError, match="no sample"):
        qnnlib.quantize(model, empty)


def test_calibration_of_unreadable_type(model: onnx.ModelProto) -> None:
    with pytest.raises(qnnlib.CalibrationDataError, match="cannot read calibration data from a int"):
        qnnlib.quantize(model, 7)


def test_ndarray_for_multi_input_model() -> None:
    b = builders.GraphBuilder()
    b.op("Add", ["a", "b"])
    b.nodes[-1].output[0] = "y"
    two = b.model([helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(qnnlib.CalibrationDataError, match="single-input"):
        qnnlib.quantize(two, np.zeros((4, 2), np.float32))


# -- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation_type": "int4"}, "activation_type must be one of"),
        ({"activation_symmetric": True}, "needs a signed type"),
        ({"weight_type": "uint8"}, "weight_type must be one of"),
        ({"method": "kl"}, "unknown calibration method 'kl'"),
        ({"method": 3}, "method must be a name"),
        ({"exclude": ("a", 1)}, "exclude must be a tuple of strings"),
        ({"max_calibration_samples": 0}, "max_calibration_samples"),
        ({"report_samples": -1}, "report_samples"),
        ({"overrides": {"t": (0, 1)}}, r"overrides\['t'\] must be a TensorOverride"),
        ({"power_of_two_scales": True, "overrides": {"t": qnnlib.TensorOverride(scale=0.1, zero_point=0)}},
         r"overrides\['t'\]\.scale = 0\.1 is not a power of two.*scale=0\.125"),
    ],
)
def test_invalid_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(qnnlib.ConfigError, match=match):
        qnnlib.QuantConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"range": (1.0, 0.0)}, "lo <= hi"),
        ({"range": (0.0, float("nan"))}, "finite"),
        ({"scale": 0.1}, "go together"),
        ({"scale": -1.0, "zero_point": 0}, "positive"),
        ({}, "needs range"),
        ({"range": (0.0, 1.0), "scale": 0.1, "zero_point": 0}, "not both"),
    ],
)
def test_invalid_override(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(qnnlib.ConfigError, match=match):
        qnnlib.TensorOverride(**kwargs)  # type: ignore[arg-type]


def test_config_must_be_a_quantconfig(model: onnx.ModelProto) -> None:
    with pytest.raises(qnnlib.ConfigError, match=r"must be a qnnlib\.QuantConfig"):
        qnnlib.quantize(model, [good_feed()], config={"method": "minmax"})  # type: ignore[arg-type]


def test_exclude_pattern_matching_nothing_suggests_names(model: onnx.ModelProto) -> None:
    name = next(n.name for n in model.graph.node if n.op_type == "Conv")
    typo = name + "x"
    with pytest.raises(qnnlib.ConfigError, match=f"'{typo}' matches no node.*did you mean"):
        qnnlib.quantize(model, [good_feed()], config=qnnlib.QuantConfig(exclude=(typo,)))


def test_override_of_unknown_tensor(model: onnx.ModelProto) -> None:
    config = qnnlib.QuantConfig(overrides={"no_such_tensor": qnnlib.TensorOverride(range=(0, 1))})
    with pytest.raises(qnnlib.ConfigError, match="no such tensor"):
        qnnlib.quantize(model, [good_feed()], config=config)


def test_override_of_tensor_that_is_not_quantised(model: onnx.ModelProto) -> None:
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    config = qnnlib.QuantConfig(overrides={gemm.output[0]: qnnlib.TensorOverride(range=(0, 1))})
    with pytest.raises(qnnlib.ConfigError, match="not quantised"):
        qnnlib.quantize(model, [good_feed()], config=config)


def test_conflicting_overrides_in_one_group(model: onnx.ModelProto) -> None:
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    config = qnnlib.QuantConfig(overrides={concat.input[0]: qnnlib.TensorOverride(range=(0, 1)),
                                           concat.output[0]: qnnlib.TensorOverride(range=(0, 2))})
    with pytest.raises(qnnlib.ConfigError, match="tied"):
        qnnlib.quantize(model, [good_feed()], config=config)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weights_with_nan_or_inf_name_the_node_before_calibration(bad: float) -> None:
    model = builders.conv_net()
    first_weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(first_weight).copy()
    values.flat[0] = bad
    first_weight.CopyFrom(onnx.numpy_helper.from_array(values, first_weight.name))

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        raise AssertionError("calibration data was read before the weights were checked")
        yield good_feed()

    expected = f"weight '{first_weight.name}' of node 'Conv.*NaN or inf.*exclude"
    with pytest.raises(qnnlib.InvalidModelError, match=expected):
        qnnlib.quantize(model, feeds())


def test_every_error_is_a_qnnlib_error() -> None:
    for cls in (qnnlib.ConfigError, qnnlib.ModelLoadError, qnnlib.InvalidModelError, qnnlib.UnsupportedModelError,
                qnnlib.CalibrationDataError, qnnlib.EmptyCalibrationError, qnnlib.SessionError, qnnlib.InternalError):
        assert issubclass(cls, qnnlib.QnnlibError)


def test_unknown_custom_op_names_the_node() -> None:
    b = builders.GraphBuilder()
    c = b.conv("x", 3, 4)
    b.nodes.append(helper.make_node("Mystery", [c], ["y"], name="mystery_node", domain="com.example"))
    graph = helper.make_graph(b.nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              ir_version=8)
    with pytest.raises(qnnlib.SessionError, match=r"'mystery_node' \(com\.example::Mystery\).*register"):
        qnnlib.quantize(model, None)


def test_an_ir_version_onnxruntime_cannot_read_names_both_versions_and_the_fix() -> None:
    import onnxruntime as ort

    model = builders.mlp()
    model.ir_version = onnx.IR_VERSION  # the newest onnx writes, as onnx.helper.make_model does
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip("this onnxruntime reads onnx's newest IR version")
    except Exception:  # onnxruntime's own exception types
        pass
    with pytest.raises(qnnlib.SessionError,
                       match=rf"IR version {onnx.IR_VERSION} .* reads up to \d+.*model\.ir_version = \d+"):
        qnnlib.quantize(model, builders.calibration(model, 4))
