"""The coprocessor inside a real onnxruntime session, through onnxruntime-extensions Python ops.

Needs the ``extensions`` extra (``pip install "qnnlib[extensions]"``). :class:`ExtensionsSession`
cuts the model as :class:`qnnlib.coprocessor.InferenceSession` does, then writes each segment the
coprocessor claims as one node of the custom domain ``ai.onnx.contrib``; a Python op runs that
segment's compiled integer kernels. Every other node stays an ordinary node of the same
onnxruntime session, so onnxruntime schedules the whole model, as it would with an execution
provider for a real coprocessor.

Three pitfalls of onnxruntime-extensions (DESIGN.md section 9) are handled:

* its default output hook turns each output into a Python list: 55 ms for a 0.8 MB tensor on the
  development machine. :func:`_hook` hands the arrays back instead (0.55 ms);
* defining a Python op after a session exists crashes that session. All ops are defined once, on
  the first use, before qnnlib's first session: one per arity (``QnnlibSegment_<n>_<m>``, up to
  :data:`MAX_INPUTS` inputs and :data:`MAX_OUTPUTS` outputs), every tensor float32, so no later
  model needs a new definition. 8-bit tensors cross the border through Cast nodes (exact);
* an exception inside a Python op aborts the process. The op catches it and returns zeros, and
  :meth:`ExtensionsSession.run` raises :class:`~qnnlib.errors.SessionError` with it once
  onnxruntime returns.

The hook is process-wide: it replaces onnxruntime-extensions' own, and serves every Python op
the same way (arrays instead of lists).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qnnlib.coprocessor.session import COPROCESSOR, CPU, InferenceSession, NodeArg
from qnnlib.errors import ConfigError, SessionError, UnsupportedModelError
from qnnlib.graph.edit import drop_stale_value_info, drop_unused_initializers, ensure_opset, replace_nodes
from qnnlib.graph.model_io import ModelLike, make_session
from qnnlib.graph.names import NameAllocator

log = logging.getLogger(__name__)

#: onnxruntime-extensions' domain for Python ops.
DOMAIN = "ai.onnx.contrib"
#: The largest segment interface with an op defined for it.
MAX_INPUTS, MAX_OUTPUTS = 32, 16
#: Element types that cross the border as float32 exactly.
_EXACT_IN_FLOAT = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
                             onnx.TensorProto.UINT16, onnx.TensorProto.INT16})

_lock = threading.Lock()
#: Set once every op is defined and the hook installed.
_defined = threading.Event()
_runners: dict[str, Callable[[Sequence[np.ndarray]], list[np.ndarray]]] = {}
_failures: dict[str, BaseException] = {}
_keys = itertools.count()


def op_type(inputs: int, outputs: int) -> str:
    """The Python op that runs a segment with ``inputs`` inputs and ``outputs`` outputs."""
    return f"QnnlibSegment_{inputs}_{outputs}"


def _extensions() -> Any:
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise ConfigError("the onnxruntime-extensions path needs the extra: pip install 'qnnlib[extensions]'; "
                          "qnnlib.coprocessor.InferenceSession runs the same kernels without it") from exc
    return onnxruntime_extensions


def _run(key: str, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The body of every segment op: the segment's kernels, exceptions kept for :meth:`ExtensionsSession.run`."""
    runner = _runners.get(key)
    try:
        if runner is None:
            raise SessionError(f"segment {key!r} belongs to a session that no longer exists")
        return tuple(np.ascontiguousarray(o, np.float32) for o in runner(inputs))
    except BaseException as exc:  # an exception escaping a Python op aborts the process
        _failures.setdefault(key, exc)
        count = int(key.rsplit(":", 1)[1]) if ":" in key else 1
        return tuple(np.zeros(1, np.float32) for _ in range(count))


def _hook(op_id: int, feed: Sequence[np.ndarray], attributes: Mapping[str, Any]) -> tuple[Any, ...]:
    """onnxruntime-extensions' invocation hook, returning arrays where its own builds Python lists."""
    from onnxruntime_extensions._ocos import Opdef

    op = Opdef._odlist[op_id]
    got = op.body(*feed, **op.cast_attributes(attributes))
    flat: list[Any] = [op_id]
    for each in got if isinstance(got, tuple) else (got,):
        array = np.ascontiguousarray(each)
        flat += [array.shape, array.reshape(-1)]
    return tuple(flat)


def _define_ops() -> None:
    """Define every segment op and install :func:`_hook`, once per process."""
    with _lock:
        if _defined.is_set():
            return
        ext = _extensions()
        from onnxruntime_extensions import PyCustomOpDef

        for n in range(1, MAX_INPUTS + 1):
            for m in range(1, MAX_OUTPUTS + 1):
                def body(*inputs: np.ndarray, segment: str) -> tuple[np.ndarray, ...]:
                    return _run(segment, inputs)

                ext.onnx_op(op_type=op_type(n, m), inputs=[PyCustomOpDef.dt_float] * n,
                            outputs=[PyCustomOpDef.dt_float] * m, attrs={"segment": PyCustomOpDef.dt_string})(body)
        PyCustomOpDef.install_hooker(_hook)
        _defined.set()


class ExtensionsSession:
    """``model`` in one onnxruntime session, the coprocessor's segments as Python-op nodes (module docstring).

    ``policy`` and ``jit`` as for :class:`qnnlib.coprocessor.InferenceSession`. :attr:`session` is the real
    onnxruntime session; :meth:`run`, :meth:`get_inputs` and :meth:`get_outputs` are its interface.
    """

    def __init__(self, model: ModelLike, policy: str = "ort-exact", *, jit: bool | None = None) -> None:
        _define_ops()
        self._engine = InferenceSession(model, policy=policy, jit=jit)
        self._keys: list[str] = []
        self.model = self._fused_model()
        weakref.finalize(self, _forget, list(self._keys))
        # one thread, as InferenceSession's CPU parts: an idle pool spinning between the CPU nodes
        # takes the cores from the GEMMs inside the segment ops (measured: 39.8 ms against 21.8 ms)
        self.session = make_session(self.model, threads=1, custom_ops_library=_extensions().get_library_path(),
                                    log_errors_as="model with coprocessor nodes")

    def _fused_model(self) -> onnx.ModelProto:
        engine = self._engine
        source = engine.model
        out = onnx.ModelProto()
        out.CopyFrom(source)
        names = NameAllocator(out)
        nodes: list[onnx.NodeProto] = []
        for position, segment in enumerate(engine.segments()):
            if segment.place == CPU:
                nodes.extend(segment.nodes)
                continue
            crossing = [*segment.inputs, *segment.outputs]
            odd = [t for t in crossing if engine.tensor_type(t) not in _EXACT_IN_FLOAT]
            if len(segment.inputs) > MAX_INPUTS or len(segment.outputs) > MAX_OUTPUTS or odd or not segment.inputs:
                raise UnsupportedModelError(
                    f"coprocessor segment {position} (from node {segment.nodes[0].name!r}) has "
                    f"{len(segment.inputs)} inputs and {len(segment.outputs)} outputs"
                    f"{f', and tensors {odd} of a type float32 cannot hold exactly' if odd else ''}; one "
                    f"onnxruntime-extensions op takes at most {MAX_INPUTS} and {MAX_OUTPUTS} float32 tensors. "
                    "Run the model with qnnlib.coprocessor.InferenceSession instead")
            key = f"{next(_keys)}:{len(segment.outputs)}"
            _runners[key] = _segment_runner(engine, position, segment.inputs)
            self._keys.append(key)
            inside = []
            for tensor in segment.inputs:
                if engine.tensor_type(tensor) == onnx.TensorProto.FLOAT:
                    inside.append(tensor)
                    continue
                inside.append(names.fresh(f"{tensor}_to_coprocessor"))
                nodes.append(helper.make_node("Cast", [tensor], [inside[-1]], name=names.fresh(f"{tensor}_Cast"),
                                              to=onnx.TensorProto.FLOAT))
            outside = [t if engine.tensor_type(t) == onnx.TensorProto.FLOAT else names.fresh(f"{t}_from_coprocessor")
                       for t in segment.outputs]
            nodes.append(helper.make_node(op_type(len(inside), len(outside)), inside, outside,
                                          name=names.fresh(f"coprocessor_segment_{position}"), domain=DOMAIN,
                                          segment=key))
            for tensor, produced in zip(segment.outputs, outside, strict=True):
                if produced != tensor:
                    nodes.append(helper.make_node("Cast", [produced], [tensor], name=names.fresh(f"{tensor}_Cast"),
                                                  to=engine.tensor_type(tensor)))
        replace_nodes(out, nodes)
        drop_stale_value_info(out)  # tensors now inside a coprocessor node
        drop_unused_initializers(out)
        ensure_opset(out, DOMAIN)
        return out

    def get_inputs(self) -> list[NodeArg]:
        """The model's inputs."""
        return self._engine.get_inputs()

    def get_outputs(self) -> list[NodeArg]:
        """The model's outputs."""
        return self._engine.get_outputs()

    def placement(self) -> dict[str, str]:
        """Each original node and where it runs: ``"coprocessor"`` (inside a segment op) or the CPU provider."""
        return self._engine.placement()

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[np.ndarray]:
        """``onnxruntime.InferenceSession.run``; a failure inside a segment op raises :class:`SessionError`."""
        for key in self._keys:
            _failures.pop(key, None)
        try:
            got = self.session.run(output_names, dict(input_feed), run_options)
        except Exception as exc:  # onnxruntime's own exception types; a failed segment op is the root cause
            self._raise_failure()
            raise SessionError(f"onnxruntime failed on the model with coprocessor nodes: {exc}") from exc
        self._raise_failure()
        return list(got)

    def _raise_failure(self) -> None:
        """Raise the first exception a segment op caught during the last run, if any."""
        failed = [(key, _failures.pop(key)) for key in self._keys if key in _failures]
        if failed:
            key, exc = failed[0]
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: held back only until now
                raise exc
            raise SessionError(f"coprocessor segment op {self._keys.index(key)} failed: {type(exc).__name__}: "
                               f"{exc}") from exc


def _segment_runner(engine: InferenceSession, position: int,
                    inputs: Sequence[str]) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """Segment ``position`` of ``engine`` on float32 inputs, each cast back to its integer type first."""
    dtypes = [helper.tensor_dtype_to_np_dtype(engine.tensor_type(t)) for t in inputs]
    ref = weakref.ref(engine)

    def run(values: Sequence[np.ndarray]) -> list[np.ndarray]:
        owner = ref()
        if owner is None:
            raise SessionError("the session of this coprocessor segment no longer exists")
        cast = [np.asarray(v).astype(d, copy=False) for v, d in zip(values, dtypes, strict=True)]
        return owner.run_segment(position, cast)

    return run


def _forget(keys: list[str]) -> None:
    for key in keys:
        _runners.pop(key, None)
        _failures.pop(key, None)


__all__ = ["COPROCESSOR", "DOMAIN", "MAX_INPUTS", "MAX_OUTPUTS", "ExtensionsSession", "op_type"]
