"""Reading and writing models, and opening onnxruntime sessions on them.

Only this module and the emitters touch files and serialised protos.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError

from qnnlib.errors import InvalidModelError, ModelLoadError, SessionError, UnsupportedModelError, first_line
from qnnlib.graph.edit import add_outputs, with_outputs

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

#: Serialised protobufs cannot exceed 2 GiB; above this size weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Above this size a model goes to onnxruntime as a file with external data rather than as bytes.
SESSION_FILE_BYTES = 64_000_000


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


#: Initializers above this many bytes are left out of the model shape inference sees (their type and
#: shape stand in for them); small ones stay, since data propagation reads shape constants.
SKELETON_BYTES = 4096


def _without_initializers(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` but for its graph's initializers (outputs ``extra_outputs`` too): kilobytes to copy."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            if isinstance(value, (str, bytes, int)):
                setattr(light, field.name, value)
            else:
                getattr(light, field.name).extend(value)
    graph, out = model.graph, light.graph
    for field, value in graph.ListFields():
        if field.name in ("name", "doc_string"):
            setattr(out, field.name, value)
        elif field.name != "initializer":
            getattr(out, field.name).extend(value)
    add_outputs(out, extra_outputs)
    return light


def tensor_bytes(init: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, from its shape where the type allows (0 for external data).

    protobuf's ``ByteSize()`` serialises the message to measure it (upb), which costs as much as
    saving it and fails past 2 GiB.
    """
    if init.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if init.data_type in _WHOLE_BYTE_TYPES:
        return math.prod(init.dims) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return int(init.ByteSize())


def _is_large(init: onnx.TensorProto) -> bool:
    return tensor_bytes(init) > SKELETON_BYTES


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its large initializers, each replaced by a graph input of its type and shape.

    Shape inference and onnx.checker need only these; the copy costs kilobytes where the model may
    be gigabytes (a full copy, serialised to C++ and back, is four times the weights).
    """
    light = _without_initializers(model)
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if not _is_large(init):
            light.graph.initializer.append(init)
        elif init.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def write_with_external_data(model: onnx.ModelProto, path: Path, extra_outputs: Sequence[str] = ()) -> None:
    """Write ``model`` to ``path`` with every large raw-data initializer in ``<name>.data`` beside it.

    Each tensor's bytes are written straight from the model, which is neither copied nor changed
    (``onnx.save_model`` with external data edits the proto it is given, so it needs a full copy).
    ``extra_outputs`` are added to the written graph's outputs.
    """
    light = _without_initializers(model, extra_outputs)
    location = path.name + ".data"
    with open(path.parent / location, "wb") as data:
        for init in model.graph.initializer:
            if not (_is_large(init) and init.HasField("raw_data")):
                light.graph.initializer.append(init)
                continue
            raw = init.raw_data
            ref = light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                              data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", str(data.tell())), ("length", str(len(raw)))):
                ref.external_data.add(key=key, value=value)
            data.write(raw)
    path.write_bytes(light.SerializeToString())


#: Element types stored one per ``itemsize`` bytes in raw_data (not packed 4-bit, not strings).
_WHOLE_BYTE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})


def check_model(proto: onnx.ModelProto) -> None:
    """Run onnx.checker on the :func:`skeleton`, and check the size of each large initializer's data.

    Raises InvalidModelError with the checker's words and the fix.
    """
    if proto.ir_version < 3:
        raise UnsupportedModelError(
            f"the model has IR version {proto.ir_version}; qnnlib needs IR version 3 or later "
            "(re-export the model with a current exporter)"
        )
    for init in proto.graph.initializer:
        if _is_large(init) and init.HasField("raw_data") and init.data_type in _WHOLE_BYTE_TYPES:
            expected, stored = tensor_bytes(init), len(init.raw_data)  # raw_data is copied on each read
            if stored != expected:
                raise InvalidModelError(
                    f"initializer {init.name!r} has {stored} bytes of data where its shape "
                    f"{list(init.dims)} needs {expected}; the file is damaged or the exporter is wrong"
                )
    try:
        onnx.checker.check_model(skeleton(proto))
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InvalidModelError(
            f"the model is not valid ONNX: {first_line}. Fix the exporter output "
            "(onnx.checker.check_model shows the whole message)"
        ) from exc


def model_size(proto: onnx.ModelProto) -> int:
    """About the serialised size in bytes: the initializers' data and the nodes, without serialising the weights."""
    graph = proto.graph
    return sum(tensor_bytes(t) for t in graph.initializer) + sum(int(n.ByteSize()) for n in graph.node)


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Save ``proto`` to ``path``; weights go to ``<name>.data`` beside it when large or asked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_size(proto) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        write_with_external_data(proto, path)
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


def make_session(proto: onnx.ModelProto, *, outputs: Sequence[str] = (), threads: int | None = None,
                 optimization: str = "all", optimized_model_path: str | None = None,
                 custom_ops_library: str | None = None, log_errors_as: str = "model") -> ort.InferenceSession:
    """An onnxruntime CPU session on ``proto``, which also outputs ``outputs``; its errors become SessionError.

    ``custom_ops_library``: a shared library of custom ops to register first (onnxruntime-extensions').

    A model over :data:`SESSION_FILE_BYTES` reaches onnxruntime as a file with external data in a
    temp directory, so that neither a copy of the model nor its serialised bytes are held in memory.
    """
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
    if custom_ops_library is not None:
        options.register_custom_ops_library(custom_ops_library)
    try:
        if model_size(proto) > SESSION_FILE_BYTES:
            with temporary_directory() as tmp:
                path = tmp / "model.onnx"
                write_with_external_data(proto, path, outputs)
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        probe = with_outputs(proto, outputs) if outputs else proto
        return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SessionError(f"onnxruntime could not load the {log_errors_as}: {first_line(exc)}"
                           + _custom_op_hint(proto) + _ir_version_hint(str(exc), proto)) from exc


def _ir_version_hint(message: str, proto: onnx.ModelProto) -> str:
    """When onnxruntime refuses the model's IR version: the versions and the fix."""
    found = re.search(r"max supported IR version: (\d+)", message)
    if found is None:
        return ""
    return (f". The model declares IR version {proto.ir_version} and this onnxruntime reads up to "
            f"{found.group(1)} (onnx.helper.make_model writes the newest onnx knows): set "
            f"model.ir_version = {found.group(1)} if the model uses nothing newer, or upgrade onnxruntime")


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
