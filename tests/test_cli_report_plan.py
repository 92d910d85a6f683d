"""The command line, the demo, the report's three renderings and the plan's JSON round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import qnnlib
from qnnlib import cli
from qnnlib.plan import QuantPlan
from tests import builders


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "conv.onnx"
    onnx.save(builders.conv_net(), str(path))
    return path


@pytest.fixture(scope="module")
def result() -> qnnlib.QuantResult:
    model = builders.conv_net()
    return qnnlib.quantize(model, builders.calibration(model, 8))


def test_cli_quantize_with_npz(tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.stack([f["input"] for f in builders.calibration(builders.conv_net(), 8)]))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    status = cli.main(["quantize", str(model_file), str(out), "--calib", str(calib), "--report", str(report),
                       "--method", "minmax"])
    assert status == 0
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads(report.read_text())
    assert data["calibration"]["samples"] == 8 and data["calibration"]["method"] == "minmax"
    assert "QLinearConv" in capsys.readouterr().out


def test_cli_writes_the_integer_model(tmp_path: Path, model_file: Path) -> None:
    out, integer = tmp_path / "q.onnx", tmp_path / "q.int.onnx"
    assert cli.main(["quantize", str(model_file), str(out), "--integer", str(integer), "-q"]) == 0
    ops = {n.op_type for n in onnx.load(str(integer)).graph.node}
    assert ops & {"QLinearConv", "QGemm", "QLinearMatMul"}
    onnxruntime.InferenceSession(str(integer), providers=["CPUExecutionProvider"])


def test_cli_quantize_with_directory(tmp_path: Path, model_file: Path) -> None:
    calib = tmp_path / "samples"
    calib.mkdir()
    for i, f in enumerate(builders.calibration(builders.conv_net(), 4)):
        np.save(calib / f"{i:03d}.npy", f["input"])
    assert cli.main(["quantize", str(model_file), str(tmp_path / "q.onnx"), "--calib", str(calib), "-q"]) == 0


def test_cli_without_calibration_generates(tmp_path: Path, model_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["quantize", str(model_file), str(tmp_path / "q.onnx")]) == 0
    assert "GENERATED" in capsys.readouterr().out


def test_cli_errors_exit_2_with_a_message(tmp_path: Path, model_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 1, 3, 16, 16), np.float32), other=np.zeros(3))
    assert cli.main(["quantize", str(model_file), str(tmp_path / "q.onnx"), "--calib", str(bad)]) == 2
    assert "model's inputs are ['input']" in caplog.text
    assert cli.main(["quantize", str(tmp_path / "missing.onnx"), str(tmp_path / "q.onnx")]) == 2
    assert "does not exist" in caplog.text


def test_demo_runs_and_int8_keeps_accuracy() -> None:
    from qnnlib import demo

    outcome = demo.run()
    assert outcome.float_accuracy > 0.9
    assert outcome.int8_accuracy >= outcome.float_accuracy - 0.03
    assert outcome.result.report.fusion is not None and outcome.result.report.fusion.complete
    assert "held-out digits" in outcome.summary()


def test_installed_command_runs_demo() -> None:
    proc = subprocess.run([sys.executable, "-m", "qnnlib.cli", "demo"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "int8 accuracy" in proc.stdout


def test_report_renderings(result: qnnlib.QuantResult) -> None:
    report = result.report
    data = json.loads(report.to_json())
    assert data["qnnlib_version"] == qnnlib.__version__
    assert {"load", "calibrate", "plan", "emit", "verify", "evaluate"} <= set(data["timings"])
    assert data["requantizations_avoided"] == report.requantizations_avoided > 0
    layer = next(x for x in data["layers"] if x["op_type"] == "Conv")
    assert {"precision", "scale", "zero_point", "group", "sqnr_db"} <= set(layer)
    text = str(report)
    assert "tied groups" in text and "SQNR" in text
    html = report._repr_html_()
    assert html.startswith("<div>") and "<table>" in html and "Conv" in html
    assert result._repr_html_() == html


def test_report_groups_list_members_and_ties(result: qnnlib.QuantResult) -> None:
    concat = next(g for g in result.report.groups if any("Concat" in t for t in g.tied_by))
    assert concat.requantizations_avoided == len(concat.members) - 1 >= 2


def test_plan_json_round_trip(result: qnnlib.QuantResult) -> None:
    text = result.plan.to_json()
    again = QuantPlan.from_json(text)
    assert again == result.plan
    assert again.to_json() == text
    from qnnlib.emit.qdq import emit_qdq
    from qnnlib.graph.model_io import load_model
    from qnnlib.graph.normalize import normalize

    float_model = normalize(load_model(builders.conv_net())).model
    assert emit_qdq(float_model, again).model.SerializeToString() == result.model.SerializeToString()


def test_save_and_session(tmp_path: Path, result: qnnlib.QuantResult) -> None:
    path = tmp_path / "nested" / "m.onnx"
    result.save(path)
    assert onnx.load(str(path)) == result.model
    feed = builders.calibration(builders.conv_net(), 1)[0]
    assert result.session(threads=1).run(None, feed)[0].shape == (1, 10)
