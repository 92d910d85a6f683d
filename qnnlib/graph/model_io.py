"""Reading and writing models, and opening onnxruntime sessions on them.

Only this module and the emitters touch files and serialised protos.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError

from qnnlib.errors import InvalidModelError, ModelLoadError, SessionError, UnsupportedModelError, first_line

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

#: Serialised protobufs cannot exceed 2 GiB; above this size weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Return a private copy of ``model`` with all external data loaded; the input is untouched."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _require_inline_data(copy, "the ModelProto you passed")
        return copy
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"the bytes given are not an ONNX model ({exc}); pass the bytes of a .onnx file"
            ) from exc
        _require_inline_data(proto, "the bytes you passed")
        return proto
    if isinstance(model, (str, os.PathLike)):
        return _load_path(Path(model))
    raise ModelLoadError(
        f"cannot read a model from a {type(model).__name__}; pass a path, bytes or an onnx.ModelProto"
    )


def _load_path(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a readable ONNX model (corrupt or truncated file?): {exc}"
        ) from exc
    if proto.graph is None or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{str(path)!r} parsed as an empty model: it is probably not an ONNX file")
    base = path.parent
    for tensor in _external_tensors(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (base / location).is_file():
            raise ModelLoadError(
                f"initializer {tensor.name!r} keeps its data in external file {location!r}, which is "
                f"missing next to {str(path)!r}; copy that file beside the model"
            )
    external = list(_external_tensors(proto))
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read the external data of {str(path)!r}: {exc}") from exc
    for tensor in external:  # the loader leaves data_location=DEFAULT set explicitly; serialise as inline
        tensor.ClearField("data_location")
    return proto


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _require_inline_data(proto: onnx.ModelProto, what: str) -> None:
    missing = [t.name for t in _external_tensors(proto)]
    if missing:
        raise ModelLoadError(
            f"{what} refers to external data (initializer {missing[0]!r} and {len(missing) - 1} more) that is "
            "not loaded; pass the model's path instead, or load it with onnx.load(path) first"
        )


def check_model(proto: onnx.ModelProto) -> None:
    """Run onnx.checker; raise InvalidModelError with its words and the fix."""
    if proto.ir_version < 3:
        raise UnsupportedModelError(
            f"the model has IR version {proto.ir_version}; qnnlib needs IR version 3 or later "
            "(re-export the model with a current exporter)"
        )
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        log.info("model over %d bytes: structural check only", EXTERNAL_DATA_THRESHOLD)
        return
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InvalidModelError(
            f"the model is not valid ONNX: {first_line}. Fix the exporter output "
            "(onnx.checker.check_model shows the whole message)"
        ) from exc


def model_size(proto: onnx.ModelProto) -> int:
    """Serialised size in bytes, without serialising huge models twice."""
    return int(proto.ByteSize())


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Save ``proto`` to ``path``; weights go to ``<name>.data`` beside it when large or asked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_size(proto) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        location = path.name + ".data"
        data_path = path.parent / location
        if data_path.exists():
            data_path.unlink()
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


@contextmanager
def temporary_directory(prefix: str = "qnnlib-") -> Iterator[Path]:
    """A directory in the system temp dir, removed on exit even after an error."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_session(proto: onnx.ModelProto, *, threads: int | None = None, optimization: str = "all",
                 optimized_model_path: str | None = None, log_errors_as: str = "model") -> ort.InferenceSession:
    """An onnxruntime CPU session on ``proto``; onnxruntime errors become SessionError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the caller as SessionError; no duplicate stderr lines
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    try:
        if model_size(proto) > EXTERNAL_DATA_THRESHOLD:
            with temporary_directory() as tmp:
                path = tmp / "model.onnx"
                save_model(proto, path, external_data=True)
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SessionError(f"onnxruntime could not load the {log_errors_as}: {first_line(exc)}"
                           + _custom_op_hint(proto)) from exc


#: Op domains onnxruntime's CPU provider implements without extra libraries.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"})


def _custom_op_hint(proto: onnx.ModelProto) -> str:
    """Name the nodes of domains onnxruntime does not know, with the fix."""
    custom = [n for n in proto.graph.node if n.domain not in KNOWN_DOMAINS]
    if not custom:
        return ""
    node = custom[0]
    return (f". Node {node.name!r} ({node.domain}::{node.op_type}) and {len(custom) - 1} more are custom ops; "
            "onnxruntime needs their library to run the model for calibration: register it "
            "(SessionOptions.register_custom_ops_library) before quantising, or replace those nodes")
